//! `tessera bench decode`: prefill and steady-state greedy decode of a llama-family GGUF on the
//! engine, with dispatches, submits and peak memory, beside llama.cpp's `llama-bench` on the same
//! file in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tessera_engine::generate::{Sampler, Session};
use tessera_engine::gguf::Gguf;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::tokenizer::TextTokenizer;
use tessera_engine::{DType, Gpu};

use super::{llama_cpp, median, mib};

/// The targets for a decode step.
const TARGET_SUBMITS: f64 = 1.0;
const TARGET_DISPATCHES: f64 = 200.0;
const TARGET_RATIO_CPU: f64 = 0.5;

/// Plain prose for the prompt; repeated until it is long enough. Only its length matters for
/// speed, but real text keeps the decode on realistic tokens.
const PROMPT_TEXT: &str = "The history of the printing press begins long before Gutenberg. Block printing \
    spread from China to Korea and Japan, and movable type made of clay and later of metal appeared \
    centuries before it reached Europe. What changed in Mainz was the combination of an oil-based ink, \
    a screw press adapted from wine making and a hand mould that cast letters quickly and precisely. ";

#[derive(Args)]
pub struct DecodeArgs {
    /// `smollm2`, or the path of a GGUF llama-family model.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt in each repetition.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed repetitions (after a warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// The `llama-bench` binary; by default the one `cargo xtask bench` builds into target/peers.
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// CPU threads for llama.cpp (default: the cores available, which lavapipe also uses).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    adapter: tessera_engine::AdapterSummary,
    model: String,
    prompt_tokens: usize,
    decode_tokens: usize,
    tessera: Ours,
    llama_cpp: Option<llama_cpp::Figures>,
    /// Why there is no llama.cpp figure, when there is none.
    llama_cpp_missing: Option<String>,
    prefill_ratio: Option<f64>,
    decode_ratio: Option<f64>,
}

#[derive(Serialize)]
struct Ours {
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    /// The slowest and fastest repetitions: how noisy the machine was.
    decode_range: (f64, f64),
    /// Per decode token, from the engine's counters.
    submits_per_token: f64,
    dispatches_per_token: f64,
    copies_per_token: f64,
    readbacks_per_token: f64,
    /// Where a decode step's time goes (median milliseconds, a separate pass).
    breakdown_ms: Breakdown,
    peak_rss_bytes: u64,
    weight_bytes: u64,
    /// Bytes of idle pooled buffers at the end, and buffers the pool created in all.
    pool_idle_bytes: u64,
    pool_buffers_created: u64,
}

