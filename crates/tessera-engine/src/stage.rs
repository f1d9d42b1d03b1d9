//! The two kinds of stage a served language model is split into: [`SpanStage`], a contributor's
//! span of blocks with one KV cache per session, and [`EndsStage`], the embedding and the head,
//! which the coordinator keeps (so contributors see hidden states, never token ids).
//!
//! Hidden states cross stages as plain `f32` rows, `[rows, dim]`, read back to the CPU: that is
//! what goes over the network. A span's input comes from a peer and is checked like any network
//! input: its width, that every value is finite, that it continues the session's cache without a
//! gap. Feeding positions a session already holds cuts its cache back to them first, which is
//! how a replay rebuilds a cache (see `ARCHITECTURE.md` on replay exactness) — unless they come
//! with exactly the states they came with before: then the step is answered from what the span
//! gave then, and the cache is left as it is (it holds what computing again would write). A
//! replay after another stage was replaced thus costs the unchanged stages before it no GPU
//! time.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::EngineError;
use crate::gpu::Gpu;
use crate::llama::{KvCache, Llama};
use crate::tensor::DType;

/// Rows (of all the sessions together) up to which [`SpanStage::forward_batch`] gives each
/// session exactly what [`SpanStage::forward`] would: the matvec path's limit.
pub const EXACT_BATCH_ROWS: usize = crate::ops::MATVEC_MAX_INPUT_ROWS;

/// One session's step in [`SpanStage::forward_batch`]: what [`SpanStage::forward`] takes.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub session: u64,
    /// The cache's size if the session is new here.
    pub capacity: usize,
    /// The position of the first row.
    pub start: usize,
    /// `[rows, dim]`.
    pub hidden: &'a [f32],
}

fn invalid(detail: String) -> EngineError {
    EngineError::Shape { op: "stage", detail }
}

/// A span of a model's blocks and the KV caches of the sessions running through it.
pub struct SpanStage {
    model: Llama,
    blocks: Range<usize>,
    max_sessions: usize,
    caches: BTreeMap<u64, KvCache>,
    /// Per session, the states each position came in with and went out with, for as many
    /// positions as its cache holds.
    fed: BTreeMap<u64, Fed>,
    /// Steps answered from `fed` so far.
    repeats: u64,
}

/// One session's rows through a span: `[held, dim]` in and out.
#[derive(Default)]
struct Fed {
    inputs: Vec<f32>,
    outputs: Vec<f32>,
}

