//! Llama-family models in the page: loading chosen stages from GGUF bytes, and running token ids
//! through a chain of block spans, each span with its own KV cache and the activations read back
//! to the CPU between spans, as they cross the network between contributors. On that chain:
//! teacher-forced logits, greedy decoding, and a timing of prefill and decode.

use std::rc::Rc;

use js_sys::Uint8Array;
use serde::{Deserialize, Serialize};
use tessera_engine::generate::Sampler;
use tessera_engine::gguf::Gguf;
use tessera_engine::llama::{KvCache, Llama, LlamaConfig, Stages};
use tessera_engine::{DType, EngineError, Gpu};
use wasm_bindgen::prelude::*;

use crate::bytes::JsBytes;
use crate::{check_device, from_json, js_error, now_ms, to_json};

/// Which stages to load.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StagesRequest {
    embedding: bool,
    /// Blocks `[a, b)`.
    blocks: [usize; 2],
    head: bool,
}

#[derive(Serialize)]
struct Described {
    blocks: usize,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    context: usize,
    loaded: LoadedStages,
}

#[derive(Serialize)]
struct LoadedStages {
    embedding: bool,
    blocks: [usize; 2],
    head: bool,
}

/// Token ids through the chain of `spans` (each `[a, b)`), logits at every position.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeacherForcedRequest {
    ids: Vec<u32>,
    spans: Vec<[usize; 2]>,
    /// Per position, the token ids whose logits to return (may be shorter than `ids`).
    #[serde(default)]
    requested: Vec<Vec<u32>>,
}

#[derive(Serialize)]
struct Position {
    top1: u32,
    /// The logits of the position's requested ids, in their order.
    logits: Vec<f32>,
}

#[derive(Serialize)]
struct TeacherForced {
    positions: Vec<Position>,
    submits: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GreedyRequest {
    prompt: Vec<u32>,
    tokens: usize,
    spans: Vec<[usize; 2]>,
}

#[derive(Serialize)]
struct Greedy {
    ids: Vec<u32>,
    /// Per generated token after the first (the decode steps).
    submits_per_token: f64,
    dispatches_per_token: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchRequest {
    prompt_tokens: usize,
    decode_tokens: usize,
}

#[derive(Serialize)]
struct Bench {
    prompt_tokens: usize,
    decode_tokens: usize,
    /// The first prefill, which compiles the pipelines.
    cold_prefill_ms: f64,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
    submits_per_token: f64,
    dispatches_per_token: f64,
}

/// Some stages of a llama-family model on the page's GPU.
#[wasm_bindgen]
pub struct LlamaModel {
    gpu: Rc<Gpu>,
    model: Llama,
    stages: Stages,
}

impl LlamaModel {
    pub(crate) fn load(gpu: Rc<Gpu>, name: &str, bytes: &Uint8Array, stages: &str) -> Result<LlamaModel, JsError> {
        let request: StagesRequest = from_json("stages", stages)?;
        let mut source = JsBytes::reader(bytes);
        let config = LlamaConfig::from_gguf(name, &Gguf::read(name, &mut source).map_err(js_error)?).map_err(js_error)?;
        let [start, end] = request.blocks;
        if start > end || end > config.blocks {
            return Err(js_error(format!("{name}: blocks [{start}, {end}) are not a span of the model's {} blocks", config.blocks)));
        }
        if !request.embedding && !request.head && start == end {
            return Err(js_error(format!("{name}: no stages to load (no embedding, no blocks, no head)")));
        }
        let stages = Stages { embedding: request.embedding, blocks: start..end, head: request.head };
        let model = Llama::load(&gpu, name, &mut source, &stages).map_err(js_error)?;
        Ok(LlamaModel { gpu, model, stages })
    }

    /// A session on `spans`, which must run every block in order and be loaded here, for up to
    /// `capacity` tokens.
    fn chain(&self, spans: &[[usize; 2]], capacity: usize) -> Result<Chain, JsError> {
        let c = &self.model.config;
        let s = &self.stages;
        if !s.embedding || !s.head {
            return Err(js_error(format!("token ids to logits needs the embedding and the head; loaded: {s:?}")));
        }
        let mut next = 0;
        for &[start, end] in spans {
            if start != next || end <= start || end > c.blocks {
                return Err(js_error(format!("spans {spans:?} do not run blocks 0..{} in order, each at least one block", c.blocks)));
            }
            if start < s.blocks.start || end > s.blocks.end {
                return Err(js_error(format!("span [{start}, {end}) is not loaded here (blocks {:?} are)", s.blocks)));
            }
            next = end;
        }
        if next != c.blocks {
            return Err(js_error(format!("spans {spans:?} do not run blocks 0..{} in order, each at least one block", c.blocks)));
        }
        if capacity > c.context {
            return Err(js_error(format!("{capacity} tokens exceed the model's context of {}", c.context)));
        }
        let caches = spans.iter().map(|&[start, end]| self.model.kv_cache(&self.gpu, start..end, capacity)).collect::<Result<_, _>>().map_err(js_error)?;
        Ok(Chain { caches, submits: 0, dispatches: 0 })
    }

