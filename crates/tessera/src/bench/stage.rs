//! `tessera bench stage`: a contributor's span serving several sessions' decode steps, run one by
//! one (a submission and a readback each) beside the same steps as one batch (rows stacked for
//! the linear layers, one submission and one readback), in the same run on the same device.

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tessera_engine::Gpu;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::stage::{EXACT_BATCH_ROWS, SpanStage, Step};

use super::{median, seconds_per_iteration};

/// Alternating rounds of the two ways, each timed by `seconds_per_iteration`; the medians are
/// reported.
const ROUNDS: usize = 3;

#[derive(Args)]
pub struct StageArgs {
    /// `smollm2`, or the path of a GGUF llama-family model.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Blocks in the span (from block 0).
    #[arg(long, default_value_t = 10)]
    blocks: usize,
    /// Sessions decoding at once, one token each per step (at most 8, the exact batch).
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Positions each session's cache holds before the timed steps.
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    adapter: tessera_engine::AdapterSummary,
    model: String,
    blocks: usize,
    sessions: usize,
    context: usize,
    /// Milliseconds for one step of every session.
    one_by_one_ms: f64,
    batched_ms: f64,
    /// one_by_one_ms / batched_ms.
    ratio: f64,
    /// Per step of every session, from the engine's counters.
    one_by_one_submits: u64,
    batched_submits: u64,
    /// Whether every session's states were the same bits both ways.
    identical: bool,
}

pub fn run(args: StageArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=EXACT_BATCH_ROWS).contains(&args.sessions), "--sessions must be 1 to {EXACT_BATCH_ROWS}");
    let path = super::resolve_model(&args.model)?;
    let name = path.display().to_string();
    let gpu = pollster::block_on(Gpu::request()).context("finding a GPU adapter")?;
    let blocks = 0..args.blocks;
    let mut file = std::fs::File::open(&path).with_context(|| format!("opening {name}"))?;
    let model = Llama::load(&gpu, &name, &mut file, &Stages { embedding: false, blocks: blocks.clone(), head: false })?;
    anyhow::ensure!(blocks.end <= model.config.blocks && !blocks.is_empty(), "--blocks must be 1 to {}", model.config.blocks);
    let (dim, sessions, position) = (model.config.dim, args.sessions as u64, args.context);
    let capacity = position + 1;
    // Sessions 0.. run one by one, sessions 100.. batched: the same weights, caches of their own.
    let mut stage = SpanStage::new(model, blocks.clone(), 2 * args.sessions)?;
    let mut rng = tessera_engine::Rng::new(7);
    let prompts: Vec<Vec<f32>> = (0..sessions).map(|_| rng.vec(position * dim, -1.0, 1.0)).collect();
    let steps: Vec<Vec<f32>> = (0..sessions).map(|_| rng.vec(dim, -1.0, 1.0)).collect();
    for (s, prompt) in (0..sessions).zip(&prompts) {
        for session in [s, 100 + s] {
            pollster::block_on(stage.forward(&gpu, session, capacity, 0, prompt))?;
        }
    }
    if !args.json {
        let adapter = gpu.adapter();
        println!("adapter: {} ({}, {}, {})", adapter.name, adapter.backend, adapter.device_type, adapter.driver);
        println!("span: blocks {blocks:?} of {name}; {sessions} sessions, each decoding one token at position {position} per step");
    }

    // Each step feeds the same position again (a session's cache is cut back to it), so every
    // step costs the same.
    let batch: Vec<Step> = (0..sessions).zip(&steps).map(|(s, hidden)| Step { session: 100 + s, capacity, start: position, hidden }).collect();
    let (mut alone_states, mut batched_states) = (Vec::new(), Vec::new());
    // `n` steps of every session, batched or one by one.
    let mut run = |batched: bool, n: usize| -> anyhow::Result<()> {
        for _ in 0..n {
            if batched {
                batched_states = pollster::block_on(stage.forward_batch(&gpu, &batch))?;
            } else {
                alone_states.clear();
                for (s, hidden) in (0..sessions).zip(&steps) {
                    alone_states.push(pollster::block_on(stage.forward(&gpu, s, capacity, position, hidden))?);
                }
            }
        }
        Ok(())
    };
    let mut submits = [0; 2];
    for (way, submits) in submits.iter_mut().enumerate() {
        let before = gpu.counters().submits;
        run(way == 1, 1)?;
        *submits = gpu.counters().submits - before;
    }
    let [one_by_one_submits, batched_submits] = submits;
    // The two alternate, so whatever else the machine does falls on both alike.
    let (mut one_by_one_samples, mut batched_samples) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        one_by_one_samples.push(seconds_per_iteration(|n| run(false, n))?);
        batched_samples.push(seconds_per_iteration(|n| run(true, n))?);
    }
    let (one_by_one_s, batched_s) = (median(&mut one_by_one_samples), median(&mut batched_samples));
    let identical = alone_states.len() == batched_states.len()
        && alone_states.iter().zip(&batched_states).all(|(a, b)| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));

    let report = Report {
        adapter: gpu.adapter().clone(),
        model: name,
        blocks: args.blocks,
        sessions: args.sessions,
        context: args.context,
        one_by_one_ms: one_by_one_s * 1e3,
        batched_ms: batched_s * 1e3,
        ratio: one_by_one_s / batched_s,
        one_by_one_submits,
        batched_submits,
        identical,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{:<12} {:>12} {:>10}", "", "ms per step", "submits");
        println!("{:<12} {:>12.2} {:>10}", "one by one", report.one_by_one_ms, report.one_by_one_submits);
        println!("{:<12} {:>12.2} {:>10}", "batched", report.batched_ms, report.batched_submits);
        println!("batched is {:.2}x the speed of one by one; states bit-identical: {}", report.ratio, if identical { "yes" } else { "NO" });
    }
    anyhow::ensure!(identical, "batched states differ from the states of each session run alone");
    Ok(())
}
