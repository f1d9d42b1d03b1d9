//! `tessera bench embed`: BERT sentence embeddings per second at batch 1 and 32 on the engine,
//! beside the same forward in NumPy (`bert_numpy.py`, BLAS on the CPU) over the same safetensors
//! file and the same token ids, with the embeddings checked to agree.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tessera_engine::Gpu;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::tokenizer::TextTokenizer;

use super::{median, mib};

const PEER_SCRIPT: &str = include_str!("bert_numpy.py");
/// The Python that `cargo xtask bench` sets up with NumPy, under target/peers.
const PEER_PYTHON: &str = "venv/bin/python3";
const BATCH_SIZES: [usize; 2] = [1, 32];
/// The agreement the peer must reach for its speed to be comparable (the model test's bar).
const MIN_COSINE: f64 = 0.9999;

/// Thirty-two sentences of ordinary text, 10 to 30 tokens each: one batch of 32, or 32 of one.
const SENTENCES: [&str; 32] = [
    "The train to Edinburgh was delayed by forty minutes because of a signal failure near York.",
    "She planted tomatoes, basil and two rows of beans along the south-facing wall of the garden.",
    "How do I reset my password if I no longer have access to the email address on my account?",
    "The committee will publish its final report on the new bridge at the end of next month.",
    "A cup of strong coffee and a quiet room are all I need to finish this chapter.",
    "Researchers found that the enzyme breaks down plastic bottles faster at higher temperatures.",
    "Our flight was cancelled, so we spent the night in a small hotel near the airport.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "Please send me the slides from yesterday's meeting before the end of the day.",
    "The museum's new exhibition traces the history of maps from clay tablets to satellite images.",
    "He fixed the leaking tap himself after watching a short video online.",
    "Interest rates are expected to remain unchanged until the inflation figures improve.",
    "The children built a sandcastle with towers, a moat and a bridge made of driftwood.",
    "Which programming language should I learn first if I want to build mobile apps?",
    "The library extends its opening hours during the exam period in May and June.",
    "A sudden storm knocked out power to thousands of homes along the coast last night.",
    "The orchestra rehearsed the second movement three times before the conductor was satisfied.",
    "Drinking enough water during the day can help reduce headaches and fatigue.",
    "The startup raised twelve million dollars to expand its delivery service to new cities.",
    "My grandmother still writes letters by hand and sends them with colourful stamps.",
    "The software update fixes a bug that caused the app to crash when opening large files.",
    "Volunteers collected more than two tonnes of rubbish from the riverbank on Saturday.",
    "The cat sits on the windowsill every morning, watching birds in the garden.",
    "Tickets for the concert sold out within ten minutes of going on sale.",
    "The new policy allows employees to work from home up to three days a week.",
    "Scientists observed a distant galaxy whose light left it more than thirteen billion years ago.",
    "Could you recommend a good book about the history of the Roman Empire?",
    "The bakery on the corner sells fresh bread, croissants and cinnamon rolls every morning.",
    "After months of negotiation, the two companies finally agreed on the terms of the merger.",
    "The hiking trail climbs steeply through pine forest before reaching the lake.",
    "Regular backups protect your photos and documents if your laptop is lost or stolen.",
    "The referee stopped the match for ten minutes while the medical team treated the injured player.",
];

#[derive(Args)]
pub struct EmbedArgs {
    /// `minilm`, or a folder holding model.safetensors, config.json and tokenizer.json.
    #[arg(long, default_value = "minilm")]
    model: String,
    /// A Python with NumPy for the peer; by default the one `cargo xtask bench` sets up in
    /// target/peers, else `python3`.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Timed passes over the sentences at each batch size (for us and the peer); the median is reported.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    adapter: tessera_engine::AdapterSummary,
    model: String,
    sentences: usize,
    tokens_min: usize,
    tokens_max: usize,
    rows: Vec<Row>,
    tessera_peak_rss_bytes: u64,
    peer: Option<PeerSummary>,
    /// Why there is no peer figure, when there is none.
    peer_missing: Option<String>,
}