    fn check_ids(&self, what: &str, ids: &[u32]) -> Result<(), JsError> {
        let vocab = self.model.config.vocab;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(bad) => Err(js_error(format!("{what}: token id {bad} is outside the vocabulary of {vocab}"))),
            None if ids.is_empty() => Err(js_error(format!("{what}: no token ids"))),
            None => Ok(()),
        }
    }

    /// Feeds a prompt, then picks `tokens` greedily one at a time; returns the picked ids and
    /// the submissions and dispatches per decode step (those after the prompt's pass).
    async fn decode(&self, chain: &mut Chain, prompt: &[u32], tokens: usize) -> Result<(Vec<u32>, f64, f64), JsError> {
        let mut sampler = Sampler::greedy();
        let mut logits = chain.run(&self.gpu, &self.model, prompt, false).await.map_err(js_error)?;
        let (submits, dispatches) = (chain.submits, chain.dispatches);
        let mut ids = Vec::with_capacity(tokens);
        for step in 0..tokens {
            let next = sampler.sample(&logits);
            ids.push(next);
            if step + 1 < tokens {
                logits = chain.run(&self.gpu, &self.model, &[next], false).await.map_err(js_error)?;
            }
        }
        check_device(&self.gpu)?;
        let steps = tokens.saturating_sub(1).max(1) as f64;
        Ok((ids, (chain.submits - submits) as f64 / steps, (chain.dispatches - dispatches) as f64 / steps))
    }
}

#[wasm_bindgen]
impl LlamaModel {
    /// The hyper-parameters and the loaded stages, as JSON.
    pub fn describe(&self) -> Result<String, JsError> {
        let c = &self.model.config;
        let s = &self.stages;
        to_json(&Described {
            blocks: c.blocks,
            dim: c.dim,
            heads: c.heads,
            kv_heads: c.kv_heads,
            ffn: c.ffn,
            vocab: c.vocab,
            context: c.context,
            loaded: LoadedStages { embedding: s.embedding, blocks: [s.blocks.start, s.blocks.end.min(c.blocks)], head: s.head },
        })
    }

    /// Teacher forcing: `{ids, spans: [[a, b], ...], requested: [[id, ...], ...]}` runs `ids`
    /// through the spans in one pass and resolves to `{positions: [{top1, logits}], submits}`:
    /// per position the arg-max and the logits of that position's requested ids.
    #[wasm_bindgen(js_name = teacherForced)]
    pub async fn teacher_forced(&self, request: String) -> Result<String, JsError> {
        let request: TeacherForcedRequest = from_json("teacher-forced request", &request)?;
        self.check_ids("ids", &request.ids)?;
        if request.requested.len() > request.ids.len() {
            return Err(js_error(format!("requested logits for {} positions, but there are {} ids", request.requested.len(), request.ids.len())));
        }
        let vocab = self.model.config.vocab;
        if let Some(bad) = request.requested.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(js_error(format!("requested: token id {bad} is outside the vocabulary of {vocab}")));
        }
        let mut chain = self.chain(&request.spans, request.ids.len())?;
        let logits = chain.run(&self.gpu, &self.model, &request.ids, true).await.map_err(js_error)?;
        check_device(&self.gpu)?;
        let positions = logits
            .chunks_exact(vocab)
            .enumerate()
            .map(|(i, row)| Position {
                top1: argmax(row),
                logits: request.requested.get(i).map(|ids| ids.iter().map(|&id| row[id as usize]).collect()).unwrap_or_default(),
            })
            .collect();
        to_json(&TeacherForced { positions, submits: chain.submits })
    }

    /// Greedy decoding: `{prompt, tokens, spans}` resolves to `{ids, submits_per_token,
    /// dispatches_per_token}`: the `tokens` ids picked one at a time with the KV caches, and
    /// what each step after the prompt's pass cost.
    pub async fn greedy(&self, request: String) -> Result<String, JsError> {
        let request: GreedyRequest = from_json("greedy request", &request)?;
        self.check_ids("prompt", &request.prompt)?;
        let mut chain = self.chain(&request.spans, request.prompt.len() + request.tokens)?;
        let (ids, submits_per_token, dispatches_per_token) = self.decode(&mut chain, &request.prompt, request.tokens).await?;
        to_json(&Greedy { ids, submits_per_token, dispatches_per_token })
    }

