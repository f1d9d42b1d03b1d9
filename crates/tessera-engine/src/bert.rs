//! BERT encoders from safetensors (all-MiniLM-L6-v2 and its family) producing sentence
//! embeddings: token, position and type embeddings, post-norm transformer layers with
//! bidirectional attention under a padding mask, then mean pooling and L2 normalisation.

use std::io::{Read, Seek};

use serde::Deserialize;

use crate::batch::Batch;
use crate::error::{EngineError, ModelError};
use crate::gpu::Gpu;
use crate::ops::AttentionParams;
use crate::safetensors::SafeTensors;
use crate::tensor::{DType, Tensor};

/// The fields of a Hugging Face `config.json` that the encoder needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: String,
}

fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn from_json(file: &str, json: &[u8]) -> Result<BertConfig, ModelError> {
        let config: BertConfig = serde_json::from_slice(json).map_err(|e| ModelError::invalid(file, format!("not a BERT config: {e}")))?;
        if config.model_type != "bert" || config.hidden_act != "gelu" {
            return Err(ModelError::invalid(file, format!("model type {:?} with activation {:?} is not supported (bert with gelu is)", config.model_type, config.hidden_act)));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(ModelError::invalid(file, format!("{} heads do not divide hidden size {}", config.num_attention_heads, config.hidden_size)));
        }
        Ok(config)
    }
}

struct Layer {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    o: (Tensor, Tensor),
    attn_norm: (Tensor, Tensor),
    up: (Tensor, Tensor),
    down: (Tensor, Tensor),
    out_norm: (Tensor, Tensor),
}

pub struct Bert {
    pub config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: (Tensor, Tensor),
    layers: Vec<Layer>,
}

