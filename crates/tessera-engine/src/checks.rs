//! Kernel checks: run a kernel on fresh random inputs (no zeros) with its output poisoned (NaN),
//! and compare with the CPU reference in [`crate::reference`]. The native tests and the
//! browser self-test (`tessera-web`) run the same [`cases`], so both backends are held to the
//! same bounds.

use std::fmt;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::{AttentionParams, Layout};
use crate::quant;
use crate::reference::{self, AttentionShape};
pub use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// One shape of one kernel.
#[derive(Clone, Debug)]
pub enum Case {
    Matmul { m: usize, k: usize, n: usize, layout: Layout },
    Linear { m: usize, k: usize, n: usize, dtype: DType, bias: bool, accumulate: bool },
    Gather { vocab: usize, dim: usize, tokens: usize, dtype: DType },
    RmsNorm { rows: usize, dim: usize },
    LayerNorm { rows: usize, dim: usize },
    Softmax { rows: usize, dim: usize },
    Rope { tokens: usize, heads: usize, head_dim: usize, theta: f32 },
    /// [`crate::Batch::norm_linear`]; fused for one row of quantized weights.
    NormLinear { m: usize, k: usize, n: usize, dtype: DType, accumulate: bool },
    /// [`crate::Batch::norm_glu`]; fused for one row of quantized weights.
    NormGlu { m: usize, k: usize, n: usize, dtype: DType },
    /// [`crate::Batch::rope_qkv`], into caches of `capacity` rows after `past` cached ones.
    RopeQkv { tokens: usize, heads: usize, kv_heads: usize, head_dim: usize, past: usize, capacity: usize },
    SiluMul { len: usize },
    Gelu { len: usize },
    Add { len: usize },
    Attention { shape: AttentionShape, causal: bool, past: usize, kv_len: usize, masked: bool },
    MeanPool { batch: usize, seq: usize, dim: usize },
}

impl Case {
    /// The op under test, as the tests and the self-test report it.
    pub fn kernel(&self) -> &'static str {
        match self {
            Case::Matmul { .. } => "matmul",
            Case::Linear { dtype: DType::F32, .. } => "linear_f32",
            Case::Linear { m: 1..=8, .. } => "matvec_quant",
            Case::Linear { .. } => "matmul_quant",
            Case::Gather { .. } => "gather",
            Case::RmsNorm { .. } => "rms_norm",
            Case::LayerNorm { .. } => "layer_norm",
            Case::Softmax { .. } => "softmax",
            Case::Rope { .. } => "rope",
            Case::NormLinear { m: 1..=8, dtype: DType::Q4_1 | DType::Q8_0, .. } => "matvec_quant_norm",
            Case::NormLinear { .. } => "norm_linear",
            Case::NormGlu { m: 1..=8, dtype: DType::Q4_1 | DType::Q8_0, .. } => "matvec_quant_norm_glu",
            Case::NormGlu { .. } => "norm_glu",
            Case::RopeQkv { .. } => "rope_qkv",
            Case::SiluMul { .. } => "silu_mul",
            Case::Gelu { .. } => "gelu",
            Case::Add { .. } => "add",
            Case::Attention { .. } => "attention",
            Case::MeanPool { .. } => "mean_pool_l2",
        }
    }

    /// The largest error allowed, relative to the reference's largest magnitude.
    pub fn tolerance(&self) -> f64 {
        match self {
            Case::Matmul { .. } | Case::Linear { dtype: DType::F32, .. } => 1e-5,
            // Same dequantized weights; the kernels regroup the sums (d * sum(q x) + m * sum(x)).
            Case::Linear { .. } => 2e-5,
            Case::Gather { .. } => 1e-6,
            Case::RmsNorm { .. } | Case::LayerNorm { .. } | Case::Softmax { .. } | Case::MeanPool { .. } => 1e-5,
            // WGSL only promises sin/cos to 2^-11 absolute; angles are pos * freq in f32.
            Case::Rope { .. } | Case::RopeQkv { .. } => 2e-3,
            // The fused kernels scale the dot product by 1/rms instead of each x value.
            Case::NormLinear { .. } | Case::NormGlu { .. } => 3e-5,
            Case::SiluMul { .. } | Case::Gelu { .. } | Case::Add { .. } => 1e-5,
            Case::Attention { .. } => 2e-5,
        }
    }
}

