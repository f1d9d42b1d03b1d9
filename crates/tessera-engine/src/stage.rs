//! The two kinds of stage a served language model is split into: [`SpanStage`], a contributor's
//! span of blocks with one KV cache per session, and [`EndsStage`], the embedding and the head,
//! which the coordinator keeps (so contributors see hidden states, never token ids).
//!
//! Hidden states cross stages as plain `f32` rows, `[rows, dim]`, read back to the CPU: that is
//! what goes over the network. A span's input comes from a peer and is checked like any network
//! input: its width, that every value is finite, that it continues the session's cache without a
//! gap. Feeding positions a session already holds cuts its cache back to them first, which is
//! how a replay rebuilds a cache (see `ARCHITECTURE.md` on replay exactness).

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::EngineError;
use crate::gpu::Gpu;
use crate::llama::{KvCache, Llama};
use crate::tensor::DType;

fn invalid(detail: String) -> EngineError {
    EngineError::Shape { op: "stage", detail }
}

/// A span of a model's blocks and the KV caches of the sessions running through it.
pub struct SpanStage {
    model: Llama,
    blocks: Range<usize>,
    max_sessions: usize,
    caches: BTreeMap<u64, KvCache>,
}

impl SpanStage {
    /// `model` must hold `blocks` (loaded with `Stages { blocks, .. }`, e.g. from a shard);
    /// `max_sessions` bounds the caches kept at once.
    pub fn new(model: Llama, blocks: Range<usize>, max_sessions: usize) -> Result<SpanStage, EngineError> {
        if blocks.is_empty() || blocks.end > model.config.blocks || max_sessions == 0 {
            return Err(invalid(format!("a stage of blocks {blocks:?} (of {}) for {max_sessions} sessions", model.config.blocks)));
        }
        Ok(SpanStage { model, blocks, max_sessions, caches: BTreeMap::new() })
    }

    pub fn blocks(&self) -> Range<usize> {
        self.blocks.clone()
    }

    /// The width of a hidden-state row.
    pub fn dim(&self) -> usize {
        self.model.config.dim
    }

    /// Sessions with a cache here.
    pub fn sessions(&self) -> usize {
        self.caches.len()
    }

    /// Positions `session`'s cache holds (0 for a session it does not know).
    pub fn cached(&self, session: u64) -> usize {
        self.caches.get(&session).map_or(0, |c| c.len)
    }

    /// Runs the span over `hidden` (`[rows, dim]`, positions `start..start + rows` of
    /// `session`) and returns the new states. A new session gets a cache of `capacity`
    /// positions (at most the model's context); `start` must not be past what the session's
    /// cache holds, and what it holds from `start` on is replaced.
    pub async fn forward(&mut self, gpu: &Gpu, session: u64, capacity: usize, start: usize, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        let dim = self.dim();
        if hidden.is_empty() || !hidden.len().is_multiple_of(dim) {
            return Err(invalid(format!("{} values are not rows of {dim}", hidden.len())));
        }
        if let Some(at) = hidden.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!("hidden state value {at} is {}", hidden[at])));
        }
        let rows = hidden.len() / dim;
        let (held, capacity) = match self.caches.get(&session) {
            Some(cache) => (cache.len, cache.capacity()),
            None => (0, capacity.min(self.model.config.context)),
        };
        if start > held {
            return Err(invalid(format!("positions from {start}: session {session} holds only 0..{held} here")));
        }
        if start + rows > capacity {
            return Err(invalid(format!("positions up to {} exceed session {session}'s {capacity} here", start + rows)));
        }
        if !self.caches.contains_key(&session) {
            if self.caches.len() >= self.max_sessions {
                return Err(invalid(format!("{} sessions are open here already", self.caches.len())));
            }
            self.caches.insert(session, self.model.kv_cache(gpu, self.blocks.clone(), capacity)?);
        }
        let cache = self.caches.get_mut(&session).ok_or_else(|| invalid(format!("session {session} has no cache")))?;
        cache.len = start;
        let input = gpu.upload_f32(&[rows, dim], hidden)?;
        let positions: Vec<u32> = (start..start + rows).map(|p| p as u32).collect();
        let positions = gpu.upload_u32(&[rows], &positions)?;
        let mut batch = gpu.batch();
        self.model.forward_span(&mut batch, &input, &positions, cache)?;
        Ok(bytemuck::pod_collect_to_vec(&batch.submit_and_read(&input).await?))
    }

    /// Drops `session`'s cache; returns whether there was one.
    pub fn end(&mut self, session: u64) -> bool {
        self.caches.remove(&session).is_some()
    }
}

/// A model's embedding and head: token ids in, logits out.
pub struct EndsStage {
    model: Llama,
}

impl EndsStage {
    /// `model` must hold the embedding and the head (`Stages { embedding: true, head: true, .. }`).
    pub fn new(model: Llama) -> EndsStage {
        EndsStage { model }
    }

    pub fn config(&self) -> &crate::llama::LlamaConfig {
        &self.model.config
    }

    /// Hidden states `[tokens, dim]` for `tokens`.
    pub async fn embed(&self, gpu: &Gpu, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let c = &self.model.config;
        if tokens.is_empty() {
            return Err(invalid("no tokens to embed".into()));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(invalid(format!("token id {bad} is outside the vocabulary of {}", c.vocab)));
        }
        let ids = gpu.upload_u32(&[tokens.len()], tokens)?;
        let hidden = gpu.empty(&[tokens.len(), c.dim], DType::F32)?;
        let mut batch = gpu.batch();
        self.model.embed(&mut batch, &ids, &hidden)?;
        Ok(bytemuck::pod_collect_to_vec(&batch.submit_and_read(&hidden).await?))
    }

    /// The logits `[vocab]` that predict the token after the last row of `hidden`.
    pub async fn logits(&self, gpu: &Gpu, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        let c = &self.model.config;
        if hidden.len() < c.dim || !hidden.len().is_multiple_of(c.dim) {
            return Err(invalid(format!("{} values are not rows of {}", hidden.len(), c.dim)));
        }
        let last = &hidden[hidden.len() - c.dim..];
        if let Some(at) = last.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!("hidden state value {at} is {}", last[at])));
        }
        let row = gpu.upload_f32(&[1, c.dim], last)?;
        let logits = gpu.empty(&[1, c.vocab], DType::F32)?;
        let mut batch = gpu.batch();
        self.model.head(&mut batch, &row, &logits)?;
        Ok(bytemuck::pod_collect_to_vec(&batch.submit_and_read(&logits).await?))
    }
}
