//! Llama-architecture language models from GGUF (SmolLM2 and its family), run as a sequence of
//! stages: the token embedding, spans of transformer blocks `[a, b)`, and the head. A span takes a
//! hidden-state tensor [tokens, dim] plus positions, keeps its own KV cache per session, and gives
//! back a hidden-state tensor; running spans one after another is the whole model.

use std::io::{Read, Seek};
use std::ops::Range;

use crate::batch::Batch;
use crate::error::{EngineError, ModelError};
use crate::gguf::{Gguf, TensorInfo, TensorType, Value};
use crate::gpu::Gpu;
use crate::ops::AttentionParams;
use crate::quant;
use crate::tensor::{DType, Tensor};

/// The hyper-parameters, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub blocks: usize,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub eps: f32,
    pub rope_theta: f32,
}

impl LlamaConfig {
    pub fn from_gguf(file: &str, gguf: &Gguf) -> Result<LlamaConfig, ModelError> {
        let invalid = |problem: String| ModelError::Invalid { file: file.to_string(), problem };
        let arch = gguf.get("general.architecture").and_then(Value::as_str).unwrap_or("(none)");
        if arch != "llama" {
            return Err(invalid(format!("architecture {arch:?} is not supported (llama is)")));
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            let full = format!("llama.{key}");
            gguf.get(&full).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| invalid(format!("metadata {full} is missing or not an integer")))
        };
        let float = |key: &str, default: f32| gguf.get(&format!("llama.{key}")).and_then(Value::as_f32).unwrap_or(default);
        let dim = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = gguf.get("llama.attention.head_count_kv").and_then(Value::as_u64).map_or(heads, |v| v as usize);
        let vocab = match gguf.get("llama.vocab_size").and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => gguf.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len).ok_or_else(|| invalid("no vocabulary size".into()))?,
        };
        let config = LlamaConfig {
            blocks: int("block_count")?,
            dim,
            heads,
            kv_heads,
            head_dim: dim.checked_div(heads).unwrap_or(0),
            ffn: int("feed_forward_length")?,
            vocab,
            context: int("context_length")?,
            eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: float("rope.freq_base", 10_000.0),
        };
        if heads == 0 || kv_heads == 0 || dim % heads != 0 || heads % kv_heads != 0 || config.blocks == 0 {
            return Err(invalid(format!("inconsistent shape: {config:?}")));
        }
        Ok(config)
    }
}

struct Block {
    attn_norm: Tensor,
    /// The q, k and v projections stacked row-wise into one weight [q_dim + 2 kv_dim, dim], so
    /// one kernel computes all three.
    qkv: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A loaded model: any subset of its stages may be present (a contributor loads only its span).
pub struct Llama {
    pub config: LlamaConfig,
    embedding: Option<Tensor>,
    blocks: Vec<Option<Block>>,
    output_norm: Option<Tensor>,
    /// `None` when the head is tied to the embedding.
    output: Option<Tensor>,
}

/// What to load: the embedding and head, and which blocks.
#[derive(Clone, Debug)]
pub struct Stages {
    pub embedding: bool,
    pub blocks: Range<usize>,
    pub head: bool,
}

impl Stages {
    /// The whole model.
    pub fn all() -> Stages {
        Stages { embedding: true, blocks: 0..usize::MAX, head: true }
    }
}

/// One generation session's KV cache for the blocks of a span.
pub struct KvCache {
    blocks: Range<usize>,
    capacity: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Tokens already in the cache.
    pub len: usize,
}

impl Llama {
    /// Loads `stages` of the model in `source` (named `file` in errors), one tensor at a time.
    /// Blocks past the model's last are ignored, so `0..usize::MAX` means all of them.
    pub fn load<R: Read + Seek>(gpu: &Gpu, file: &str, source: &mut R, stages: &Stages) -> Result<Llama, ModelError> {
        let gguf = Gguf::read(file, source)?;
        let config = LlamaConfig::from_gguf(file, &gguf)?;
        if stages.blocks.start > stages.blocks.end.min(config.blocks) {
            return Err(ModelError::Invalid { file: file.into(), problem: format!("blocks {:?} outside 0..{}", stages.blocks, config.blocks) });
        }
        let c = &config;
        let (kv_dim, q_dim) = (c.kv_heads * c.head_dim, c.heads * c.head_dim);
        let tied = gguf.tensor("output.weight").is_none();
        let embedding = if stages.embedding || (stages.head && tied) { Some(load_tensor(gpu, file, source, &gguf, "token_embd.weight", &[c.vocab, c.dim])?) } else { None };
        let mut blocks = Vec::with_capacity(c.blocks);
        for i in 0..c.blocks {
            if !stages.blocks.contains(&i) {
                blocks.push(None);
                continue;
            }
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            let (q, k, v) = (name("attn_q"), name("attn_k"), name("attn_v"));
            let qkv = load_stacked(gpu, file, source, &gguf, &[(&q, q_dim), (&k, kv_dim), (&v, kv_dim)], &[q_dim + 2 * kv_dim, c.dim])?;
            let mut w = |part: &str, dims: &[usize]| load_tensor(gpu, file, source, &gguf, &name(part), dims);
            blocks.push(Some(Block {
                attn_norm: w("attn_norm", &[c.dim])?,
                qkv,
                o: w("attn_output", &[c.dim, q_dim])?,
                ffn_norm: w("ffn_norm", &[c.dim])?,
                gate: w("ffn_gate", &[c.ffn, c.dim])?,
                up: w("ffn_up", &[c.ffn, c.dim])?,
                down: w("ffn_down", &[c.dim, c.ffn])?,
            }));
        }
        let output_norm = if stages.head { Some(load_tensor(gpu, file, source, &gguf, "output_norm.weight", &[c.dim])?) } else { None };
        let output = if stages.head && !tied { Some(load_tensor(gpu, file, source, &gguf, "output.weight", &[c.vocab, c.dim])?) } else { None };
        Ok(Llama { config, embedding, blocks, output_norm, output })
    }