    /// Times the whole model as one span: `{prompt_tokens, decode_tokens}`; after a warm-up pass
    /// (which compiles the pipelines), a prefill of `prompt_tokens` and `decode_tokens` greedy
    /// steps from there. Resolves to the figures as JSON.
    pub async fn bench(&self, request: String) -> Result<String, JsError> {
        let request: BenchRequest = from_json("bench request", &request)?;
        let c = &self.model.config;
        let prompt: Vec<u32> = (0..request.prompt_tokens as u64).map(|i| ((i * 7919 + 17) % c.vocab as u64) as u32).collect();
        self.check_ids("prompt", &prompt)?;
        let whole = [[0, c.blocks]];
        let capacity = request.prompt_tokens + request.decode_tokens + 2;

        let mut warm = self.chain(&whole, capacity)?;
        let start = now_ms();
        warm.run(&self.gpu, &self.model, &prompt, false).await.map_err(js_error)?;
        let cold_prefill_ms = now_ms() - start;
        self.decode(&mut warm, &[1], 2).await?;
        drop(warm);

        let mut chain = self.chain(&whole, capacity)?;
        let start = now_ms();
        let logits = chain.run(&self.gpu, &self.model, &prompt, false).await.map_err(js_error)?;
        let prefill_ms = now_ms() - start;
        let (submits, dispatches) = (chain.submits, chain.dispatches);
        let mut next = argmax(&logits);
        let start = now_ms();
        for _ in 0..request.decode_tokens {
            next = argmax(&chain.run(&self.gpu, &self.model, &[next], false).await.map_err(js_error)?);
        }
        let decode_ms = now_ms() - start;
        check_device(&self.gpu)?;
        let steps = request.decode_tokens.max(1) as f64;
        to_json(&Bench {
            prompt_tokens: request.prompt_tokens,
            decode_tokens: request.decode_tokens,
            cold_prefill_ms,
            prefill_ms,
            prefill_tokens_per_s: request.prompt_tokens as f64 / prefill_ms * 1000.0,
            decode_ms,
            decode_tokens_per_s: request.decode_tokens as f64 / decode_ms * 1000.0,
            submits_per_token: (chain.submits - submits) as f64 / steps,
            dispatches_per_token: (chain.dispatches - dispatches) as f64 / steps,
        })
    }
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32)
}

/// One session on a chain of spans, each with its own KV cache.
struct Chain {
    caches: Vec<KvCache>,
    submits: usize,
    dispatches: usize,
}

impl Chain {
    /// Runs `ids` (at the positions after those cached) through embedding, every span and the
    /// head, and returns the logits of every position (`every_position`) or of the last. Between
    /// spans the hidden states come back to the CPU as a plain [tokens, dim] array and go up again.
    async fn run(&mut self, gpu: &Gpu, model: &Llama, ids: &[u32], every_position: bool) -> Result<Vec<f32>, EngineError> {
        let (dim, vocab) = (model.config.dim, model.config.vocab);
        let tokens = ids.len();
        let first = self.caches.first().map_or(0, |c| c.len) as u32;
        let positions: Vec<u32> = (first..first + tokens as u32).collect();
        let positions = gpu.upload_u32(&[tokens], &positions)?;
        let ids = gpu.upload_u32(&[tokens], ids)?;
        let mut hidden = gpu.empty(&[tokens, dim], DType::F32)?;
        let mut batch = gpu.batch();
        model.embed(&mut batch, &ids, &hidden)?;
        let spans = self.caches.len();
        for (i, cache) in self.caches.iter_mut().enumerate() {
            model.forward_span(&mut batch, &hidden, &positions, cache)?;
            if i + 1 < spans {
                self.dispatches += batch.dispatches() as usize;
                self.submits += 1;
                batch.submit();
                let activations: Vec<f32> = gpu.read_f32(&hidden).await?;
                hidden = gpu.upload_f32(&[tokens, dim], &activations)?;
                batch = gpu.batch();
            }
        }
        let rows = if every_position { tokens } else { 1 };
        let logits = gpu.empty(&[rows, vocab], DType::F32)?;
        if every_position {
            model.head(&mut batch, &hidden, &logits)?;
        } else {
            model.last_logits(&mut batch, &hidden, &logits)?;
        }
        self.dispatches += batch.dispatches() as usize;
        self.submits += 1;
        batch.submit();
        gpu.read_f32(&logits).await
    }
}