#[derive(Serialize)]
struct Row {
    batch: usize,
    tessera_sentences_per_second: f64,
    numpy_sentences_per_second: Option<f64>,
    /// tessera / NumPy.
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct PeerSummary {
    python: String,
    numpy: String,
    blas: String,
    peak_rss_bytes: u64,
    min_cosine: f64,
}

/// What `bert_numpy.py` prints.
#[derive(Deserialize)]
struct PeerOutput {
    numpy: String,
    blas: String,
    sentences_per_second: std::collections::HashMap<String, f64>,
    embeddings: Vec<Vec<f64>>,
    peak_rss_bytes: u64,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let path = super::resolve_model(&args.model)?;
    let dir: &Path = if path.is_dir() { &path } else { path.parent().context("a model folder")? };
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let config_path = dir.join("config.json");
    let config = BertConfig::from_json(&config_path.display().to_string(), &read("config.json")?)?;
    let tokenizer = TextTokenizer::from_json(&dir.join("tokenizer.json").display().to_string(), &read("tokenizer.json")?)?;
    let weights = dir.join("model.safetensors");
    let sentences = SENTENCES.iter().map(|s| tokenizer.encode(s, true)).collect::<Result<Vec<_>, _>>()?;
    let lengths = sentences.iter().map(Vec::len);
    let (tokens_min, tokens_max) = (lengths.clone().min().unwrap_or(0), lengths.max().unwrap_or(0));

    let gpu = pollster::block_on(Gpu::request()).context("finding a GPU adapter")?;
    let mut file = std::fs::File::open(&weights).with_context(|| format!("opening {}", weights.display()))?;
    let model = Bert::load(&gpu, config, &weights.display().to_string(), &mut file)?;
    let adapter = gpu.adapter().clone();
    if !args.json {
        println!("adapter: {} ({}, {}, {})", adapter.name, adapter.backend, adapter.device_type, adapter.driver);
        println!("model: {}; {} sentences of {tokens_min} to {tokens_max} tokens", dir.display(), sentences.len());
    }

    anyhow::ensure!(args.samples > 0, "--samples must be positive");
    let mut ours = Vec::new();
    for batch in BATCH_SIZES {
        // Warm-up: this batch size's pipelines and buffers.
        pollster::block_on(model.embed(&gpu, &sentences[..batch]))?;
        // A pass embeds every sentence, `batch` at a time; each is long enough to time on its own.
        let mut rates = Vec::with_capacity(args.samples);
        for _ in 0..args.samples {
            let start = Instant::now();
            for chunk in sentences.chunks(batch) {
                pollster::block_on(model.embed(&gpu, chunk))?;
            }
            rates.push(sentences.len() as f64 / start.elapsed().as_secs_f64());
        }
        let rate = median(&mut rates);
        if !args.json {
            println!("tessera batch {batch:2}: {rate:.1} sentences/s");
        }
        ours.push(rate);
    }
    let largest = *BATCH_SIZES.iter().max().expect("batch sizes");
    let mut embeddings = Vec::new();
    for chunk in sentences.chunks(largest) {
        embeddings.extend(pollster::block_on(model.embed(&gpu, chunk))?);
    }
    let errors = gpu.take_device_errors();
    anyhow::ensure!(errors.is_empty(), "the device reported errors: {errors:?}");
    let tessera_peak_rss_bytes = super::peak_rss_bytes()?;
    if !args.json {
        println!("tessera peak RSS: {:.1} MiB (lavapipe buffers live in host memory)", mib(tessera_peak_rss_bytes));
    }