    /// A KV cache for `blocks` holding up to `capacity` tokens.
    pub fn kv_cache(&self, gpu: &Gpu, blocks: Range<usize>, capacity: usize) -> Result<KvCache, EngineError> {
        if blocks.start > blocks.end || blocks.end > self.config.blocks {
            return Err(EngineError::Shape { op: "llama", detail: format!("a cache for blocks {blocks:?} of a model with {}", self.config.blocks) });
        }
        let dims = [1, capacity, self.config.kv_heads, self.config.head_dim];
        let k = blocks.clone().map(|_| gpu.empty(&dims, DType::F32)).collect::<Result<_, _>>()?;
        let v = blocks.clone().map(|_| gpu.empty(&dims, DType::F32)).collect::<Result<_, _>>()?;
        Ok(KvCache { blocks, capacity, k, v, len: 0 })
    }

    fn stage<'t, T>(tensor: &'t Option<T>, what: &str) -> Result<&'t T, EngineError> {
        tensor.as_ref().ok_or_else(|| EngineError::Unsupported { op: "llama", detail: format!("the {what} is not loaded here") })
    }

    /// The embedding stage: hidden states [tokens, dim] for token `ids` [tokens] (u32).
    pub fn embed(&self, batch: &mut Batch<'_>, ids: &Tensor, out: &Tensor) -> Result<(), EngineError> {
        batch.gather(Self::stage(&self.embedding, "embedding")?, ids, out)
    }

    /// Runs the cache's blocks over `hidden` [tokens, dim] in place, for tokens at positions
    /// `cache.len..` (`positions` holds them as u32), and appends to the cache.
    pub fn forward_span(&self, batch: &mut Batch<'_>, hidden: &Tensor, positions: &Tensor, cache: &mut KvCache) -> Result<(), EngineError> {
        let c = &self.config;
        let gpu = batch.gpu();
        let tokens = hidden.shape().rows();
        if cache.len + tokens > cache.capacity {
            return Err(EngineError::shape("llama", format!("{} cached + {tokens} new tokens exceed the cache's {}", cache.len, cache.capacity)));
        }
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let qkv = gpu.empty(&[tokens, q_dim + 2 * kv_dim], DType::F32)?;
        let q = gpu.empty(&[tokens, c.heads, c.head_dim], DType::F32)?;
        let attended = gpu.empty(&[1, tokens, c.heads, c.head_dim], DType::F32)?;
        let activated = gpu.empty(&[tokens, c.ffn], DType::F32)?;
        let (q4, attended2) = (q.view(&[1, tokens, c.heads, c.head_dim])?, attended.view(&[tokens, q_dim])?);
        let attention = AttentionParams { causal: true, past: cache.len, kv_len: cache.len + tokens, scale: 1.0 / (c.head_dim as f32).sqrt() };
        // Six kernels a block for one token (see `fused.rs`); a prompt's rows take ten.
        for (slot, index) in cache.blocks.clone().enumerate() {
            let block = Self::stage(&self.blocks[index], "block")?;
            let (k_cache, v_cache) = (&cache.k[slot], &cache.v[slot]);
            batch.norm_linear(hidden, &block.attn_norm, c.eps, &block.qkv, &qkv, false)?;
            batch.rope_qkv(&qkv, positions, c.rope_theta, &q, k_cache, v_cache, cache.len)?;
            batch.attention(&q4, k_cache, v_cache, None, &attended, attention)?;
            batch.linear(&attended2, &block.o, None, hidden, true)?;
            batch.norm_glu(hidden, &block.ffn_norm, c.eps, &block.gate, &block.up, &activated)?;
            batch.linear(&activated, &block.down, None, hidden, true)?;
        }
        cache.len += tokens;
        Ok(())
    }

    /// [`Llama::forward_span`] for several sessions at once: `hidden` stacks their rows in the
    /// order of `sessions`, each of which gives its rows' positions [rows] (u32) and its cache
    /// (all for the same blocks). The linear layers read each weight once for all the rows; rope,
    /// the cache append and attention run per session on its own rows (copied out of and back
    /// into the stacked tensors). With at most eight rows in all (the matvec path, where each
    /// row's reduction is its own) every session's rows come out as they would alone.
    pub fn forward_spans(&self, batch: &mut Batch<'_>, hidden: &Tensor, sessions: &mut [(&Tensor, &mut KvCache)]) -> Result<(), EngineError> {
        if let [(positions, cache)] = sessions {
            return self.forward_span(batch, hidden, positions, cache);
        }
        let c = &self.config;
        let gpu = batch.gpu();
        let total = hidden.shape().rows();
        let rows: Vec<usize> = sessions.iter().map(|(positions, _)| positions.shape().elements()).collect();
        if sessions.is_empty() || rows.iter().sum::<usize>() != total {
            return Err(EngineError::shape("llama", format!("sessions of {rows:?} rows do not stack to the {total} rows of {}", hidden.shape())));
        }
        let blocks = sessions[0].1.blocks.clone();
        for ((_, cache), &r) in sessions.iter().zip(&rows) {
            if cache.blocks != blocks || cache.len + r > cache.capacity {
                return Err(EngineError::shape(
                    "llama",
                    format!("a cache for blocks {:?} holding {} of {} cannot take {r} tokens beside blocks {blocks:?}", cache.blocks, cache.len, cache.capacity),
                ));
            }
        }
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let width = q_dim + 2 * kv_dim;
        let qkv = gpu.empty(&[total, width], DType::F32)?;
        let attended = gpu.empty(&[total, q_dim], DType::F32)?;
        let activated = gpu.empty(&[total, c.ffn], DType::F32)?;
        // Each session's own rows: its slice of qkv, its q and its attention output.
        struct Part {
            offset: usize,
            rows: usize,
            qkv: Tensor,
            q: Tensor,
            q4: Tensor,
            attended: Tensor,
            attention: AttentionParams,
        }
        let mut parts = Vec::with_capacity(sessions.len());
        let mut offset = 0;
        for ((_, cache), &rows) in sessions.iter().zip(&rows) {
            let q = gpu.empty(&[rows, c.heads, c.head_dim], DType::F32)?;
            parts.push(Part {
                offset,
                rows,
                qkv: gpu.empty(&[rows, width], DType::F32)?,
                q4: q.view(&[1, rows, c.heads, c.head_dim])?,
                q,
                attended: gpu.empty(&[1, rows, c.heads, c.head_dim], DType::F32)?,
                attention: AttentionParams { causal: true, past: cache.len, kv_len: cache.len + rows, scale: 1.0 / (c.head_dim as f32).sqrt() },
            });
            offset += rows;
        }
        for (slot, index) in blocks.enumerate() {
            let block = Self::stage(&self.blocks[index], "block")?;
            batch.norm_linear(hidden, &block.attn_norm, c.eps, &block.qkv, &qkv, false)?;
            // The copies grouped, since each one ends the compute pass.
            for part in &parts {
                batch.copy(&qkv, part.offset * width, &part.qkv, 0, part.rows * width)?;
            }
            for (part, (positions, cache)) in parts.iter().zip(sessions.iter()) {
                let (k_cache, v_cache) = (&cache.k[slot], &cache.v[slot]);
                batch.rope_qkv(&part.qkv, positions, c.rope_theta, &part.q, k_cache, v_cache, cache.len)?;
                batch.attention(&part.q4, k_cache, v_cache, None, &part.attended, part.attention)?;
            }
            for part in &parts {
                batch.copy(&part.attended, 0, &attended, part.offset * q_dim, part.rows * q_dim)?;
            }
            batch.linear(&attended, &block.o, None, hidden, true)?;
            batch.norm_glu(hidden, &block.ffn_norm, c.eps, &block.gate, &block.up, &activated)?;
            batch.linear(&activated, &block.down, None, hidden, true)?;
        }
        for ((_, cache), &r) in sessions.iter_mut().zip(&rows) {
            cache.len += r;
        }
        Ok(())
    }

    /// The head: final norm and logits [tokens, vocab] for `hidden` [tokens, dim].
    pub fn head(&self, batch: &mut Batch<'_>, hidden: &Tensor, logits: &Tensor) -> Result<(), EngineError> {
        let weight = match &self.output {
            Some(output) => output,
            None => Self::stage(&self.embedding, "tied embedding")?,
        };
        batch.norm_linear(hidden, Self::stage(&self.output_norm, "output norm")?, self.config.eps, weight, logits, false)
    }
}

