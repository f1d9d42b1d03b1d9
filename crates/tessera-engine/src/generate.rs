//! Generating tokens with a llama model on one machine: a [`Session`] holds the KV cache and
//! turns fed tokens into the next token's logits, one queue submission per step and one readback
//! (the logits row); a [`Sampler`] picks the token (greedy, or temperature and top-p with a seed).

use crate::error::EngineError;
use crate::gpu::Gpu;
use crate::llama::{KvCache, Llama};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// 0 means greedy.
    temperature: f32,
    top_p: f32,
    rng: Rng,
    /// Scratch for (token, probability), kept to avoid allocating per token.
    candidates: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn greedy() -> Sampler {
        Sampler::new(0.0, 1.0, 0)
    }

    /// `temperature` 0 is greedy; `top_p` keeps the smallest set of likeliest tokens whose
    /// probability reaches it.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler { temperature: temperature.max(0.0), top_p: top_p.clamp(f32::MIN_POSITIVE, 1.0), rng: Rng::new(seed), candidates: Vec::new() }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature == 0.0 {
            return argmax;
        }
        let max = f64::from(logits[argmax as usize]);
        let t = f64::from(self.temperature);
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, ((f64::from(l) - max) / t).exp())));
        let total: f64 = self.candidates.iter().map(|c| c.1).sum();
        self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // Keep the head of the distribution whose mass reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for &(_, p) in &self.candidates {
            kept += 1;
            mass += p / total;
            if mass >= f64::from(self.top_p) {
                break;
            }
        }
        let mut draw = self.rng.unit() * self.candidates[..kept].iter().map(|c| c.1).sum::<f64>();
        for &(token, p) in &self.candidates[..kept] {
            if draw < p {
                return token;
            }
            draw -= p;
        }
        self.candidates[kept - 1].0
    }
}

/// One conversation's state on the whole model.
pub struct Session<'m> {
    gpu: &'m Gpu,
    model: &'m Llama,
    cache: KvCache,
    logits: Tensor,
}

impl<'m> Session<'m> {
    /// A session that can hold `capacity` tokens (prompt and generated).
    pub fn new(gpu: &'m Gpu, model: &'m Llama, capacity: usize) -> Result<Session<'m>, EngineError> {
        let capacity = capacity.min(model.config.context);
        let cache = model.kv_cache(gpu, 0..model.config.blocks, capacity)?;
        let logits = gpu.empty(&[1, model.config.vocab], DType::F32)?;
        Ok(Session { gpu, model, cache, logits })
    }

    /// Tokens in the cache so far.
    pub fn len(&self) -> usize {
        self.cache.len
    }

    pub fn is_empty(&self) -> bool {
        self.cache.len == 0
    }

    /// Tokens the session can hold in all.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Runs `tokens` (the prompt, or the last sampled token) and returns the logits that predict
    /// the token after them.
    pub async fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let c = &self.model.config;
        if tokens.is_empty() {
            return Err(EngineError::shape("generate", "no tokens to feed"));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(EngineError::shape("generate", format!("token id {bad} is outside the vocabulary of {}", c.vocab)));
        }
        if self.cache.len + tokens.len() > self.cache.capacity() {
            return Err(EngineError::shape(
                "generate",
                format!("{} tokens would exceed the context of {} tokens", self.cache.len + tokens.len(), self.cache.capacity()),
            ));
        }
        let gpu = self.gpu;
        let ids = gpu.upload_u32(&[tokens.len()], tokens)?;
        let first = self.cache.len as u32;
        let positions: Vec<u32> = (first..first + tokens.len() as u32).collect();
        let positions = gpu.upload_u32(&[tokens.len()], &positions)?;
        let hidden = gpu.empty(&[tokens.len(), c.dim], DType::F32)?;
        let mut batch = gpu.batch();
        self.model.embed(&mut batch, &ids, &hidden)?;
        self.model.forward_span(&mut batch, &hidden, &positions, &mut self.cache)?;
        self.model.last_logits(&mut batch, &hidden, &self.logits)?;
        Ok(bytemuck::pod_collect_to_vec(&batch.submit_and_read(&self.logits).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        assert_eq!(Sampler::greedy().sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn sampling_follows_the_distribution_and_its_seed() {
        let logits = [0.0f32, 1.0, 2.0, -30.0];
        let mut sampler = Sampler::new(1.0, 1.0, 7);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[sampler.sample(&logits) as usize] += 1;
        }
        // softmax(0, 1, 2) = 0.090, 0.245, 0.665; the last token is never drawn.
        let share = |i: usize| counts[i] as f64 / 20_000.0;
        assert!((share(0) - 0.090).abs() < 0.01 && (share(1) - 0.245).abs() < 0.015 && (share(2) - 0.665).abs() < 0.015, "{counts:?}");
        assert_eq!(counts[3], 0);
        let draws = |seed| (0..50).map(|_| 0).scan(Sampler::new(1.0, 1.0, seed), |s, _| Some(s.sample(&logits))).collect::<Vec<_>>();
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
    }

    #[test]
    fn top_p_keeps_only_the_head() {
        // With top_p 0.5 only the 0.665 token survives.
        let mut sampler = Sampler::new(1.0, 0.5, 1);
        assert!((0..1000).all(|_| sampler.sample(&[0.0, 1.0, 2.0]) == 2));
    }
}