    let python = args.python.clone().or_else(|| super::find_peer(&[PEER_PYTHON])).unwrap_or_else(|| PathBuf::from("python3"));
    if !args.json {
        println!("numpy peer: running the same forward with {} ...", python.display());
    }
    let (peer, peer_missing, peer_rates) = match run_peer(&python, &weights, &config_path, &sentences, args.samples)? {
        Err(missing) => (None, Some(missing), None),
        Ok(out) => {
            anyhow::ensure!(out.embeddings.len() == embeddings.len(), "the NumPy peer returned {} embeddings for {}", out.embeddings.len(), embeddings.len());
            let min_cosine = embeddings.iter().zip(&out.embeddings).map(|(a, b)| cosine(a, b)).fold(f64::INFINITY, f64::min);
            let rates: Vec<Option<f64>> = BATCH_SIZES.iter().map(|b| out.sentences_per_second.get(&b.to_string()).copied()).collect();
            let summary = PeerSummary { python: python.display().to_string(), numpy: out.numpy, blas: out.blas, peak_rss_bytes: out.peak_rss_bytes, min_cosine };
            (Some(summary), None, Some(rates))
        }
    };
    // A peer that computes something else is no peer: its speed is not a ratio's denominator.
    let agrees = peer.as_ref().is_some_and(|p| p.min_cosine >= MIN_COSINE);
    let rows: Vec<Row> = BATCH_SIZES
        .iter()
        .zip(&ours)
        .enumerate()
        .map(|(i, (&batch, &rate))| {
            let numpy = peer_rates.as_ref().and_then(|r| r[i]);
            Row { batch, tessera_sentences_per_second: rate, numpy_sentences_per_second: numpy, ratio: numpy.filter(|_| agrees).map(|n| rate / n) }
        })
        .collect();
    let report = Report { adapter, model: dir.display().to_string(), sentences: sentences.len(), tokens_min, tokens_max, rows, tessera_peak_rss_bytes, peer, peer_missing };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_peer(&report);
    }
    Ok(())
}

/// Runs `bert_numpy.py` with `python`. `Ok(Err(why))` when the peer cannot be had here (no
/// Python, no NumPy); an error when it ran and failed.
fn run_peer(python: &Path, weights: &Path, config: &Path, sentences: &[Vec<u32>], samples: usize) -> anyhow::Result<Result<PeerOutput, String>> {
    let request = serde_json::json!({
        "safetensors": weights,
        "config": config,
        "sentences": sentences,
        "batch_sizes": BATCH_SIZES,
        "samples": samples,
    });
    let how = "build the peers with `cargo run -p xtask -- build-peers` (a venv with NumPy in target/peers), or pass --python with one that has NumPy";
    let mut child = match Command::new(python).arg("-c").arg(PEER_SCRIPT).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => return Ok(Err(format!("cannot start {}: {e}; {how}", python.display()))),
    };
    child.stdin.take().context("the peer's stdin")?.write_all(request.to_string().as_bytes()).context("writing to the NumPy peer")?;
    let out = child.wait_with_output().context("waiting for the NumPy peer")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("No module named 'numpy'") {
            return Ok(Err(format!("{} has no NumPy; {how}", python.display())));
        }
        bail!("the NumPy peer failed ({}): {}", out.status, stderr.trim());
    }
    let output = serde_json::from_slice(&out.stdout).context("reading the NumPy peer's output")?;
    Ok(Ok(output))
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * y).sum();
    let norm = |v: f64| v.sqrt();
    dot / (norm(a.iter().map(|&x| f64::from(x).powi(2)).sum()) * norm(b.iter().map(|y| y * y).sum()))
}

fn print_peer(report: &Report) {
    let Some(peer) = &report.peer else {
        println!("numpy peer: missing, no ratios: {}", report.peer_missing.as_deref().unwrap_or("unknown"));
        return;
    };
    println!("numpy peer: NumPy {} with {}; peak RSS {:.1} MiB", peer.numpy, peer.blas, mib(peer.peak_rss_bytes));
    let verdict = if peer.min_cosine >= MIN_COSINE { "agree" } else { "DISAGREE: ratios withheld" };
    println!("embeddings: min cosine tessera vs numpy {:.7} ({verdict}, bar {MIN_COSINE})", peer.min_cosine);
    for row in &report.rows {
        let show = |v: Option<f64>, unit: &str| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}{unit}"));
        println!(
            "batch {:2}: tessera {:.1} | numpy {} sentences/s | ratio {}",
            row.batch,
            row.tessera_sentences_per_second,
            show(row.numpy_sentences_per_second, ""),
            show(row.ratio, "x")
        );
    }
}