impl KvCache {
    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Llama {
    /// The head over the last row of `hidden` only: the logits [1, vocab] that pick the next token.
    pub fn last_logits(&self, batch: &mut Batch<'_>, hidden: &Tensor, logits: &Tensor) -> Result<(), EngineError> {
        let dim = self.config.dim;
        let rows = hidden.shape().rows();
        if rows == 1 {
            return self.head(batch, hidden, logits);
        }
        let last = batch.gpu().empty(&[1, dim], DType::F32)?;
        batch.copy(hidden, (rows - 1) * dim, &last, 0, dim)?;
        self.head(batch, &last, logits)
    }
}

/// Reads tensor `name`, checks it has `dims` (engine order: [rows, cols]), and uploads it in the
/// engine's layout.
fn load_tensor<R: Read + Seek>(gpu: &Gpu, file: &str, source: &mut R, gguf: &Gguf, name: &str, dims: &[usize]) -> Result<Tensor, ModelError> {
    let (dtype, bytes) = tensor_bytes(file, source, gguf, name, dims)?;
    Ok(gpu.upload_weights(dims, dtype, &bytes)?)
}

/// Reads the 2-D tensors `parts` (name and row count) and uploads their rows stacked into one
/// weight of `dims`, so one kernel computes what would take one per part; they must share a type.
fn load_stacked<R: Read + Seek>(
    gpu: &Gpu,
    file: &str,
    source: &mut R,
    gguf: &Gguf,
    parts: &[(&str, usize)],
    dims: &[usize],
) -> Result<Tensor, ModelError> {
    let mut stacked = Vec::new();
    let mut stacked_type = None;
    for &(name, rows) in parts {
        let (dtype, bytes) = tensor_bytes(file, source, gguf, name, &[rows, dims[1]])?;
        if stacked_type.is_some_and(|t| t != dtype) {
            return Err(ModelError::Invalid {
                file: file.into(),
                problem: format!("{name} is {dtype:?} but the tensors stacked with it are {stacked_type:?}; they must match"),
            });
        }
        stacked_type = Some(dtype);
        stacked.extend_from_slice(&bytes);
    }
    debug_assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), dims[0]);
    Ok(gpu.upload_weights(dims, stacked_type.unwrap_or(DType::F32), &stacked)?)
}

