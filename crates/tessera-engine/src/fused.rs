//! Fused operations: what a transformer block does between its big kernels, folded into them so a
//! decode step runs a llama block in six dispatches (see `shaders/matvec_quant.wgsl` and
//! `shaders/rope.wgsl`). Each op takes the fused kernel when it applies (a few input rows and
//! quantized weights) and otherwise records the separate ops, so models write a block once.

use crate::batch::{Batch, linear_grid};
use crate::error::{EngineError, Result};
use crate::ops::{
    FLAG_ACCUMULATE, MATVEC_MAX_INPUT_ROWS, MATVEC_ROWS_PER_WORKGROUP, RopeParams, WORKGROUP, check_rope, expect_dims, expect_distinct,
    expect_dtype, groups, p_matvec,
};
use crate::shaders::Kernel;
use crate::tensor::{DType, Tensor};

impl Batch<'_> {
    /// A linear layer over RMS-normalised rows: `out = rms_norm(x, norm, eps) · w^T`, or `out +=`
    /// that when `accumulate` is set. `w` [N, K] is F32, Q4_1 or Q8_0.
    pub fn norm_linear(&mut self, x: &Tensor, norm: &Tensor, eps: f32, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        let Some(kernel) = matvec_kernel(x, w, Kernel::MatvecNormQ4_1, Kernel::MatvecNormQ8_0) else {
            let normed = self.scratch("norm_linear.normed", x.dims())?;
            self.rms_norm(x, norm, eps, &normed)?;
            return self.linear(&normed, w, None, out, accumulate);
        };
        let op = "norm_linear";
        let (n, k) = check_fused_matvec(op, x, norm, w, out)?;
        expect_distinct(op, out, &[x, norm, w])?;
        let flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
        let p = p_matvec(n, k, flags, eps);
        // No bias: `x` stands in for it.
        let grid = linear_grid(groups(n, MATVEC_ROWS_PER_WORKGROUP));
        self.dispatch_layers(kernel, &p, &[x, w, x, norm, out], grid, x.shape().rows() as u32);
        Ok(())
    }

    /// The input side of a gated MLP over RMS-normalised rows:
    /// `out = silu(x' · gate^T) * (x' · up^T)` with `x' = rms_norm(x, norm, eps)`.
    pub fn norm_glu(&mut self, x: &Tensor, norm: &Tensor, eps: f32, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
        let fused = matvec_kernel(x, gate, Kernel::MatvecNormGluQ4_1, Kernel::MatvecNormGluQ8_0)
            .filter(|_| up.dtype() == gate.dtype() && up.dims() == gate.dims());
        let Some(kernel) = fused else {
            let normed = self.scratch("norm_glu.normed", x.dims())?;
            let (gated, upped) = (self.scratch("norm_glu.gate", out.dims())?, self.scratch("norm_glu.up", out.dims())?);
            self.rms_norm(x, norm, eps, &normed)?;
            self.linear(&normed, gate, None, &gated, false)?;
            self.linear(&normed, up, None, &upped, false)?;
            return self.silu_mul(&gated, &upped, out);
        };
        let op = "norm_glu";
        let (n, k) = check_fused_matvec(op, x, norm, gate, out)?;
        expect_distinct(op, out, &[x, norm, gate, up])?;
        let p = p_matvec(n, k, 0, eps);
        let grid = linear_grid(groups(n, MATVEC_ROWS_PER_WORKGROUP));
        self.dispatch_layers(kernel, &p, &[x, gate, up, x, norm, out], grid, x.shape().rows() as u32);
        Ok(())
    }

    /// Splits a fused attention projection `qkv` [tokens, (heads + 2 kv_heads) * head_dim] (each
    /// token's q heads, k heads, v heads): rotates q into `q` [tokens, heads, head_dim], and
    /// appends the rotated k and the v to the caches [1, capacity, kv_heads, head_dim] at rows
    /// `past..past + tokens`. `positions` [tokens] (u32) feed the rotation, base `theta`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv(
        &mut self,
        qkv: &Tensor,
        positions: &Tensor,
        theta: f32,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        past: usize,
    ) -> Result<()> {
        let op = "rope_qkv";
        for (what, t) in [("qkv", qkv), ("q", q), ("k cache", k_cache), ("v cache", v_cache)] {
            expect_dtype(op, what, t, DType::F32)?;
        }
        expect_dtype(op, "positions", positions, DType::U32)?;
        let &[tokens, heads, head_dim] = q.dims() else {
            return Err(EngineError::shape(op, format!("q must be [tokens, heads, head_dim], got {}", q.shape())));
        };
        let &[1, capacity, kv_heads, cache_dim] = k_cache.dims() else {
            return Err(EngineError::shape(op, format!("the k cache must be [1, capacity, kv_heads, head_dim], got {}", k_cache.shape())));
        };
        if cache_dim != head_dim {
            return Err(EngineError::shape(op, format!("q {} and the k cache {} differ in head_dim", q.shape(), k_cache.shape())));
        }
        check_rope(op, head_dim, theta)?;
        expect_dims(op, "v cache", v_cache, k_cache.dims())?;
        expect_dims(op, "qkv", qkv, &[tokens, (heads + 2 * kv_heads) * head_dim])?;
        expect_dims(op, "positions", positions, &[tokens])?;
        if past + tokens > capacity {
            return Err(EngineError::shape(op, format!("{past} cached + {tokens} new tokens exceed the cache's {capacity}")));
        }
        for out in [q, k_cache, v_cache] {
            expect_distinct(op, out, &[qkv, positions])?;
        }
        if q.same_buffer(k_cache) || q.same_buffer(v_cache) || k_cache.same_buffer(v_cache) {
            return Err(EngineError::shape(op, "q and the two caches must be separate tensors"));
        }
        let p = RopeParams { kv_heads: kv_heads as u32, past: past as u32, ..RopeParams::new(tokens, heads, head_dim, theta) };
        let pairs = qkv.shape().elements() / 2;
        self.dispatch(Kernel::RopeQkv, &p, &[positions, qkv, q, k_cache, v_cache], linear_grid(groups(pairs, WORKGROUP)));
        Ok(())
    }
}