/// The shapes every backend is checked at: small, and mostly not multiples of the tiles.
pub fn cases() -> Vec<Case> {
    use Case::*;
    let attn = |batch, queries, heads, kv_heads, head_dim, capacity| AttentionShape { batch, queries, heads, kv_heads, head_dim, capacity };
    vec![
        Matmul { m: 1, k: 4, n: 4, layout: Layout::Nn },
        Matmul { m: 37, k: 44, n: 52, layout: Layout::Nn },
        Matmul { m: 64, k: 64, n: 64, layout: Layout::Nn },
        Matmul { m: 70, k: 388, n: 136, layout: Layout::Nn },
        Matmul { m: 37, k: 44, n: 52, layout: Layout::Nt },
        Matmul { m: 150, k: 20, n: 12, layout: Layout::Nt },
        Matmul { m: 5, k: 576, n: 36, layout: Layout::Nt },
        Matmul { m: 13, k: 7, n: 9, layout: Layout::Nn },
        Matmul { m: 33, k: 18, n: 17, layout: Layout::Nt },
        Linear { m: 7, k: 36, n: 20, dtype: DType::F32, bias: true, accumulate: true },
        Linear { m: 1, k: 576, n: 72, dtype: DType::Q4_1, bias: false, accumulate: false },
        Linear { m: 1, k: 64, n: 37, dtype: DType::Q4_1, bias: true, accumulate: true },
        Linear { m: 1, k: 96, n: 45, dtype: DType::Q8_0, bias: false, accumulate: false },
        Linear { m: 1, k: 1536, n: 24, dtype: DType::Q8_0, bias: true, accumulate: true },
        Linear { m: 1, k: 32, n: 3, dtype: DType::Q8_0, bias: false, accumulate: false },
        Linear { m: 1, k: 320, n: 131, dtype: DType::Q4_1, bias: false, accumulate: false },
        // A short prompt: a few rows, one matvec per row in one dispatch.
        Linear { m: 5, k: 96, n: 70, dtype: DType::Q4_1, bias: true, accumulate: true },
        Linear { m: 8, k: 64, n: 33, dtype: DType::Q8_0, bias: false, accumulate: false },
        Linear { m: 37, k: 96, n: 68, dtype: DType::Q4_1, bias: false, accumulate: false },
        Linear { m: 130, k: 64, n: 8, dtype: DType::Q4_1, bias: true, accumulate: false },
        Linear { m: 20, k: 64, n: 52, dtype: DType::Q8_0, bias: true, accumulate: true },
        Gather { vocab: 50, dim: 36, tokens: 9, dtype: DType::F32 },
        Gather { vocab: 40, dim: 64, tokens: 7, dtype: DType::Q8_0 },
        Gather { vocab: 40, dim: 96, tokens: 5, dtype: DType::Q4_1 },
        RmsNorm { rows: 3, dim: 576 },
        RmsNorm { rows: 5, dim: 100 },
        RmsNorm { rows: 1, dim: 1000 },
        LayerNorm { rows: 4, dim: 384 },
        LayerNorm { rows: 2, dim: 37 },
        Softmax { rows: 3, dim: 1000 },
        Softmax { rows: 7, dim: 5 },
        Rope { tokens: 5, heads: 3, head_dim: 64, theta: 100_000.0 },
        Rope { tokens: 3, heads: 2, head_dim: 6, theta: 10_000.0 },
        NormLinear { m: 1, k: 576, n: 131, dtype: DType::Q4_1, accumulate: false },
        NormLinear { m: 1, k: 1536, n: 40, dtype: DType::Q8_0, accumulate: true },
        NormLinear { m: 1, k: 64, n: 600, dtype: DType::Q4_1, accumulate: true },
        NormLinear { m: 3, k: 96, n: 36, dtype: DType::Q4_1, accumulate: true },
        NormLinear { m: 9, k: 64, n: 20, dtype: DType::Q8_0, accumulate: false },
        NormLinear { m: 2, k: 20, n: 12, dtype: DType::F32, accumulate: false },
        NormGlu { m: 1, k: 576, n: 153, dtype: DType::Q4_1 },
        NormGlu { m: 1, k: 128, n: 70, dtype: DType::Q8_0 },
        NormGlu { m: 4, k: 64, n: 24, dtype: DType::Q4_1 },
        NormGlu { m: 12, k: 64, n: 24, dtype: DType::Q8_0 },
        // A decode step into a cache, and a prefill of 5 tokens after 2 cached ones.
        RopeQkv { tokens: 1, heads: 9, kv_heads: 3, head_dim: 64, past: 6, capacity: 8 },
        RopeQkv { tokens: 5, heads: 4, kv_heads: 2, head_dim: 6, past: 2, capacity: 9 },
        SiluMul { len: 1000 },
        Gelu { len: 777 },
        Add { len: 1025 },
        // Decode: one query over a cache that crosses a 256-key chunk, 9 query heads on 3 kv heads.
        Attention { shape: attn(1, 1, 9, 3, 64, 300), causal: true, past: 270, kv_len: 271, masked: false },
        // Prefill of 7 tokens after 3 cached ones.
        Attention { shape: attn(1, 7, 4, 2, 32, 16), causal: true, past: 3, kv_len: 10, masked: false },
        // Bidirectional with padding (BERT), three sequences of different lengths.
        Attention { shape: attn(3, 11, 4, 4, 32, 11), causal: false, past: 0, kv_len: 11, masked: true },
        Attention { shape: attn(1, 3, 2, 2, 16, 300), causal: false, past: 0, kv_len: 300, masked: true },
        MeanPool { batch: 3, seq: 9, dim: 384 },
        MeanPool { batch: 2, seq: 1, dim: 37 },
    ]
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct Report {
    pub kernel: &'static str,
    pub case: String,
    pub seed: u64,
    /// Largest |gpu - reference| over the largest |reference|; infinite for NaN or a wrong length.
    pub max_error: f64,
    pub tolerance: f64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.max_error <= self.tolerance
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        write!(f, "{verdict}: {} {} (seed {}): error {:.2e}, bound {:.0e}", self.kernel, self.case, self.seed, self.max_error, self.tolerance)
    }
}