impl Bert {
    /// Loads the weights in `source` (safetensors, named `file` in errors), one tensor at a time.
    pub fn load<R: Read + Seek>(gpu: &Gpu, config: BertConfig, file: &str, source: &mut R) -> Result<Bert, ModelError> {
        let st = SafeTensors::read(file, source)?;
        let (h, f) = (config.hidden_size, config.intermediate_size);
        let mut load = |name: &str, dims: &[usize]| -> Result<Tensor, ModelError> {
            let values = st.read_f32(file, source, name, dims)?;
            Ok(gpu.upload_weights(dims, DType::F32, bytemuck::cast_slice(&values))?)
        };
        let word = load("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = load("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?;
        let token_type = load("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?;
        let embed_norm = (load("embeddings.LayerNorm.weight", &[h])?, load("embeddings.LayerNorm.bias", &[h])?);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut pair = |name: &str, dims: &[usize]| -> Result<(Tensor, Tensor), ModelError> {
                let prefix = format!("encoder.layer.{i}.{name}");
                let bias_dims = if name.ends_with("LayerNorm") { dims } else { &dims[..1] };
                Ok((load(&format!("{prefix}.weight"), dims)?, load(&format!("{prefix}.bias"), bias_dims)?))
            };
            layers.push(Layer {
                q: pair("attention.self.query", &[h, h])?,
                k: pair("attention.self.key", &[h, h])?,
                v: pair("attention.self.value", &[h, h])?,
                o: pair("attention.output.dense", &[h, h])?,
                attn_norm: pair("attention.output.LayerNorm", &[h])?,
                up: pair("intermediate.dense", &[f, h])?,
                down: pair("output.dense", &[h, f])?,
                out_norm: pair("output.LayerNorm", &[h])?,
            });
        }
        Ok(Bert { config, word, position, token_type, embed_norm, layers })
    }

    /// Records the encoder for `ids` [batch, seq] (u32, padded) with `mask` [batch, seq] (u32,
    /// 0 = padding), writing L2-normalised sentence embeddings to `out` [batch, hidden].
    pub fn forward(&self, batch: &mut Batch<'_>, ids: &Tensor, mask: &Tensor, out: &Tensor) -> Result<(), EngineError> {
        let c = &self.config;
        let gpu = batch.gpu();
        let [sentences, seq] = ids.dims() else {
            return Err(EngineError::shape("bert", format!("ids must be [batch, seq], got {}", ids.shape())));
        };
        let (sentences, seq, h) = (*sentences, *seq, c.hidden_size);
        if seq > c.max_position_embeddings {
            return Err(EngineError::shape("bert", format!("{seq} tokens exceed the model's {} positions", c.max_position_embeddings)));
        }
        let rows = sentences * seq;
        let heads = c.num_attention_heads;
        let positions: Vec<u32> = (0..rows).map(|r| (r % seq) as u32).collect();
        let positions = gpu.upload_u32(&[rows], &positions)?;
        let types = gpu.upload_u32(&[rows], &vec![0; rows])?;
        let flat_ids = ids.view(&[rows])?;

        let x = gpu.empty(&[rows, h], DType::F32)?;
        let y = gpu.empty(&[rows, h], DType::F32)?;
        let scratch = gpu.empty(&[rows, h], DType::F32)?;
        batch.gather(&self.word, &flat_ids, &x)?;
        batch.gather(&self.position, &positions, &scratch)?;
        batch.add(&x, &scratch, &y)?;
        batch.gather(&self.token_type, &types, &scratch)?;
        batch.add(&y, &scratch, &x)?;
        batch.layer_norm(&x, &self.embed_norm.0, &self.embed_norm.1, c.layer_norm_eps, &y)?;

        let head_dim = h / heads;
        let shape4 = [sentences, seq, heads, head_dim];
        let (q, k, v) = (gpu.empty(&shape4, DType::F32)?, gpu.empty(&shape4, DType::F32)?, gpu.empty(&shape4, DType::F32)?);
        let attended = gpu.empty(&shape4, DType::F32)?;
        let (q2, k2, v2, attended2) = (q.view(&[rows, h])?, k.view(&[rows, h])?, v.view(&[rows, h])?, attended.view(&[rows, h])?);
        let inner = gpu.empty(&[rows, c.intermediate_size], DType::F32)?;
        let activated = gpu.empty(&[rows, c.intermediate_size], DType::F32)?;
        let attention = AttentionParams { causal: false, past: 0, kv_len: seq, scale: 1.0 / (head_dim as f32).sqrt() };
        // `y` holds the layer input; `x` the residual sum after attention.
        for layer in &self.layers {
            batch.linear(&y, &layer.q.0, Some(&layer.q.1), &q2, false)?;
            batch.linear(&y, &layer.k.0, Some(&layer.k.1), &k2, false)?;
            batch.linear(&y, &layer.v.0, Some(&layer.v.1), &v2, false)?;
            batch.attention(&q, &k, &v, Some(mask), &attended, attention)?;
            batch.linear(&attended2, &layer.o.0, Some(&layer.o.1), &y, true)?;
            batch.layer_norm(&y, &layer.attn_norm.0, &layer.attn_norm.1, c.layer_norm_eps, &x)?;
            batch.linear(&x, &layer.up.0, Some(&layer.up.1), &inner, false)?;
            batch.gelu(&inner, &activated)?;
            batch.linear(&activated, &layer.down.0, Some(&layer.down.1), &x, true)?;
            batch.layer_norm(&x, &layer.out_norm.0, &layer.out_norm.1, c.layer_norm_eps, &y)?;
        }
        batch.mean_pool_l2(&y.view(&[sentences, seq, h])?, mask, out)
    }

    /// Embeds tokenized sentences: pads them into one batch, runs it, reads back one
    /// L2-normalised vector per sentence.
    pub async fn embed(&self, gpu: &Gpu, sentences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let seq = sentences.iter().map(Vec::len).max().unwrap_or(0);
        if seq == 0 {
            return Err(EngineError::shape("bert", "nothing to embed: no tokens"));
        }
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = sentences.iter().flatten().find(|&&id| id >= vocab) {
            return Err(EngineError::shape("bert", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let mut ids = vec![0u32; sentences.len() * seq];
        let mut mask = vec![0u32; sentences.len() * seq];
        for (i, sentence) in sentences.iter().enumerate() {
            ids[i * seq..][..sentence.len()].copy_from_slice(sentence);
            mask[i * seq..][..sentence.len()].fill(1);
        }
        let ids = gpu.upload_u32(&[sentences.len(), seq], &ids)?;
        let mask = gpu.upload_u32(&[sentences.len(), seq], &mask)?;
        let out = gpu.empty(&[sentences.len(), self.config.hidden_size], DType::F32)?;
        let mut batch = gpu.batch();
        self.forward(&mut batch, &ids, &mask, &out)?;
        batch.submit();
        let flat = gpu.read_f32(&out).await?;
        Ok(flat.chunks(self.config.hidden_size).map(<[f32]>::to_vec).collect())
    }
}
