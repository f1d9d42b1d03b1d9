//! The operations: each checks its tensors' shapes and dtypes, then records one kernel.
//! Shapes are row-major; "rows" means every dimension but the last, flattened.

use bytemuck::{Pod, Zeroable};

use crate::batch::{Batch, linear_grid};
use crate::error::{EngineError, Result};
use crate::shaders::Kernel;
use crate::tensor::{DType, Tensor};

/// How `b` is stored in [`Batch::matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `b` is [K, N].
    Nn,
    /// `b` is [N, K], as a linear layer's weight is.
    Nt,
}

/// What [`Batch::attention`] attends to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Query `t` is at position `past + t` and sees keys up to and including it.
    pub causal: bool,
    /// Tokens already in the KV cache before these queries (causal attention).
    pub past: usize,
    /// Rows of `k` and `v` that hold keys; the rest of the cache is ignored.
    pub kv_len: usize,
    /// Multiplies q·k; usually 1/sqrt(head_dim).
    pub scale: f32,
}

const FLAG_BIAS: u32 = 1;
pub(crate) const FLAG_ACCUMULATE: u32 = 2;
const ATTENTION_CAUSAL: u32 = 1;
const ATTENTION_MASK: u32 = 2;
/// The tile of C each workgroup of `matmul_common.wgsl` computes.
const MATMUL_TILE_M: usize = 128;
const MATMUL_TILE_N: usize = 64;
const SCALAR_TILE: usize = 16;
pub(crate) const MATVEC_ROWS_PER_WORKGROUP: usize = 128;
/// Up to this many input rows, quantized products run as matvecs (one per row, in one dispatch)
/// rather than through 128-row matmul tiles that would be mostly padding.
pub(crate) const MATVEC_MAX_INPUT_ROWS: usize = 8;
/// Invocations per workgroup in every 1D kernel.
pub(crate) const WORKGROUP: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct Params4 {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionGpuParams {
    batch: u32,
    queries: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    kv_len: u32,
    past: u32,
    scale: f32,
    flags: u32,
    pad: [u32; 2],
}

/// `rope.wgsl`'s parameters.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct RopeParams {
    pub(crate) tokens: u32,
    pub(crate) heads: u32,
    pub(crate) head_dim: u32,
    pub(crate) log2_base: f32,
    pub(crate) kv_heads: u32,
    pub(crate) past: u32,
}

impl RopeParams {
    pub(crate) fn new(tokens: usize, heads: usize, head_dim: usize, theta: f32) -> RopeParams {
        RopeParams { tokens: tokens as u32, heads: heads as u32, head_dim: head_dim as u32, log2_base: theta.log2(), kv_heads: 0, past: 0 }
    }
}

/// Rotary embedding needs pairs, and a frequency base above 1.
pub(crate) fn check_rope(op: &'static str, head_dim: usize, theta: f32) -> Result<()> {
    if !head_dim.is_multiple_of(2) {
        return Err(EngineError::shape(op, format!("head_dim must be even, got {head_dim}")));
    }
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(EngineError::shape(op, format!("frequency base must be finite and above 1, got {theta}")));
    }
    Ok(())
}

fn params(a: usize, b: usize, c: usize, d: u32) -> Params4 {
    // Callers have checked every size against the device's binding limit (at most 4 GiB),
    // so element counts fit in u32.
    Params4 { a: a as u32, b: b as u32, c: c as u32, d }
}

pub(crate) fn expect_dtype(op: &'static str, what: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() == dtype {
        Ok(())
    } else {
        Err(EngineError::DType { op, what, got: t.dtype(), expected: dtype_name(dtype) })
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::U32 => "U32",
        DType::Q4_1 => "Q4_1",
        DType::Q8_0 => "Q8_0",
    }
}

/// The output of a kernel must not share a buffer with its inputs.
pub(crate) fn expect_distinct(op: &'static str, out: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if inputs.iter().any(|t| t.same_buffer(out)) {
        return Err(EngineError::shape(op, "the output tensor is also an input; use a separate output"));
    }
    Ok(())
}

