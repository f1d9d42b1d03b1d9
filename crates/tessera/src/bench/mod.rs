//! `tessera bench`: each benchmark prints our figure beside a peer's, measured in the same run
//! on the same device, and the ratio between them.

mod kernels;
#[cfg(feature = "burn-peer")]
mod burn_peer;

use std::time::{Duration, Instant};

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// f32 matmul against burn, Q4_1 matvec against the adapter's streaming-read bandwidth.
    Kernels {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Kernels { json } => kernels::run(json),
    }
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