/// Reads tensor `name`, checks it has `dims`, and converts it to the engine's layout: the dtype
/// and bytes to upload.
fn tensor_bytes<R: Read + Seek>(file: &str, source: &mut R, gguf: &Gguf, name: &str, dims: &[usize]) -> Result<(DType, Vec<u8>), ModelError> {
    let invalid = |problem: String| ModelError::Invalid { file: file.to_string(), problem };
    let info: &TensorInfo = gguf.tensor(name).ok_or_else(|| invalid(format!("tensor {name} is missing")))?;
    let gguf_dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
    if gguf_dims != dims {
        return Err(invalid(format!("tensor {name} has shape {gguf_dims:?}, expected {dims:?}")));
    }
    let bytes = gguf.read_tensor(file, source, info)?;
    Ok(match info.ty {
        TensorType::F32 => (DType::F32, bytes),
        TensorType::Q4_1 => (DType::Q4_1, bytes),
        TensorType::Q8_0 => (DType::Q8_0, quant::repack_q8_0(&bytes)?),
        TensorType::F16 if dims.len() == 1 => {
            let values: Vec<f32> = bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            (DType::F32, bytemuck::cast_slice(&values).to_vec())
        }
        other => return Err(invalid(format!("tensor {name} has type {other:?}, which the engine cannot run yet"))),
    })
}
