//! Helpers shared by the tests: capabilities, honest and perturbed results, a seeded RNG.

use tessera_coordinator::{Config, MemoryStore, Millis, Output, Scheduler};
use tessera_protocol::{AdapterLimits, Capabilities, Tensor, Work};

pub fn caps(slots: u32) -> Capabilities {
    Capabilities {
        adapter: "sim".into(),
        backend: "webgpu".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: 128 << 20,
            max_buffer_size: 256 << 20,
            max_compute_workgroup_storage_size: 16384,
            max_compute_invocations_per_workgroup: 256,
        },
        memory_budget_bytes: 1 << 30,
        benchmark_score: 10.0,
        max_concurrent_units: slots,
        lends_blobs: false,
    }
}

pub const HIDDEN: usize = 16;

/// The honest embedding of a unit's inputs: a deterministic function of the token ids.
pub fn honest(work: &Work) -> Tensor {
    let Work::Embedding { inputs, .. } = work;
    let mut values = Vec::with_capacity(inputs.len() * HIDDEN);
    for tokens in inputs {
        let seed = tokens
            .iter()
            .fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(u64::from(t)));
        let row: Vec<f32> = (0..HIDDEN)
            .map(|k| ((seed.wrapping_add(k as u64 * 7919) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        values.extend(row.iter().map(|x| x / norm));
    }
    Tensor::from_f32(vec![inputs.len() as u64, HIDDEN as u64], &values).unwrap()
}

/// The honest result with noise large enough to fail the cosine check.
pub fn perturbed(work: &Work, rng: &mut Rng) -> Tensor {
    let t = honest(work);
    let values: Vec<f32> = t
        .f32_values()
        .unwrap()
        .map(|v| v + (rng.unit() as f32 - 0.5) * 0.6)
        .collect();
    Tensor::from_f32(t.dims().to_vec(), &values).unwrap()
}

/// SplitMix64, seeded, so a failing run replays exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn scheduler(config: Config) -> Scheduler<MemoryStore> {
    Scheduler::restore(config, MemoryStore::new(), Millis(0)).unwrap()
}

/// Flushes at `now` (as the shell does after a burst of events), then takes every output.
pub fn drain(s: &mut Scheduler<MemoryStore>, now: Millis) -> Vec<Output> {
    s.flush(now).unwrap();
    std::iter::from_fn(|| s.poll()).collect()
}
