//! The llama.cpp peer of `tessera bench decode`: finds `llama-bench` (built by `cargo xtask bench`
//! into `target/peers`), runs it on the same GGUF file and reads its JSON report.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Where `cargo xtask bench` installs the binary, under `target/peers`, and the stamp beside it
/// that says what it was built from.
pub const INSTALLED: &str = "llama.cpp/bin/llama-bench";
const STAMP: &str = "built-from.txt";
pub const HOW_TO_BUILD: &str = "build it with `cargo run -p xtask -- build-peers` (or `npm run bench`), or pass --llama-bench PATH";

/// `given`, or the binary under `target/peers`; `None` if neither exists.
pub fn find(given: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = given {
        anyhow::ensure!(path.is_file(), "--llama-bench {}: no such file", path.display());
        return Ok(Some(path.to_path_buf()));
    }
    Ok(super::find_peer(&[INSTALLED]))
}

/// What llama-bench measured, in tokens per second (the median of its repetitions).
#[derive(Debug, serde::Serialize)]
pub struct Figures {
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// The slowest and fastest runs' decode.
    pub decode_range: (f64, f64),
    /// Decode from an empty context, for comparison with the one at depth.
    pub decode_at_depth_0_tokens_per_second: f64,
    pub threads: u32,
    /// What the binary was built from (the stamp `cargo xtask bench` leaves beside it), or its commit.
    pub build: String,
    pub cpu: String,
}

impl Figures {
    /// The median of each figure over several runs; `None` for no runs.
    pub fn median_of(runs: Vec<Figures>) -> Option<Figures> {
        if runs.is_empty() {
            return None;
        }
        let pick = |f: fn(&Figures) -> f64| super::median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let prefill = pick(|f| f.prefill_tokens_per_second);
        let decode = pick(|f| f.decode_tokens_per_second);
        let decode_0 = pick(|f| f.decode_at_depth_0_tokens_per_second);
        let slowest = runs.iter().map(|f| f.decode_range.0).fold(f64::INFINITY, f64::min);
        let fastest = runs.iter().map(|f| f.decode_range.1).fold(f64::NEG_INFINITY, f64::max);
        let first = runs.into_iter().next().expect("runs is not empty");
        Some(Figures {
            prefill_tokens_per_second: prefill,
            decode_tokens_per_second: decode,
            decode_range: (slowest, fastest),
            decode_at_depth_0_tokens_per_second: decode_0,
            ..first
        })
    }
}

/// One test in llama-bench's JSON output (the fields we read).
#[derive(Deserialize)]
struct Test {
    n_prompt: u32,
    n_gen: u32,
    #[serde(default)]
    n_depth: u32,
    n_threads: u32,
    samples_ts: Vec<f64>,
    build_commit: String,
    cpu_info: String,
}

/// Runs `llama-bench` on `model`: prefill of `prompt` tokens from an empty context, and decode of
/// `decode` tokens both after `prompt` tokens of context (what we compare) and from empty.
pub fn measure(binary: &Path, model: &Path, prompt: usize, decode: usize, threads: usize, repetitions: usize) -> anyhow::Result<Figures> {
    let mut command = Command::new(binary);
    command.arg("-m").arg(model).args([
        "-p",
        &prompt.to_string(),
        "-n",
        &decode.to_string(),
        "-d",
        &format!("0,{prompt}"),
        "-t",
        &threads.to_string(),
        "-r",
        &repetitions.to_string(),
        "-o",
        "json",
    ]);
    let out = command.output().with_context(|| format!("starting {}", binary.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", binary.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let tests: Vec<Test> = serde_json::from_slice(&out.stdout).with_context(|| format!("reading the JSON report of {}", binary.display()))?;
    let pick = |n_prompt: usize, n_gen: usize, depth: usize| -> anyhow::Result<&Test> {
        tests
            .iter()
            .find(|t| t.n_prompt as usize == n_prompt && t.n_gen as usize == n_gen && t.n_depth as usize == depth)
            .with_context(|| format!("llama-bench reported no test with {n_prompt} prompt and {n_gen} generated tokens at depth {depth}"))
    };
    let median = |t: &Test| -> anyhow::Result<f64> {
        anyhow::ensure!(!t.samples_ts.is_empty(), "llama-bench reported a test without samples");
        Ok(super::median(&mut t.samples_ts.clone()))
    };
    let prefill = pick(prompt, 0, 0)?;
    let decode_at_depth = pick(0, decode, prompt)?;
    let stamp = binary.parent().and_then(|dir| std::fs::read_to_string(dir.join(STAMP)).ok());
    let build = stamp.map_or_else(|| format!("commit {}", prefill.build_commit), |s| s.trim().to_string());
    let samples = &decode_at_depth.samples_ts;
    let decode_range = (samples.iter().copied().fold(f64::INFINITY, f64::min), samples.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    Ok(Figures {
        prefill_tokens_per_second: median(prefill)?,
        decode_tokens_per_second: median(decode_at_depth)?,
        decode_range,
        decode_at_depth_0_tokens_per_second: median(pick(0, decode, 0)?)?,
        threads: prefill.n_threads,
        build,
        cpu: prefill.cpu_info.clone(),
    })
}