/// The fused matvec kernel (`q4_1` or `q8_0` by the weight's dtype) when `x` has a few rows and
/// the weight is quantized; `None` means the separate ops must run.
fn matvec_kernel(x: &Tensor, w: &Tensor, q4_1: Kernel, q8_0: Kernel) -> Option<Kernel> {
    if x.shape().rows() > MATVEC_MAX_INPUT_ROWS {
        return None;
    }
    match w.dtype() {
        DType::Q4_1 => Some(q4_1),
        DType::Q8_0 => Some(q8_0),
        DType::F32 | DType::U32 => None,
    }
}

/// Checks the rows `x` [M, K], their norm weight [K], the weight [N, K] and `out` [M, N] of a
/// fused matvec; returns (N, K).
fn check_fused_matvec(op: &'static str, x: &Tensor, norm: &Tensor, w: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    for (what, t) in [("x", x), ("norm weight", norm), ("output", out)] {
        expect_dtype(op, what, t, DType::F32)?;
    }
    let &[n, k] = w.dims() else {
        return Err(EngineError::shape(op, format!("weight must be [N, K], got {}", w.shape())));
    };
    if x.shape().last() != k {
        return Err(EngineError::shape(op, format!("input {} does not fit weight {}", x.shape(), w.shape())));
    }
    expect_dims(op, "norm weight", norm, &[k])?;
    let m = x.shape().rows();
    if out.shape().rows() != m || out.shape().last() != n {
        return Err(EngineError::shape(op, format!("output has shape {}, expected [{m}, {n}]", out.shape())));
    }
    Ok((n, k))
}