#[derive(Serialize)]
struct Breakdown {
    /// Recording the kernels (bind groups, parameters) on the CPU.
    record: f64,
    /// `Batch::submit`: writing parameters, finishing and submitting the command buffer.
    submit: f64,
    /// Waiting for the device to run the kernels.
    execute: f64,
    /// Copying the logits row back and mapping it.
    readback: f64,
    /// Picking the token from the logits on the CPU.
    sample: f64,
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.prompt_tokens > 0 && args.decode_tokens > 0 && args.repetitions > 0, "token counts and repetitions must be positive");
    let path = super::resolve_model(&args.model)?;
    let name = path.display().to_string();
    let mut file = std::fs::File::open(&path).with_context(|| format!("opening {name}"))?;
    let gguf = Gguf::read(&name, &mut file)?;
    let tokenizer = TextTokenizer::from_gguf(&name, &gguf)?;
    let prompt = prompt_ids(&tokenizer, args.prompt_tokens)?;

    let gpu = pollster::block_on(Gpu::request()).context("finding a GPU adapter")?;
    let model = Llama::load(&gpu, &name, &mut file, &Stages::all())?;
    let capacity = args.prompt_tokens + args.decode_tokens;
    anyhow::ensure!(capacity <= model.config.context, "{capacity} tokens exceed the model's context of {}", model.config.context);
    let adapter = gpu.adapter().clone();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    if !args.json {
        println!("adapter: {} ({}, {}, {})", adapter.name, adapter.backend, adapter.device_type, adapter.driver);
        println!(
            "model: {name} ({} blocks, dim {}, vocab {}); prompt {} tokens, then {} decoded greedily; median of {} repetitions",
            model.config.blocks, model.config.dim, model.config.vocab, args.prompt_tokens, args.decode_tokens, args.repetitions
        );
    }

    let peer_binary = llama_cpp::find(args.llama_bench.as_deref())?;
    let llama_cpp_missing = peer_binary.is_none().then(|| format!("llama-bench not found under target/peers: {}", llama_cpp::HOW_TO_BUILD));
    if !args.json {
        match &peer_binary {
            Some(binary) => println!("peer: {} on the same file, {threads} threads, one repetition after each of ours", binary.display()),
            None => println!("peer: missing: {}", llama_cpp_missing.as_deref().unwrap_or_default()),
        }
    }

    // Warm-up: every pipeline compiled and every pooled buffer allocated once.
    run_once(&gpu, &model, &prompt, args.decode_tokens.min(4))?;
    // Ours and the peer's alternate, so that both see the same share of a shared machine's load.
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut counted = None;
    let mut peer_rounds = Vec::new();
    for _ in 0..args.repetitions {
        let run = run_once(&gpu, &model, &prompt, args.decode_tokens)?;
        prefill.push(run.prefill.as_secs_f64());
        decode.push(args.decode_tokens as f64 / run.decode.as_secs_f64());
        counted = Some(run.per_token);
        if let Some(binary) = &peer_binary {
            peer_rounds.push(llama_cpp::measure(binary, &path, args.prompt_tokens, args.decode_tokens, threads, 1)?);
        }
    }
    let per_token = counted.expect("at least one repetition");
    let breakdown = breakdown(&gpu, &model, &prompt, args.decode_tokens)?;
    let errors = gpu.take_device_errors();
    anyhow::ensure!(errors.is_empty(), "the device reported errors: {errors:?}");
    let pool = gpu.pool_stats();
    let ours = Ours {
        prefill_tokens_per_second: args.prompt_tokens as f64 / median(&mut prefill),
        decode_tokens_per_second: median(&mut decode),
        decode_range: (decode[0], decode[decode.len() - 1]),
        submits_per_token: per_token[0],
        dispatches_per_token: per_token[1],
        copies_per_token: per_token[2],
        readbacks_per_token: per_token[3],
        breakdown_ms: breakdown,
        peak_rss_bytes: super::peak_rss_bytes()?,
        weight_bytes: gpu.counters().weight_bytes,
        pool_idle_bytes: pool.idle_bytes,
        pool_buffers_created: pool.created,
    };
    if !args.json {
        print_ours(&ours);
    }
    let llama_cpp = llama_cpp::Figures::median_of(peer_rounds);
    let prefill_ratio = llama_cpp.as_ref().map(|p| ours.prefill_tokens_per_second / p.prefill_tokens_per_second);
    let decode_ratio = llama_cpp.as_ref().map(|p| ours.decode_tokens_per_second / p.decode_tokens_per_second);
    let report = Report {
        adapter,
        model: name,
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        tessera: ours,
        llama_cpp,
        llama_cpp_missing,
        prefill_ratio,
        decode_ratio,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_peer(&report);
    }
    Ok(())
}

/// The first `count` tokens of the prompt text, repeated as often as needed.
fn prompt_ids(tokenizer: &TextTokenizer, count: usize) -> anyhow::Result<Vec<u32>> {
    let once = tokenizer.encode(PROMPT_TEXT, false)?;
    anyhow::ensure!(!once.is_empty(), "the prompt text encodes to no tokens");
    Ok(once.iter().copied().cycle().take(count).collect())
}

struct Timed {
    prefill: Duration,
    decode: Duration,
    /// Submits, dispatches, copies, readbacks per decode token.
    per_token: [f64; 4],
}

/// A fresh session: the prompt, then `decode` greedy tokens, as `tessera run` does them.
fn run_once(gpu: &Gpu, model: &Llama, prompt: &[u32], decode: usize) -> anyhow::Result<Timed> {
    let mut session = Session::new(gpu, model, prompt.len() + decode)?;
    let mut sampler = Sampler::greedy();
    let start = Instant::now();
    let mut logits = pollster::block_on(session.feed(prompt))?;
    let prefill = start.elapsed();
    let before = gpu.counters();
    let start = Instant::now();
    for _ in 0..decode {
        let next = sampler.sample(&logits);
        logits = pollster::block_on(session.feed(&[next]))?;
    }
    let decode_time = start.elapsed();
    let after = gpu.counters();
    let per = |a: u64, b: u64| (a - b) as f64 / decode as f64;
    Ok(Timed {
        prefill,
        decode: decode_time,
        per_token: [
            per(after.submits, before.submits),
            per(after.dispatches, before.dispatches),
            per(after.copies, before.copies),
            per(after.readbacks, before.readbacks),
        ],
    })
}