pub(crate) fn expect_dims(op: &'static str, what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() == dims {
        Ok(())
    } else {
        Err(EngineError::shape(op, format!("{what} has shape {}, expected {dims:?}", t.shape())))
    }
}

fn expect_same_elements(op: &'static str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let (first_name, first) = tensors[0];
    for &(name, t) in &tensors[1..] {
        if t.shape().elements() != first.shape().elements() {
            return Err(EngineError::shape(
                op,
                format!("{first_name} has shape {} but {name} has shape {}", first.shape(), t.shape()),
            ));
        }
    }
    Ok(())
}

pub(crate) fn groups(count: usize, per_group: usize) -> u32 {
    count.div_ceil(per_group) as u32
}

impl Batch<'_> {
    /// `out[M, N] = a[M, K] · b`, with `b` as `layout` says. All f32.
    pub fn matmul(&mut self, a: &Tensor, b: &Tensor, layout: Layout, out: &Tensor) -> Result<()> {
        expect_dtype("matmul", "b", b, DType::F32)?;
        self.multiply("matmul", a, b, layout, None, out, 0)
    }

    /// A linear layer: `out[M, N] = x[M, K] · w[N, K]^T (+ bias[N])`, or `out +=` that when
    /// `accumulate` is set (a residual connection for free). `w` is F32, Q4_1 or Q8_0.
    pub fn linear(&mut self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &Tensor, accumulate: bool) -> Result<()> {
        let flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
        self.multiply("linear", x, w, Layout::Nt, bias, out, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn multiply(
        &mut self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        layout: Layout,
        bias: Option<&Tensor>,
        out: &Tensor,
        mut flags: u32,
    ) -> Result<()> {
        expect_dtype(op, "input", a, DType::F32)?;
        expect_dtype(op, "output", out, DType::F32)?;
        if b.shape().rank() != 2 {
            return Err(EngineError::shape(op, format!("weight must be 2-D, got shape {}", b.shape())));
        }
        let (m, k) = (a.shape().rows(), a.shape().last());
        let (n, b_k) = match layout {
            Layout::Nn => (b.dims()[1], b.dims()[0]),
            Layout::Nt => (b.dims()[0], b.dims()[1]),
        };
        if k != b_k {
            return Err(EngineError::shape(
                op,
                format!("inner dimensions differ: input {} and weight {} ({layout:?})", a.shape(), b.shape()),
            ));
        }
        if out.shape().rows() != m || out.shape().last() != n {
            return Err(EngineError::shape(op, format!("output has shape {}, expected [{m}, {n}]", out.shape())));
        }
        if let Some(bias) = bias {
            expect_dtype(op, "bias", bias, DType::F32)?;
            expect_dims(op, "bias", bias, &[n])?;
            flags |= FLAG_BIAS;
        }
        expect_distinct(op, out, &[a, b])?;
        // Unused bias binding: any read-only buffer will do.
        let bias = bias.unwrap_or(a);
        expect_distinct(op, out, &[bias])?;
        let p = params(m, n, k, flags);

        // Workgroups over (columns, rows) for a kernel whose workgroups each cover a tile of C.
        let tiles = |tile_n: usize, tile_m: usize| -> Result<(u32, u32)> {
            let (x, y) = (n.div_ceil(tile_n), m.div_ceil(tile_m));
            if x > 65_535 || y > 65_535 {
                return Err(EngineError::shape(op, format!("[{m}, {k}] x [{k}, {n}] needs too many workgroups")));
            }
            Ok((x as u32, y as u32))
        };
        match (b.dtype(), layout) {
            (DType::F32, _) if k % 4 == 0 && n % 4 == 0 => {
                let kernel = if layout == Layout::Nn { Kernel::MatmulNn } else { Kernel::MatmulNt };
                self.dispatch(kernel, &p, &[a, b, bias, out], tiles(MATMUL_TILE_N, MATMUL_TILE_M)?);
            }
            (DType::F32, _) => {
                let kernel = if layout == Layout::Nn { Kernel::MatmulScalarNn } else { Kernel::MatmulScalarNt };
                self.dispatch(kernel, &p, &[a, b, bias, out], tiles(SCALAR_TILE, SCALAR_TILE)?);
            }
            (DType::Q4_1 | DType::Q8_0, Layout::Nt) if m <= MATVEC_MAX_INPUT_ROWS => {
                let kernel = if b.dtype() == DType::Q4_1 { Kernel::MatvecQ4_1 } else { Kernel::MatvecQ8_0 };
                // No normalisation: `a` stands in for the norm weight.
                let grid = linear_grid(groups(n, MATVEC_ROWS_PER_WORKGROUP));
                self.dispatch_layers(kernel, &p_matvec(n, k, flags, 0.0), &[a, b, bias, a, out], grid, m as u32);
            }
            (DType::Q4_1 | DType::Q8_0, Layout::Nt) if n % 4 == 0 => {
                let kernel = if b.dtype() == DType::Q4_1 { Kernel::MatmulQ4_1 } else { Kernel::MatmulQ8_0 };
                self.dispatch(kernel, &p, &[a, b, bias, out], tiles(MATMUL_TILE_N, MATMUL_TILE_M)?);
            }
            (DType::Q4_1 | DType::Q8_0, Layout::Nt) => {
                return Err(EngineError::Unsupported {
                    op,
                    detail: format!("quantized weight {} with {m} input rows needs N to be a multiple of 4", b.shape()),
                });
            }
            (dtype, _) => {
                return Err(EngineError::Unsupported {
                    op,
                    detail: format!("weight dtype {dtype:?} with layout {layout:?} (quantized weights are [N, K])"),
                });
            }
        }
        Ok(())
    }

    /// Embedding lookup: `out[t, :] = table[ids[t], :]` for a F32, Q8_0 or Q4_1 table.
    /// Ids outside the table give zero rows; callers should reject them first.
    pub fn gather(&mut self, table: &Tensor, ids: &Tensor, out: &Tensor) -> Result<()> {
        let op = "gather";
        expect_dtype(op, "ids", ids, DType::U32)?;
        expect_dtype(op, "output", out, DType::F32)?;
        if table.shape().rank() != 2 {
            return Err(EngineError::shape(op, format!("table must be 2-D, got shape {}", table.shape())));
        }
        let (vocab, dim) = (table.dims()[0], table.dims()[1]);
        let tokens = ids.shape().elements();
        expect_dims(op, "output", out, &[tokens, dim])?;
        let kernel = match table.dtype() {
            DType::F32 => Kernel::GatherF32,
            DType::Q8_0 => Kernel::GatherQ8_0,
            DType::Q4_1 => Kernel::GatherQ4_1,
            DType::U32 => return Err(EngineError::DType { op, what: "table", got: DType::U32, expected: "F32, Q8_0 or Q4_1" }),
        };
        let p = params(tokens, dim, vocab, 0);
        self.dispatch(kernel, &p, &[ids, table, out], linear_grid(groups(tokens * dim, WORKGROUP)));
        Ok(())
    }

    /// `out = x / sqrt(mean(x^2) + eps) * weight`, per row.
    pub fn rms_norm(&mut self, x: &Tensor, weight: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
        self.norm("rms_norm", Kernel::RmsNorm, x, weight, None, eps, out)
    }

    /// `out = (x - mean) / sqrt(var + eps) * weight + bias`, per row.
    pub fn layer_norm(&mut self, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
        self.norm("layer_norm", Kernel::LayerNorm, x, weight, Some(bias), eps, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm(
        &mut self,
        op: &'static str,
        kernel: Kernel,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f32,
        out: &Tensor,
    ) -> Result<()> {
        for (what, t) in [("x", x), ("weight", weight), ("output", out)] {
            expect_dtype(op, what, t, DType::F32)?;
        }
        let dim = x.shape().last();
        expect_dims(op, "weight", weight, &[dim])?;
        expect_dims(op, "output", out, x.dims())?;
        expect_distinct(op, out, &[x, weight])?;
        let rows = x.shape().rows();
        let p = Params4 { a: rows as u32, b: dim as u32, c: eps.to_bits(), d: 0 };
        match bias {
            Some(bias) => {
                expect_dtype(op, "bias", bias, DType::F32)?;
                expect_dims(op, "bias", bias, &[dim])?;
                expect_distinct(op, out, &[bias])?;
                self.dispatch(kernel, &p, &[x, weight, bias, out], linear_grid(rows as u32));
            }
            None => self.dispatch(kernel, &p, &[x, weight, out], linear_grid(rows as u32)),
        }
        Ok(())
    }

    /// Softmax over each row of `x`, in place.
    pub fn softmax(&mut self, x: &Tensor) -> Result<()> {
        expect_dtype("softmax", "x", x, DType::F32)?;
        let rows = x.shape().rows();
        self.dispatch(Kernel::Softmax, &params(rows, x.shape().last(), 0, 0), &[x], linear_grid(rows as u32));
        Ok(())
    }

    /// Rotary embedding in place on `x` [tokens, heads, head_dim], GGUF llama layout (adjacent
    /// pairs), at `positions` [tokens] with frequency base `theta`.
    pub fn rope(&mut self, x: &Tensor, positions: &Tensor, theta: f32) -> Result<()> {
        let op = "rope";
        expect_dtype(op, "x", x, DType::F32)?;
        expect_dtype(op, "positions", positions, DType::U32)?;
        let [tokens, heads, head_dim] = x.dims() else {
            return Err(EngineError::shape(op, format!("x must be [tokens, heads, head_dim], got {}", x.shape())));
        };
        check_rope(op, *head_dim, theta)?;
        expect_dims(op, "positions", positions, &[*tokens])?;
        let p = RopeParams::new(*tokens, *heads, *head_dim, theta);
        self.dispatch(Kernel::Rope, &p, &[positions, x], linear_grid(groups(tokens * heads * head_dim / 2, WORKGROUP)));
        Ok(())
    }

    /// `out = silu(gate) * up`, element-wise.
    pub fn silu_mul(&mut self, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
        self.elementwise("silu_mul", Kernel::SiluMul, &[("gate", gate), ("up", up)], out)
    }

    /// `out = gelu(x)` (the exact, erf-based form), element-wise.
    pub fn gelu(&mut self, x: &Tensor, out: &Tensor) -> Result<()> {
        self.elementwise("gelu", Kernel::Gelu, &[("x", x)], out)
    }

    /// `out = a + b`, element-wise.
    pub fn add(&mut self, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
        self.elementwise("add", Kernel::Add, &[("a", a), ("b", b)], out)
    }

    fn elementwise(&mut self, op: &'static str, kernel: Kernel, inputs: &[(&str, &Tensor)], out: &Tensor) -> Result<()> {
        let mut all = inputs.to_vec();
        all.push(("output", out));
        for &(_, t) in &all {
            if t.dtype() != DType::F32 {
                return Err(EngineError::DType { op, what: "operand", got: t.dtype(), expected: "F32" });
            }
        }
        expect_same_elements(op, &all)?;
        let tensors: Vec<&Tensor> = all.iter().map(|&(_, t)| t).collect();
        expect_distinct(op, out, &tensors[..inputs.len()])?;
        let len = out.shape().elements();
        self.dispatch(kernel, &params(len, 0, 0, 0), &tensors, linear_grid(groups(len, WORKGROUP)));
        Ok(())
    }

    /// Attention: `q` [batch, queries, heads, head_dim] over a KV cache `k`, `v`
    /// [batch, capacity, kv_heads, head_dim]; `mask` [batch, capacity] (u32, 0 = padding) is
    /// optional. Grouped-query heads share kv heads. Writes `out`, shaped like `q`.
    pub fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        out: &Tensor,
        attn: AttentionParams,
    ) -> Result<()> {
        let op = "attention";
        for (what, t) in [("q", q), ("k", k), ("v", v), ("output", out)] {
            expect_dtype(op, what, t, DType::F32)?;
        }
        let [batch, queries, heads, head_dim] = q.dims() else {
            return Err(EngineError::shape(op, format!("q must be [batch, queries, heads, head_dim], got {}", q.shape())));
        };
        let [k_batch, capacity, kv_heads, k_dim] = k.dims() else {
            return Err(EngineError::shape(op, format!("k must be [batch, capacity, kv_heads, head_dim], got {}", k.shape())));
        };
        let (batch, queries, heads, head_dim, capacity, kv_heads) = (*batch, *queries, *heads, *head_dim, *capacity, *kv_heads);
        if *k_batch != batch || *k_dim != head_dim || heads % kv_heads != 0 {
            return Err(EngineError::shape(op, format!("q {} does not fit k {}", q.shape(), k.shape())));
        }
        expect_dims(op, "v", v, k.dims())?;
        expect_dims(op, "output", out, q.dims())?;
        if head_dim % 4 != 0 || head_dim > 256 {
            return Err(EngineError::Unsupported { op, detail: format!("head_dim {head_dim} (must be a multiple of 4, at most 256)") });
        }
        if attn.kv_len == 0 || attn.kv_len > capacity {
            return Err(EngineError::shape(op, format!("kv_len {} is outside the cache's 1..={capacity}", attn.kv_len)));
        }
        if attn.causal && attn.past + queries > attn.kv_len {
            return Err(EngineError::shape(
                op,
                format!("causal queries at positions {}..{} reach past kv_len {}", attn.past, attn.past + queries, attn.kv_len),
            ));
        }
        let mut flags = if attn.causal { ATTENTION_CAUSAL } else { 0 };
        if let Some(mask) = mask {
            expect_dtype(op, "mask", mask, DType::U32)?;
            expect_dims(op, "mask", mask, &[batch, capacity])?;
            flags |= ATTENTION_MASK;
        }
        let mask = mask.unwrap_or(q);
        expect_distinct(op, out, &[q, k, v, mask])?;
        let p = AttentionGpuParams {
            batch: batch as u32,
            queries: queries as u32,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            capacity: capacity as u32,
            kv_len: attn.kv_len as u32,
            past: attn.past as u32,
            scale: attn.scale,
            flags,
            pad: [0; 2],
        };
        self.dispatch(Kernel::Attention, &p, &[q, k, v, mask, out], linear_grid((batch * queries * heads) as u32));
        Ok(())
    }

    /// Sentence embeddings: the mean of each sequence's unmasked rows of `x` [batch, seq, dim]
    /// (`mask` [batch, seq], u32, 0 = padding), L2-normalised, into `out` [batch, dim].
    pub fn mean_pool_l2(&mut self, x: &Tensor, mask: &Tensor, out: &Tensor) -> Result<()> {
        let op = "mean_pool_l2";
        expect_dtype(op, "x", x, DType::F32)?;
        expect_dtype(op, "mask", mask, DType::U32)?;
        expect_dtype(op, "output", out, DType::F32)?;
        let [batch, seq, dim] = x.dims() else {
            return Err(EngineError::shape(op, format!("x must be [batch, seq, dim], got {}", x.shape())));
        };
        expect_dims(op, "mask", mask, &[*batch, *seq])?;
        expect_dims(op, "output", out, &[*batch, *dim])?;
        expect_distinct(op, out, &[x, mask])?;
        self.dispatch(Kernel::MeanPoolL2, &params(*batch, *seq, *dim, 0), &[x, mask, out], linear_grid(*batch as u32));
        Ok(())
    }

    /// Reads all of `data` as fast as the adapter can, one partial sum per workgroup into `sums`:
    /// the read-bandwidth yardstick of the benchmarks.
    pub fn stream_read(&mut self, data: &Tensor, sums: &Tensor) -> Result<()> {
        let op = "stream_read";
        expect_dtype(op, "data", data, DType::F32)?;
        expect_dtype(op, "sums", sums, DType::F32)?;
        let len = data.shape().elements();
        if !len.is_multiple_of(4) {
            return Err(EngineError::shape(op, format!("data has {len} elements, not a multiple of 4")));
        }
        expect_distinct(op, sums, &[data])?;
        let workgroups = sums.shape().elements() as u32;
        self.dispatch(Kernel::StreamRead, &params(len / 4, 0, 0, 0), &[data, sums], linear_grid(workgroups));
        Ok(())
    }
}

/// The matvec kernels' parameters: `n`, `k`, `flags` and the fused normalisation's `eps`.
pub(crate) fn p_matvec(n: usize, k: usize, flags: u32, eps: f32) -> Params4 {
    Params4 { a: n as u32, b: k as u32, c: flags, d: eps.to_bits() }
}
