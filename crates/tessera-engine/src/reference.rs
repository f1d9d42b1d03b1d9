//! CPU references for every kernel: straightforward loops, accumulating in f64. They define what
//! the kernels must compute; `checks` compares the two.

use crate::ops::{AttentionParams, Layout};

/// `a[m, k] · b`, with `b` [k, n] (`Nn`) or [n, k] (`Nt`).
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, layout: Layout) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0.0f64;
            for kk in 0..k {
                let bv = match layout {
                    Layout::Nn => b[kk * n + j],
                    Layout::Nt => b[j * k + kk],
                };
                sum += f64::from(a[i * k + kk]) * f64::from(bv);
            }
            out[i * n + j] = sum as f32;
        }
    }
    out
}

/// `x[m, k] · w[n, k]^T + bias`, added to `acc` when given.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, acc: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = matmul(x, w, m, k, n, Layout::Nt);
    for (i, v) in out.iter_mut().enumerate() {
        let mut total = f64::from(*v);
        if let Some(bias) = bias {
            total += f64::from(bias[i % n]);
        }
        if let Some(acc) = acc {
            total += f64::from(acc[i]);
        }
        *v = total as f32;
    }
    out
}

pub fn gather(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter().flat_map(|&id| table[id as usize * dim..][..dim].iter().copied()).collect()
}

pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    x.chunks(dim)
        .flat_map(|row| {
            let mean_square = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64;
            let scale = 1.0 / (mean_square + f64::from(eps)).sqrt();
            row.iter().zip(weight).map(move |(&v, &w)| (f64::from(v) * scale * f64::from(w)) as f32)
        })
        .collect()
}

pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    x.chunks(dim)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / dim as f64;
            let scale = 1.0 / (var + f64::from(eps)).sqrt();
            row.iter()
                .zip(weight.iter().zip(bias))
                .map(move |(&v, (&w, &b))| ((f64::from(v) - mean) * scale * f64::from(w) + f64::from(b)) as f32)
        })
        .collect()
}

pub fn softmax(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let exps: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(move |e| (e / sum) as f32)
        })
        .collect()
}

/// Rotary embedding on `x` [tokens, heads, head_dim], adjacent pairs (GGUF llama layout).
pub fn rope(x: &[f32], heads: usize, head_dim: usize, positions: &[u32], theta: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for i in 0..head_dim / 2 {
                let freq = f64::from(theta).powf(-2.0 * i as f64 / head_dim as f64);
                let (sin, cos) = (f64::from(pos) * freq).sin_cos();
                let (a, b) = (f64::from(x[base + 2 * i]), f64::from(x[base + 2 * i + 1]));
                out[base + 2 * i] = (a * cos - b * sin) as f32;
                out[base + 2 * i + 1] = (a * sin + b * cos) as f32;
            }
        }
    }
    out
}

pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = f64::from(g);
            (g / (1.0 + (-g).exp()) * f64::from(u)) as f32
        })
        .collect()
}

pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = f64::from(v);
            (0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))) as f32
        })
        .collect()
}

pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) + f64::from(y)) as f32).collect()
}

/// The error function, from its everywhere-convergent series of positive terms
/// erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)), exact to f64 rounding.
pub fn erf(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x * x / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

/// Shapes for [`attention`], as in `Batch::attention`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub queries: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

pub fn attention(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[u32]>, s: AttentionShape, p: AttentionParams) -> Vec<f32> {
    let d = s.head_dim;
    let mut out = vec![0.0; q.len()];
    for b in 0..s.batch {
        for t in 0..s.queries {
            for h in 0..s.heads {
                let kv_h = h / (s.heads / s.kv_heads);
                let q_row = &q[((b * s.queries + t) * s.heads + h) * d..][..d];
                let limit = if p.causal { p.kv_len.min(p.past + t + 1) } else { p.kv_len };
                let visible: Vec<usize> =
                    (0..limit).filter(|&j| mask.is_none_or(|m| m[b * s.capacity + j] != 0)).collect();
                let row = |j: usize| ((b * s.capacity + j) * s.kv_heads + kv_h) * d;
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let dot: f64 = (0..d).map(|i| f64::from(q_row[i]) * f64::from(k[row(j) + i])).sum();
                        dot * f64::from(p.scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[((b * s.queries + t) * s.heads + h) * d..][..d];
                for (i, o) in o.iter_mut().enumerate() {
                    let sum: f64 = visible.iter().zip(&weights).map(|(&j, w)| w * f64::from(v[row(j) + i])).sum();
                    *o = if total > 0.0 { (sum / total) as f32 } else { 0.0 };
                }
            }
        }
    }
    out
}

pub fn mean_pool_l2(x: &[f32], mask: &[u32], batch: usize, seq: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; batch * dim];
    for b in 0..batch {
        let rows: Vec<usize> = (0..seq).filter(|&s| mask[b * seq + s] != 0).collect();
        let mean: Vec<f64> = (0..dim)
            .map(|i| rows.iter().map(|&s| f64::from(x[(b * seq + s) * dim + i])).sum::<f64>() / rows.len().max(1) as f64)
            .collect();
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..dim {
            out[b * dim + i] = if norm > 0.0 { (mean[i] / norm) as f32 } else { 0.0 };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, expected) in [(0.0, 0.0), (0.5, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (-2.0, -0.995_322_265_018_952_7), (3.5, 0.999_999_256_901_627_7)] {
            assert!((erf(x) - expected).abs() < 1e-14, "erf({x}) = {}, expected {expected}", erf(x));
        }
    }
}