/// The decode step taken apart with the same public calls `Session::feed` makes, waiting for the
/// device between them, so each phase can be timed on its own.
fn breakdown(gpu: &Gpu, model: &Llama, prompt: &[u32], decode: usize) -> anyhow::Result<Breakdown> {
    let c = &model.config;
    let mut cache = model.kv_cache(gpu, 0..c.blocks, prompt.len() + decode)?;
    let logits = gpu.empty(&[1, c.vocab], DType::F32)?;
    let mut sampler = Sampler::greedy();
    let mut phases: [Vec<f64>; 5] = Default::default();
    let mut tokens = prompt.to_vec();
    for step in 0..=decode {
        let first = cache.len as u32;
        let ids = gpu.upload_u32(&[tokens.len()], &tokens)?;
        let positions: Vec<u32> = (first..first + tokens.len() as u32).collect();
        let positions = gpu.upload_u32(&[tokens.len()], &positions)?;
        let hidden = gpu.empty(&[tokens.len(), c.dim], DType::F32)?;
        let t0 = Instant::now();
        let mut batch = gpu.batch();
        model.embed(&mut batch, &ids, &hidden)?;
        model.forward_span(&mut batch, &hidden, &positions, &mut cache)?;
        model.last_logits(&mut batch, &hidden, &logits)?;
        let t1 = Instant::now();
        batch.submit();
        let t2 = Instant::now();
        gpu.wait_idle()?;
        let t3 = Instant::now();
        let row = pollster::block_on(gpu.read_f32(&logits))?;
        let t4 = Instant::now();
        let next = sampler.sample(&row);
        let t5 = Instant::now();
        tokens.clear();
        tokens.push(next);
        if step > 0 {
            // Step 0 is the prompt.
            for (phase, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]) {
                phase.push((b - a).as_secs_f64() * 1e3);
            }
        }
    }
    let [record, submit, execute, readback, sample] = phases.map(|mut p| median(&mut p));
    Ok(Breakdown { record, submit, execute, readback, sample })
}

fn print_ours(ours: &Ours) {
    let b = &ours.breakdown_ms;
    println!("tessera prefill: {:.1} tokens/s", ours.prefill_tokens_per_second);
    let (slow, fast) = ours.decode_range;
    println!("tessera decode:  {:.1} tokens/s (repetitions {slow:.1} to {fast:.1})", ours.decode_tokens_per_second);
    println!(
        "per decode token: {:.2} submits ({:.2} of them readbacks), {:.1} dispatches, {:.2} copies",
        ours.submits_per_token, ours.readbacks_per_token, ours.dispatches_per_token, ours.copies_per_token
    );
    println!(
        "decode step, median ms: record {:.2} | submit {:.2} | execute {:.2} | readback {:.2} | sample {:.2}",
        b.record, b.submit, b.execute, b.readback, b.sample
    );
    println!(
        "memory: peak RSS {:.1} MiB (lavapipe buffers live in host memory), weights {:.1} MiB, pool {:.1} MiB idle of {} buffers created",
        mib(ours.peak_rss_bytes),
        mib(ours.weight_bytes),
        mib(ours.pool_idle_bytes),
        ours.pool_buffers_created
    );
}

fn print_peer(report: &Report) {
    let ours = &report.tessera;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    match (&report.llama_cpp, &report.llama_cpp_missing) {
        (Some(peer), _) => {
            println!("peer: {} ({} threads, {})", peer.build, peer.threads, peer.cpu);
            println!("llama.cpp prefill: {:.1} tokens/s", peer.prefill_tokens_per_second);
            let (slow, fast) = peer.decode_range;
            println!(
                "llama.cpp decode:  {:.1} tokens/s at depth {} (repetitions {slow:.1} to {fast:.1}; {:.1} from an empty context)",
                peer.decode_tokens_per_second, report.prompt_tokens, peer.decode_at_depth_0_tokens_per_second
            );
            let (prefill, decode) = (report.prefill_ratio.unwrap_or(f64::NAN), report.decode_ratio.unwrap_or(f64::NAN));
            println!("ratio tessera / llama.cpp: prefill {prefill:.2}x, decode {decode:.2}x");
            if report.adapter.device_type == "Cpu" {
                println!("target decode >= {TARGET_RATIO_CPU}x llama.cpp on the CPU: {} ({decode:.2}x)", met(decode >= TARGET_RATIO_CPU));
            } else {
                println!("(the {TARGET_RATIO_CPU}x-of-llama.cpp target is for a CPU adapter such as lavapipe; this one is {})", report.adapter.device_type);
            }
        }
        (None, reason) => println!("llama.cpp: peer missing, no ratios: {}", reason.as_deref().unwrap_or("unknown")),
    }
    println!(
        "target {TARGET_SUBMITS} submit per token: {} ({:.2}); target <= {TARGET_DISPATCHES} dispatches per token: {} ({:.1})",
        met(ours.submits_per_token <= TARGET_SUBMITS),
        ours.submits_per_token,
        met(ours.dispatches_per_token <= TARGET_DISPATCHES),
        ours.dispatches_per_token
    );
}
