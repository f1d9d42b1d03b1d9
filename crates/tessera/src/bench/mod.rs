//! `tessera bench`: each benchmark prints our figure beside a peer's, measured in the same run
//! on the same device, and the ratio between them.

mod decode;
mod embed;
mod kernels;
mod llama_cpp;
mod network;
mod pipeline;
mod stage;
#[cfg(feature = "burn-peer")]
mod burn_peer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// f32 matmul against burn, Q4_1 matvec against the adapter's streaming-read bandwidth.
    Kernels {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Llama-model prefill and steady-state decode beside llama.cpp's `llama-bench` on the same file.
    Decode(decode::DecodeArgs),
    /// BERT sentence embeddings at batch 1 and 32 beside the same forward in NumPy.
    Embed(embed::EmbedArgs),
    /// Work units dispatched and reconciled per second with 10,000 simulated contributors.
    Scheduler(network::SchedulerArgs),
    /// Round trip of a 64 KiB frame over a loopback DataChannel, beside a TCP echo.
    Network(network::NetworkArgs),
    /// Generation split across real contributor processes: decode in 1, 2 and 3 spans beside a
    /// local run, the cost of a hop, 8 sessions at once, the stall when a span's holder is killed.
    Pipeline(pipeline::PipelineArgs),
    /// A span serving 8 sessions' decode steps one by one beside the same steps as one batch.
    Stage(stage::StageArgs),
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Kernels { json } => kernels::run(json),
        Bench::Decode(args) => decode::run(args),
        Bench::Embed(args) => embed::run(args),
        Bench::Scheduler(args) => network::scheduler(args),
        Bench::Network(args) => network::network(args),
        Bench::Pipeline(args) => pipeline::run(args),
        Bench::Stage(args) => stage::run(args),
    }
}

/// A default model's main file (its folder, for a model of several files), or the path given.
fn resolve_model(model: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = crate::models::default_path(model) {
        anyhow::ensure!(path.exists(), "{} is not fetched yet: run `tessera models fetch {model}`", path.display());
        return Ok(path);
    }
    let path = PathBuf::from(model);
    anyhow::ensure!(path.exists(), "{model:?} is neither a default model (smollm2, minilm) nor an existing path");
    Ok(path)
}

/// Where `cargo xtask bench` puts the peers it builds: `target/peers`, found beside the running
/// binary (`target/release/tessera`) or under the working directory.
fn peers_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(Path::parent)
    {
        dirs.push(target.join("peers"));
    }
    dirs.push(PathBuf::from("target/peers"));
    dirs
}

/// The first of `candidates` under a peers folder that exists.
fn find_peer(candidates: &[&str]) -> Option<PathBuf> {
    peers_dirs().into_iter().flat_map(|dir| candidates.iter().map(move |c| dir.join(c))).find(|p| p.exists())
}

/// This process's peak resident set (VmHWM), which on lavapipe includes the "GPU" buffers.
fn peak_rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("/proc/self/status has no VmHWM line")?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().context("parsing VmHWM")?;
    Ok(kib * 1024)
}

/// The median of a non-empty sample (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Seconds per iteration of `run(n)` (which performs `n` iterations and waits for them): the
/// count is grown until one sample takes at least `SAMPLE`, then the median of five samples.
pub fn seconds_per_iteration(mut run: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    const SAMPLE: Duration = Duration::from_millis(200);
    run(1)?; // warm-up: pipelines compiled, buffers allocated
    let mut n = 1;
    loop {
        let start = Instant::now();
        run(n)?;
        if start.elapsed() >= SAMPLE || n >= 1 << 16 {
            break;
        }
        n *= 2;
    }
    let mut samples = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = Instant::now();
        run(n)?;
        samples.push(start.elapsed().as_secs_f64() / n as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[2])
}