pub fn relative_error(got: &[f32], expected: &[f32]) -> f64 {
    if got.len() != expected.len() {
        return f64::INFINITY;
    }
    let scale = expected.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs())).max(1e-30);
    let mut worst = 0.0f64;
    for (&g, &e) in got.iter().zip(expected) {
        let diff = (f64::from(g) - f64::from(e)).abs();
        if diff.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(diff);
    }
    worst / scale
}

/// An output tensor filled with NaN, so a kernel that skips an element cannot pass.
fn poisoned(gpu: &Gpu, dims: &[usize]) -> Result<Tensor> {
    let out = gpu.empty(dims, DType::F32)?;
    let nan: Vec<f32> = vec![f32::NAN; out.shape().elements()];
    gpu.write(&out, bytemuck::cast_slice(&nan))?;
    Ok(out)
}

/// Quantizes `values` [rows, cols] to `dtype` and uploads it; returns the tensor and the
/// dequantized values the reference should use.
fn quantized_weight(gpu: &Gpu, dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Result<(Tensor, Vec<f32>)> {
    let (bytes, exact) = match dtype {
        DType::F32 => (bytemuck::cast_slice(values).to_vec(), values.to_vec()),
        DType::Q4_1 => {
            let bytes = quant::quantize_q4_1(values);
            let exact = quant::dequantize_q4_1(&bytes)?;
            (bytes, exact)
        }
        DType::Q8_0 => {
            let bytes = quant::repack_q8_0(&quant::quantize_q8_0_gguf(values))?;
            let exact = quant::dequantize_q8_0(&bytes)?;
            (bytes, exact)
        }
        DType::U32 => unreachable!("no case quantizes to U32"),
    };
    Ok((gpu.upload(&[rows, cols], dtype, &bytes)?, exact))
}

/// Runs one case with inputs drawn from `seed`.
pub async fn run(gpu: &Gpu, case: &Case, seed: u64) -> Result<Report> {
    let mut rng = Rng::new(seed);
    let (got, expected) = match *case {
        Case::Matmul { m, k, n, layout } => {
            let (a, b) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
            let b_dims = if layout == Layout::Nn { [k, n] } else { [n, k] };
            let (ta, tb, out) = (gpu.upload_f32(&[m, k], &a)?, gpu.upload_f32(&b_dims, &b)?, poisoned(gpu, &[m, n])?);
            let mut batch = gpu.batch();
            batch.matmul(&ta, &tb, layout, &out)?;
            batch.submit();
            (gpu.read_f32(&out).await?, reference::matmul(&a, &b, m, k, n, layout))
        }
        Case::Linear { m, k, n, dtype, bias, accumulate } => {
            let x = rng.vec(m * k, -1.0, 1.0);
            let (w, exact) = quantized_weight(gpu, dtype, n, k, &rng.vec(n * k, -1.0, 1.0))?;
            let b = rng.vec(n, -1.0, 1.0);
            let acc = rng.vec(m * n, -1.0, 1.0);
            let tx = gpu.upload_f32(&[m, k], &x)?;
            let tb = gpu.upload_f32(&[n], &b)?;
            let out = if accumulate { gpu.upload_f32(&[m, n], &acc)? } else { poisoned(gpu, &[m, n])? };
            let mut batch = gpu.batch();
            batch.linear(&tx, &w, bias.then_some(&tb), &out, accumulate)?;
            batch.submit();
            let expected = reference::linear(&x, &exact, bias.then_some(&b[..]), accumulate.then_some(&acc[..]), m, k, n);
            (gpu.read_f32(&out).await?, expected)
        }
        Case::Gather { vocab, dim, tokens, dtype } => {
            let (table, exact) = quantized_weight(gpu, dtype, vocab, dim, &rng.vec(vocab * dim, -1.0, 1.0))?;
            let ids: Vec<u32> = (0..tokens).map(|_| rng.below(vocab as u32)).collect();
            let (tids, out) = (gpu.upload_u32(&[tokens], &ids)?, poisoned(gpu, &[tokens, dim])?);
            let mut batch = gpu.batch();
            batch.gather(&table, &tids, &out)?;
            batch.submit();
            (gpu.read_f32(&out).await?, reference::gather(&exact, dim, &ids))
        }
        Case::RmsNorm { rows, dim } | Case::LayerNorm { rows, dim } => {
            let (x, w, b) = (rng.vec(rows * dim, -2.0, 2.0), rng.vec(dim, -1.0, 1.0), rng.vec(dim, -1.0, 1.0));
            let (tx, tw, tb, out) = (gpu.upload_f32(&[rows, dim], &x)?, gpu.upload_f32(&[dim], &w)?, gpu.upload_f32(&[dim], &b)?, poisoned(gpu, &[rows, dim])?);
            let eps = 1e-5;
            let mut batch = gpu.batch();
            let expected = if matches!(case, Case::RmsNorm { .. }) {
                batch.rms_norm(&tx, &tw, eps, &out)?;
                reference::rms_norm(&x, &w, eps)
            } else {
                batch.layer_norm(&tx, &tw, &tb, eps, &out)?;
                reference::layer_norm(&x, &w, &b, eps)
            };
            batch.submit();
            (gpu.read_f32(&out).await?, expected)
        }
        Case::Softmax { rows, dim } => {
            let x = rng.vec(rows * dim, -8.0, 8.0);
            let tx = gpu.upload_f32(&[rows, dim], &x)?;
            let mut batch = gpu.batch();
            batch.softmax(&tx)?;
            batch.submit();
            (gpu.read_f32(&tx).await?, reference::softmax(&x, dim))
        }
        Case::Rope { tokens, heads, head_dim, theta } => {
            let x = rng.vec(tokens * heads * head_dim, -1.0, 1.0);
            let positions: Vec<u32> = (0..tokens).map(|_| rng.below(1024)).collect();
            let (tx, tp) = (gpu.upload_f32(&[tokens, heads, head_dim], &x)?, gpu.upload_u32(&[tokens], &positions)?);
            let mut batch = gpu.batch();
            batch.rope(&tx, &tp, theta)?;
            batch.submit();
            (gpu.read_f32(&tx).await?, reference::rope(&x, heads, head_dim, &positions, theta))
        }
        Case::NormLinear { m, k, n, dtype, accumulate } => {
            let (x, g) = (rng.vec(m * k, -2.0, 2.0), rng.vec(k, -1.0, 1.0));
            let (w, exact) = quantized_weight(gpu, dtype, n, k, &rng.vec(n * k, -1.0, 1.0))?;
            let acc = rng.vec(m * n, -1.0, 1.0);
            let (tx, tg) = (gpu.upload_f32(&[m, k], &x)?, gpu.upload_f32(&[k], &g)?);
            let out = if accumulate { gpu.upload_f32(&[m, n], &acc)? } else { poisoned(gpu, &[m, n])? };
            let eps = 1e-5;
            let mut batch = gpu.batch();
            batch.norm_linear(&tx, &tg, eps, &w, &out, accumulate)?;
            batch.submit();
            let normed = reference::rms_norm(&x, &g, eps);
            (gpu.read_f32(&out).await?, reference::linear(&normed, &exact, None, accumulate.then_some(&acc[..]), m, k, n))
        }
        Case::NormGlu { m, k, n, dtype } => {
            let (x, g) = (rng.vec(m * k, -2.0, 2.0), rng.vec(k, -1.0, 1.0));
            let (gate, gate_exact) = quantized_weight(gpu, dtype, n, k, &rng.vec(n * k, -1.0, 1.0))?;
            let (up, up_exact) = quantized_weight(gpu, dtype, n, k, &rng.vec(n * k, -1.0, 1.0))?;
            let (tx, tg, out) = (gpu.upload_f32(&[m, k], &x)?, gpu.upload_f32(&[k], &g)?, poisoned(gpu, &[m, n])?);
            let eps = 1e-5;
            let mut batch = gpu.batch();
            batch.norm_glu(&tx, &tg, eps, &gate, &up, &out)?;
            batch.submit();
            let normed = reference::rms_norm(&x, &g, eps);
            let gated = reference::linear(&normed, &gate_exact, None, None, m, k, n);
            let upped = reference::linear(&normed, &up_exact, None, None, m, k, n);
            (gpu.read_f32(&out).await?, reference::silu_mul(&gated, &upped))
        }
        Case::RopeQkv { tokens, heads, kv_heads, head_dim, past, capacity } => {
            let theta = 100_000.0;
            let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
            let qkv = rng.vec(tokens * (q_width + 2 * kv_width), -1.0, 1.0);
            let positions: Vec<u32> = (0..tokens).map(|_| rng.below(1024)).collect();
            // The caches start full of other values, which must survive outside the new rows.
            let (k_cache, v_cache) = (rng.vec(capacity * kv_width, -1.0, 1.0), rng.vec(capacity * kv_width, -1.0, 1.0));
            let cache_dims = [1, capacity, kv_heads, head_dim];
            let tqkv = gpu.upload_f32(&[tokens, q_width + 2 * kv_width], &qkv)?;
            let tp = gpu.upload_u32(&[tokens], &positions)?;
            let (tk, tv) = (gpu.upload_f32(&cache_dims, &k_cache)?, gpu.upload_f32(&cache_dims, &v_cache)?);
            let tq = poisoned(gpu, &[tokens, heads, head_dim])?;
            let mut batch = gpu.batch();
            batch.rope_qkv(&tqkv, &tp, theta, &tq, &tk, &tv, past)?;
            batch.submit();
            let part = |start: usize, width: usize| -> Vec<f32> {
                qkv.chunks(q_width + 2 * kv_width).flat_map(|row| row[start..start + width].to_vec()).collect()
            };
            let q = reference::rope(&part(0, q_width), heads, head_dim, &positions, theta);
            let k = reference::rope(&part(q_width, kv_width), kv_heads, head_dim, &positions, theta);
            let (mut k_expected, mut v_expected) = (k_cache, v_cache);
            k_expected[past * kv_width..(past + tokens) * kv_width].copy_from_slice(&k);
            v_expected[past * kv_width..(past + tokens) * kv_width].copy_from_slice(&part(q_width + kv_width, kv_width));
            let mut got = gpu.read_f32(&tq).await?;
            got.extend(gpu.read_f32(&tk).await?);
            got.extend(gpu.read_f32(&tv).await?);
            (got, [q, k_expected, v_expected].concat())
        }
        Case::SiluMul { len } | Case::Add { len } => {
            let (a, b) = (rng.vec(len, -6.0, 6.0), rng.vec(len, -2.0, 2.0));
            let (ta, tb, out) = (gpu.upload_f32(&[len], &a)?, gpu.upload_f32(&[len], &b)?, poisoned(gpu, &[len])?);
            let mut batch = gpu.batch();
            let expected = if matches!(case, Case::Add { .. }) {
                batch.add(&ta, &tb, &out)?;
                reference::add(&a, &b)
            } else {
                batch.silu_mul(&ta, &tb, &out)?;
                reference::silu_mul(&a, &b)
            };
            batch.submit();
            (gpu.read_f32(&out).await?, expected)
        }
        Case::Gelu { len } => {
            let x = rng.vec(len, -5.0, 5.0);
            let (tx, out) = (gpu.upload_f32(&[len], &x)?, poisoned(gpu, &[len])?);
            let mut batch = gpu.batch();
            batch.gelu(&tx, &out)?;
            batch.submit();
            (gpu.read_f32(&out).await?, reference::gelu(&x))
        }
        Case::Attention { shape: s, causal, past, kv_len, masked } => {
            let q_dims = [s.batch, s.queries, s.heads, s.head_dim];
            let kv_dims = [s.batch, s.capacity, s.kv_heads, s.head_dim];
            let q = rng.vec(q_dims.iter().product(), -1.0, 1.0);
            let k = rng.vec(kv_dims.iter().product(), -1.0, 1.0);
            let v = rng.vec(kv_dims.iter().product(), -1.0, 1.0);
            // Padding at the end of each sequence; at least one real token.
            let mask: Vec<u32> = (0..s.batch)
                .flat_map(|_| {
                    let len = 1 + rng.below(kv_len as u32) as usize;
                    (0..s.capacity).map(move |j| u32::from(j < len))
                })
                .collect();
            let params = AttentionParams { causal, past, kv_len, scale: 1.0 / (s.head_dim as f32).sqrt() };
            let (tq, tk, tv) = (gpu.upload_f32(&q_dims, &q)?, gpu.upload_f32(&kv_dims, &k)?, gpu.upload_f32(&kv_dims, &v)?);
            let tmask = gpu.upload_u32(&[s.batch, s.capacity], &mask)?;
            let out = poisoned(gpu, &q_dims)?;
            let mut batch = gpu.batch();
            batch.attention(&tq, &tk, &tv, masked.then_some(&tmask), &out, params)?;
            batch.submit();
            let expected = reference::attention(&q, &k, &v, masked.then_some(&mask[..]), s, params);
            (gpu.read_f32(&out).await?, expected)
        }
        Case::MeanPool { batch: b, seq, dim } => {
            let x = rng.vec(b * seq * dim, -1.0, 1.0);
            let mask: Vec<u32> = (0..b)
                .flat_map(|_| {
                    let len = 1 + rng.below(seq as u32) as usize;
                    (0..seq).map(move |s| u32::from(s < len))
                })
                .collect();
            let (tx, tm, out) = (gpu.upload_f32(&[b, seq, dim], &x)?, gpu.upload_u32(&[b, seq], &mask)?, poisoned(gpu, &[b, dim])?);
            let mut batch = gpu.batch();
            batch.mean_pool_l2(&tx, &tm, &out)?;
            batch.submit();
            (gpu.read_f32(&out).await?, reference::mean_pool_l2(&x, &mask, b, seq, dim))
        }
    };
    Ok(Report {
        kernel: case.kernel(),
        case: format!("{case:?}"),
        seed,
        max_error: relative_error(&got, &expected),
        tolerance: case.tolerance(),
    })
}