impl SpanStage {
    /// `model` must hold `blocks` (loaded with `Stages { blocks, .. }`, e.g. from a shard);
    /// `max_sessions` bounds the caches kept at once.
    pub fn new(model: Llama, blocks: Range<usize>, max_sessions: usize) -> Result<SpanStage, EngineError> {
        if blocks.is_empty() || blocks.end > model.config.blocks || max_sessions == 0 {
            return Err(invalid(format!("a stage of blocks {blocks:?} (of {}) for {max_sessions} sessions", model.config.blocks)));
        }
        Ok(SpanStage { model, blocks, max_sessions, caches: BTreeMap::new(), fed: BTreeMap::new(), repeats: 0 })
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

    /// Steps answered without computing, as repeats of what the span already did.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    /// What the span gave before for `step`'s positions, if it holds them and they come with
    /// exactly the states (bit for bit) they came with then.
    fn repeat(&self, step: &Step<'_>) -> Option<Vec<f32>> {
        let fed = self.fed.get(&step.session)?;
        let range = step.start * self.dim()..step.start * self.dim() + step.hidden.len();
        let before = fed.inputs.get(range.clone())?;
        let same = before.iter().zip(step.hidden).all(|(a, b)| a.to_bits() == b.to_bits());
        same.then(|| fed.outputs[range].to_vec())
    }

    /// Runs the span over `hidden` (`[rows, dim]`, positions `start..start + rows` of
    /// `session`) and returns the new states. A new session gets a cache of `capacity`
    /// positions (at most the model's context); `start` must not be past what the session's
    /// cache holds, and what it holds from `start` on is replaced.
    pub async fn forward(&mut self, gpu: &Gpu, session: u64, capacity: usize, start: usize, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        let mut outputs = self.forward_batch(gpu, &[Step { session, capacity, start, hidden }]).await?;
        outputs.pop().ok_or_else(|| invalid(format!("session {session} got no output")))
    }

    /// Runs several sessions' steps (each as [`SpanStage::forward`] takes it) through the span
    /// in one submission and one readback, and returns each step's states in order. Their rows
    /// are stacked for the linear layers (see [`Llama::forward_spans`]): with at most
    /// [`EXACT_BATCH_ROWS`] rows in all, each session's states are bit for bit what running it
    /// alone gives. A session may appear once; every step is checked before any cache changes,
    /// so a bad step fails the batch and leaves every session as it was.
    pub async fn forward_batch(&mut self, gpu: &Gpu, steps: &[Step<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let dim = self.dim();
        if steps.is_empty() {
            return Err(invalid("a batch of no steps".into()));
        }
        let mut new_sessions = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let Step { session, capacity, start, hidden } = *step;
            if steps[..i].iter().any(|s| s.session == session) {
                return Err(invalid(format!("session {session} appears twice in one batch")));
            }
            if hidden.is_empty() || !hidden.len().is_multiple_of(dim) {
                return Err(invalid(format!("session {session}: {} values are not rows of {dim}", hidden.len())));
            }
            if let Some(at) = hidden.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!("session {session}: hidden state value {at} is {}", hidden[at])));
            }
            let rows = hidden.len() / dim;
            let (held, capacity) = match self.caches.get(&session) {
                Some(cache) => (cache.len, cache.capacity()),
                None => {
                    new_sessions.push((session, capacity.min(self.model.config.context)));
                    (0, capacity.min(self.model.config.context))
                }
            };
            if start > held {
                return Err(invalid(format!("positions from {start}: session {session} holds only 0..{held} here")));
            }
            if start + rows > capacity {
                return Err(invalid(format!("positions up to {} exceed session {session}'s {capacity} here", start + rows)));
            }
        }
        if self.caches.len() + new_sessions.len() > self.max_sessions {
            return Err(invalid(format!("{} sessions are open here already (of {})", self.caches.len(), self.max_sessions)));
        }
        for (session, capacity) in new_sessions {
            let cache = self.model.kv_cache(gpu, self.blocks.clone(), capacity)?;
            self.caches.insert(session, cache);
            self.fed.insert(session, Fed::default());
        }

        // Repeats are answered as they were; the rest run as one batch.
        let mut outputs: Vec<Option<Vec<f32>>> = steps.iter().map(|step| self.repeat(step)).collect();
        let run: Vec<Step<'_>> = steps.iter().zip(&outputs).filter(|(_, out)| out.is_none()).map(|(step, _)| *step).collect();
        self.repeats += (steps.len() - run.len()) as u64;
        if !run.is_empty() {
            let mut computed = self.compute(gpu, &run).await?.into_iter();
            for (step, out) in steps.iter().zip(&mut outputs) {
                if out.is_some() {
                    continue;
                }
                let states = computed.next().ok_or_else(|| invalid(format!("session {} got no output", step.session)))?;
                let fed = self.fed.entry(step.session).or_default();
                fed.inputs.truncate(step.start * dim);
                fed.inputs.extend_from_slice(step.hidden);
                fed.outputs.truncate(step.start * dim);
                fed.outputs.extend_from_slice(&states);
                *out = Some(states);
            }
        }
        Ok(outputs.into_iter().flatten().collect())
    }

    /// Runs checked steps, none a repeat, as one batch.
    async fn compute(&mut self, gpu: &Gpu, steps: &[Step<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let dim = self.dim();

        let rows: Vec<usize> = steps.iter().map(|s| s.hidden.len() / dim).collect();
        let total: usize = rows.iter().sum();
        let stacked: Vec<f32> = steps.iter().flat_map(|s| s.hidden.iter().copied()).collect();
        let input = gpu.upload_f32(&[total, dim], &stacked)?;
        let positions = steps
            .iter()
            .zip(&rows)
            .map(|(s, &r)| gpu.upload_u32(&[r], &(s.start..s.start + r).map(|p| p as u32).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>, _>>()?;
        // Each step's cache, in the steps' order (the sessions are distinct).
        let mut caches: BTreeMap<u64, &mut KvCache> = self.caches.iter_mut().filter(|(s, _)| steps.iter().any(|t| t.session == **s)).map(|(s, c)| (*s, c)).collect();
        let mut sessions = Vec::with_capacity(steps.len());
        for (step, positions) in steps.iter().zip(&positions) {
            let cache = caches.remove(&step.session).ok_or_else(|| invalid(format!("session {} has no cache", step.session)))?;
            cache.len = step.start;
            sessions.push((positions, cache));
        }
        let mut batch = gpu.batch();
        self.model.forward_spans(&mut batch, &input, &mut sessions)?;
        let output: Vec<f32> = bytemuck::pod_collect_to_vec(&batch.submit_and_read(&input).await?);
        let mut outputs = Vec::with_capacity(steps.len());
        let mut offset = 0;
        for r in rows {
            outputs.push(output[offset..offset + r * dim].to_vec());
            offset += r * dim;
        }
        Ok(outputs)
    }

    /// Drops `session`'s cache; returns whether there was one.
    pub fn end(&mut self, session: u64) -> bool {
        self.fed.remove(&session);
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
