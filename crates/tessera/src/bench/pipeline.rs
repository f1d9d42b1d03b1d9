//! `tessera bench pipeline`: generation split across contributors, measured end to end on real
//! `tessera serve` and `tessera contribute` processes (this binary) on loopback: decode rate in
//! 1, 2 and 3 spans beside a local run, the cost of a hop (over direct contributor-to-contributor
//! channels, and relayed by the coordinator with `contribute --no-links`), 8 sessions at once,
//! and the stall when a span's holder is killed mid-stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};
use tessera_engine::generate::{Sampler, Session};
use tessera_engine::gguf::Gguf;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::tokenizer::{ChatTemplate, TextTokenizer};

use super::median;

const PROMPT: &str = "Write a short poem about the sea.";
/// The targets.
const TARGET_THREE_SPAN_RATIO: f64 = 0.8;
const TARGET_HOP_MS: f64 = 2.0;
const TARGET_STALL_SPARE_S: f64 = 2.0;
const TARGET_STALL_NO_SPARE_S: f64 = 10.0;
/// Long enough for lavapipe on a busy two-core machine; a deadline, never a sleep.
const DEADLINE: Duration = Duration::from_secs(300);

/// Memory budgets in MiB. A block of SmolLM2 takes 26.4 to 28 MiB with the coordinator's KV
/// reservation (420 MiB holds 15 of its 30 blocks), so: one contributor holds the whole model;
/// two of about 21 blocks need each other; three of 12 need all three. The last digit tells
/// the processes apart in `/api/contributors`.
const ONE_SPAN: &[u64] = &[1024];
const TWO_SPANS: &[u64] = &[600, 601];
const THREE_SPANS: &[u64] = &[336, 337, 338];
/// A fourth of 12 blocks, started after placement: the spare that takes over a lost span.
const SPARE: u64 = 339;
/// Three of 15 blocks: after one is lost the other two still hold the model, placed afresh.
const THREE_SPANS_NO_SPARE: &[u64] = &[420, 421, 422];

#[derive(Args)]
pub struct PipelineArgs {
    /// Tokens generated per request (greedy).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Timed single-session requests per span count (after a warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Concurrent sessions for the aggregate rate (the coordinator serves 8 at most).
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    prompt: &'static str,
    max_tokens: usize,
    /// `tessera run`'s decode loop in this process, on this machine's adapter.
    local: Decode,
    /// One session with the model in 1, 2 and 3 spans, hops over direct channels.
    spans: Vec<SpanRow>,
    /// The same 3 spans with every hop relayed by the coordinator (`contribute --no-links`).
    relayed: SpanRow,
    /// (per-token ms with k spans - with 1 span) / (k - 1), for k = 2 and 3.
    hop_ms: Vec<(usize, f64)>,
    /// The same from the 3 relayed spans.
    relayed_hop_ms: f64,
    three_over_one: f64,
    concurrent: Option<Concurrent>,
    stall_with_spare: Option<Stall>,
    stall_without_spare: Option<Stall>,
    /// What could not be measured, and why.
    missing: Vec<String>,
}

#[derive(Serialize, Clone, Copy)]
struct Decode {
    /// Tokens after the first per second, from the first to the last token's arrival.
    tokens_per_second: f64,
    first_token_ms: f64,
}

#[derive(Serialize)]
struct SpanRow {
    spans: usize,
    served_by: String,
    /// Hops between stages over the whole run, from `/api/swarm`: how many went directly and
    /// how many were relayed, and the median overhead of each (ms between one stage being done
    /// and the next one's answer, less the time the next one says it took).
    hops: Value,
    decode: Decode,
    /// The slowest and fastest repetitions.
    range: (f64, f64),
}

#[derive(Serialize)]
struct Concurrent {
    sessions: usize,
    spans: usize,
    tokens: usize,
    /// All sessions' tokens over the wall time from the first request sent to the last token.
    tokens_per_second: f64,
}

#[derive(Serialize)]
struct Stall {
    /// The longest gap between consecutive tokens of the stream.
    seconds: f64,
    killed: u64,
    spans_before: String,
    replans: u64,
    /// The stream after the kill gave the same text as one without.
    same_text: bool,
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    ensure!(args.max_tokens >= 8 && args.repetitions > 0 && args.sessions > 0, "--max-tokens must be at least 8, the rest positive");
    let exe = std::env::current_exe().context("finding this binary")?;
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say(format!("pipeline: smollm2, chat {PROMPT:?}, {} tokens greedy, median of {}; real processes on 127.0.0.1", args.max_tokens, args.repetitions));

    let local = local_decode(args.max_tokens)?;
    say(format!("local reference done: {:.1} tokens/s", local.tokens_per_second));
    let mut missing = Vec::new();
    let mut spans = Vec::new();
    for budgets in [ONE_SPAN, TWO_SPANS] {
        let swarm = Swarm::start(&exe, budgets, true)?;
        spans.push(single_session(&swarm, budgets.len(), &args)?);
        say(format!("{} span(s) done", budgets.len()));
    }
    let relayed = single_session(&Swarm::start(&exe, THREE_SPANS, false)?, 3, &args)?;
    say("3 spans relayed by the coordinator done".into());
    let mut swarm = Swarm::start(&exe, THREE_SPANS, true)?;
    spans.push(single_session(&swarm, 3, &args)?);
    // The stall first, on a quiet swarm; the spare holds the middle span afterwards: still three
    // spans for the 8 sessions at once.
    let stall_with_spare = stall(&mut swarm, Some(SPARE), &args).map_err(|e| missing.push(format!("stall with a spare: {e:#}"))).ok();
    say("3 spans and the stall with a spare done".into());
    let concurrent = concurrent(&swarm, &args).map_err(|e| missing.push(format!("{} concurrent sessions: {e:#}", args.sessions))).ok();
    drop(swarm);
    let stall_without_spare =
        Swarm::start(&exe, THREE_SPANS_NO_SPARE, true).and_then(|mut swarm| stall(&mut swarm, None, &args)).map_err(|e| missing.push(format!("stall without a spare: {e:#}"))).ok();

    let per_token_ms = |d: &Decode| 1e3 / d.tokens_per_second;
    let one = per_token_ms(&spans[0].decode);
    let hop_ms = spans[1..].iter().map(|row| (row.spans, (per_token_ms(&row.decode) - one) / (row.spans - 1) as f64)).collect();
    let relayed_hop_ms = (per_token_ms(&relayed.decode) - one) / 2.0;
    let three_over_one = spans[2].decode.tokens_per_second / spans[0].decode.tokens_per_second;
    let report = Report {
        prompt: PROMPT,
        max_tokens: args.max_tokens,
        local,
        spans,
        relayed,
        hop_ms,
        relayed_hop_ms,
        three_over_one,
        concurrent,
        stall_with_spare,
        stall_without_spare,
        missing,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `tessera run --chat`'s loop in this process, timed token by token like the streams.
fn local_decode(max_tokens: usize) -> anyhow::Result<Decode> {
    let path = super::resolve_model("smollm2")?;
    let name = path.display().to_string();
    let mut file = std::fs::File::open(&path).with_context(|| format!("opening {name}"))?;
    let gguf = Gguf::read(&name, &mut file)?;
    let tokenizer = TextTokenizer::from_gguf(&name, &gguf)?;
    let prompt = tokenizer.encode(&ChatTemplate::from_gguf(&name, &gguf)?.render([("user", PROMPT)])?, false)?;
    let gpu = pollster::block_on(tessera_engine::Gpu::request()).context("finding a GPU adapter")?;
    let model = Llama::load(&gpu, &name, &mut file, &Stages::all())?;
    let mut best: Option<Decode> = None;
    // Twice, keeping the second: the first compiles the pipelines.
    for _ in 0..2 {
        let mut session = Session::new(&gpu, &model, prompt.len() + max_tokens)?;
        let mut sampler = Sampler::greedy();
        let start = Instant::now();
        let mut logits = pollster::block_on(session.feed(&prompt))?;
        let mut times = Vec::with_capacity(max_tokens);
        for _ in 0..max_tokens {
            let next = sampler.sample(&logits);
            times.push(Instant::now());
            logits = pollster::block_on(session.feed(&[next]))?;
        }
        best = Some(decode_of(start, &times)?);
    }
    best.context("no local run")
}

/// Tokens after the first per second, from token arrival times.
fn decode_of(sent: Instant, times: &[Instant]) -> anyhow::Result<Decode> {
    let (Some(first), Some(last)) = (times.first(), times.last()) else { bail!("no tokens") };
    ensure!(times.len() >= 2, "one token only: no decode rate");
    Ok(Decode {
        tokens_per_second: (times.len() - 1) as f64 / (*last - *first).as_secs_f64(),
        first_token_ms: (*first - sent).as_secs_f64() * 1e3,
    })
}

/// One session at a time: a warm-up (placement, span loads, shards fetched ahead), then the
/// timed repetitions.
fn single_session(swarm: &Swarm, expected_spans: usize, args: &PipelineArgs) -> anyhow::Result<SpanRow> {
    let warm = swarm.chat(args.max_tokens, |_| {})?;
    ensure!(warm.spans() == expected_spans, "budgets {:?} gave spans {:?}, not {expected_spans}", swarm.budgets(), warm.spans);
    swarm.settle()?;
    let mut rates = Vec::new();
    let mut firsts = Vec::new();
    for _ in 0..args.repetitions {
        let streamed = swarm.chat(args.max_tokens, |_| {})?;
        ensure!(streamed.spans == warm.spans, "the spans changed between requests: {} then {}", warm.spans, streamed.spans);
        let decode = decode_of(streamed.sent, &streamed.tokens)?;
        rates.push(decode.tokens_per_second);
        firsts.push(decode.first_token_ms);
    }
    let tokens_per_second = median(&mut rates);
    Ok(SpanRow {
        spans: expected_spans,
        served_by: warm.spans,
        hops: get_json(swarm.addr, "/api/swarm")?["hops"].clone(),
        decode: Decode { tokens_per_second, first_token_ms: median(&mut firsts) },
        range: (rates[0], rates[rates.len() - 1]),
    })
}

/// `args.sessions` streams at once on the swarm's plan.
fn concurrent(swarm: &Swarm, args: &PipelineArgs) -> anyhow::Result<Concurrent> {
    let start = Instant::now();
    let streams: Vec<anyhow::Result<Streamed>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.sessions).map(|_| scope.spawn(|| swarm.chat(args.max_tokens, |_| {}))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a streaming thread panicked")))).collect()
    });
    let streams = streams.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let tokens: usize = streams.iter().map(|s| s.tokens.len()).sum();
    let end = streams.iter().filter_map(|s| s.tokens.last()).max().context("no tokens")?;
    Ok(Concurrent {
        sessions: args.sessions,
        spans: streams[0].spans(),
        tokens,
        tokens_per_second: tokens as f64 / (*end - start).as_secs_f64(),
    })
}

/// Kills a span's holder (SIGKILL) a quarter of the way into a stream; the stall is the longest
/// gap between tokens. The plan is already made (placement happens on the first request). With
/// `spare`, that contributor joins first, as a standby: it preloads the span it stands by for
/// (the slowest; the first of equals) and from then on runs that span's steps too (a hot
/// standby), and that span's holder is the one killed. Without, the middle span's holder is.
fn stall(swarm: &mut Swarm, spare: Option<u64>, args: &PipelineArgs) -> anyhow::Result<Stall> {
    let reference = swarm.chat(args.max_tokens, |_| {})?;
    ensure!(reference.spans() == 3, "budgets {:?} gave spans {:?}, not 3", swarm.budgets(), reference.spans);
    swarm.settle()?;
    let mut holders = parse_spans(&reference.spans)?;
    holders.sort_unstable();
    // Without a spare, the middle span's holder; with one, the holder of the span it stands by
    // for, once its span is loaded (from then on it runs that span's steps too: hot).
    let mut victim = holders[1].2;
    if let Some(mib) = spare {
        swarm.add(mib)?;
        swarm.wait_until("the spare to stand by, its span loaded", || {
            let swarm = get_json(swarm.addr, "/api/swarm")?;
            let spans = swarm["plan"]["spans"].as_array().cloned().unwrap_or_default();
            Ok(match spans.iter().find(|s| s["standby_ready"] == true).and_then(|s| s["holder"].as_u64()) {
                Some(holder) => {
                    victim = holder;
                    true
                }
                None => false,
            })
        })?;
    }
    let mut victim_proc = swarm.take(victim)?;
    let kill_after = args.max_tokens / 4;
    let mut killed = None;
    let streamed = swarm.chat(args.max_tokens, |count| {
        if count == kill_after && killed.is_none() {
            killed = Some(victim_proc.0.kill());
        }
    })?;
    killed.context("the stream ended before the kill")?.context("SIGKILL a span's holder")?;
    drop(victim_proc);
    let record = get_json(swarm.addr, &format!("/api/requests/{}", streamed.request))?;
    let gaps = streamed.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64());
    Ok(Stall {
        seconds: gaps.fold(0.0, f64::max),
        killed: victim,
        spans_before: reference.spans,
        replans: record["replans"].as_u64().unwrap_or(0),
        same_text: streamed.text == reference.text,
    })
}

fn print_table(r: &Report) {
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let local_ms = 1e3 / r.local.tokens_per_second;
    println!();
    println!("{:<22} {:>13} {:>10} {:>15} {:>10}  served by (blocks=contributor)", "", "decode tok/s", "ms/token", "first token ms", "vs 1 span");
    let one = r.spans[0].decode.tokens_per_second;
    println!(
        "{:<22} {:>13.1} {:>10.1} {:>15.0} {:>10.2}  this process, no network",
        "tessera run (local)", r.local.tokens_per_second, local_ms, r.local.first_token_ms, r.local.tokens_per_second / one
    );
    for (row, relayed) in r.spans.iter().map(|row| (row, false)).chain([(&r.relayed, true)]) {
        let d = &row.decode;
        println!(
            "{:<22} {:>13.1} {:>10.1} {:>15.0} {:>10.2}  {} (repetitions {:.1} to {:.1}; hops direct {}, relayed {})",
            format!("{} span{}{}", row.spans, if row.spans == 1 { "" } else { "s" }, if relayed { ", relayed" } else { "" }),
            d.tokens_per_second,
            1e3 / d.tokens_per_second,
            d.first_token_ms,
            d.tokens_per_second / one,
            row.served_by,
            row.range.0,
            row.range.1,
            row.hops["direct"],
            row.hops["relayed"]
        );
    }
    println!(
        "ratio 3 spans / 1 span: {:.2}x (target >= {TARGET_THREE_SPAN_RATIO}x: {})",
        r.three_over_one,
        met(r.three_over_one >= TARGET_THREE_SPAN_RATIO)
    );
    println!(
        "1 span over the local run: {:.1} ms/token (coordinator embeds and samples, the contributor runs the blocks: two transfers a token)",
        1e3 / one - local_ms
    );
    let measured = |row: &SpanRow, kind: &str| row.hops[format!("{kind}_overhead_ms")].as_f64();
    for row in r.spans.iter().skip(1).chain([&r.relayed]) {
        let (kind, target) = if row.hops["direct"].as_u64() > Some(0) { ("direct", true) } else { ("relayed", false) };
        match measured(row, kind) {
            Some(ms) if target => println!(
                "overhead per hop, measured, {} spans, {kind}: {ms:.2} ms median (target <= {TARGET_HOP_MS} ms on loopback: {}; Petals measured 18 ms)",
                row.spans,
                met(ms <= TARGET_HOP_MS)
            ),
            Some(ms) => println!("overhead per hop, measured, {} spans, {kind} by the coordinator: {ms:.2} ms median", row.spans),
            None => println!("overhead per hop, {} spans: not measured", row.spans),
        }
    }
    let rates = r.hop_ms.iter().map(|(k, ms)| (format!("{k} spans"), *ms)).chain([("3 spans relayed".to_string(), r.relayed_hop_ms)]);
    for (label, ms) in rates {
        println!("  from the decode rates instead, {label}: {ms:.1} ms a hop (on lavapipe a stage's own speed changes with the split, which swamps this)");
    }
    println!(
        "  a hop: span k's holder sends its hidden state straight to span k+1's holder over their DataChannel and tells the coordinator \
         (relayed: to the coordinator, which forwards it: two transfers and the coordinator's turn); measured by the coordinator from span k's `Passed` (or `Forwarded`) \
         to span k+1's answer, less the time span k+1 says the step took there"
    );
    if let Some(c) = &r.concurrent {
        println!(
            "{} concurrent sessions, {} spans: {:.1} tokens/s aggregate ({} tokens, first request sent to last token), {:.2}x one session's decode",
            c.sessions,
            c.spans,
            c.tokens_per_second,
            c.tokens,
            c.tokens_per_second / r.spans[2].decode.tokens_per_second
        );
    }
    let stall = |label: &str, s: &Option<Stall>, target: f64| match s {
        Some(s) => println!(
            "stall, a span's holder (contributor {}) SIGKILLed mid-stream, {label}: {:.2} s longest gap between tokens (target <= {target} s: {}); replans {}, same text as without the kill: {}; spans before {}",
            s.killed,
            s.seconds,
            met(s.seconds <= target),
            s.replans,
            s.same_text,
            s.spans_before
        ),
        None => println!("stall {label}: not measured (below)"),
    };
    stall("with a spare contributor standing by for that span (hot: it ran the span's steps too)", &r.stall_with_spare, TARGET_STALL_SPARE_S);
    stall("without a spare (re-placed on the other two)", &r.stall_without_spare, TARGET_STALL_NO_SPARE_S);
    for line in &r.missing {
        println!("not measured: {line}");
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, however the bench ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A coordinator and its contributors, each with its log in a temporary folder. The processes
/// are dropped (killed) before the folder.
struct Swarm {
    exe: PathBuf,
    addr: SocketAddr,
    links: bool,
    /// (memory budget in MiB, process): the budget names the process in `/api/contributors`.
    contributors: Vec<(u64, Proc)>,
    _coordinator: Proc,
    dir: TempDir,
}

impl Swarm {
    /// `links`: whether the contributors open direct channels (else every hop is relayed).
    fn start(exe: &Path, budgets: &[u64], links: bool) -> anyhow::Result<Swarm> {
        let dir = TempDir(std::env::temp_dir().join(format!("tessera-bench-pipeline-{}-{}{}", std::process::id(), budgets[0], if links { "" } else { "-relayed" })));
        std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
        let log = std::fs::File::create(dir.0.join("serve.log"))?;
        let mut child = Command::new(exe)
            .args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(dir.0.join("data"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting tessera serve")?;
        let stdout = child.stdout.take().context("serve's stdout")?;
        let coordinator = Proc(child);
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines.next().context("tessera serve exited without listening")??;
            if let Some(url) = line.strip_prefix("tessera coordinator listening on http://") {
                break url.parse().context("the coordinator's host:port")?;
            }
        };
        // Whatever else serve prints, so that it never writes to a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let mut swarm = Swarm { exe: exe.to_path_buf(), addr, links, contributors: Vec::new(), _coordinator: coordinator, dir };
        for &mib in budgets {
            swarm.add(mib)?;
        }
        // The model loads in the background: 503 until it has (then 400: max_tokens is too large).
        let probe = json!({ "model": "smollm2", "messages": [{ "role": "user", "content": PROMPT }], "max_tokens": 10_000_000 }).to_string();
        swarm.wait_until("the coordinator to load the model", || Ok(http(addr, "POST", "/v1/chat/completions", Some(probe.as_bytes()))?.0 != 503))?;
        Ok(swarm)
    }

    fn budgets(&self) -> Vec<u64> {
        self.contributors.iter().map(|(mib, _)| *mib).collect()
    }

    /// Starts a contributor and waits until the coordinator lists it.
    fn add(&mut self, mib: u64) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.0.join(format!("contribute-{mib}.log")))?;
        let child = Command::new(&self.exe)
            // One pinned score for all: placement then follows the memory budgets alone.
            .args(["contribute", "--coordinator", &format!("http://{}", self.addr), "--score", "1", "--memory-budget-mib", &mib.to_string(), "--cache"])
            .arg(self.dir.0.join("cache"))
            .args(if self.links { &[][..] } else { &["--no-links"][..] })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tessera contribute")?;
        self.contributors.push((mib, Proc(child)));
        let want = self.contributors.len();
        self.wait_until(&format!("{want} contributors"), || Ok(self.listed()?.len() == want))
    }

    /// (id, memory budget in MiB) of every contributor the coordinator lists.
    fn listed(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let list = get_json(self.addr, "/api/contributors")?;
        Ok(list["contributors"]
            .as_array()
            .context("a list of contributors")?
            .iter()
            .filter_map(|c| Some((c["id"].as_u64()?, c["memory_budget_bytes"].as_u64()? >> 20)))
            .collect())
    }

    /// Takes contributor `id`'s process out of the swarm (to kill it).
    fn take(&mut self, id: u64) -> anyhow::Result<Proc> {
        let (_, mib) = self.listed()?.into_iter().find(|(c, _)| *c == id).with_context(|| format!("contributor {id} is not listed"))?;
        let at = self.contributors.iter().position(|(m, _)| *m == mib).with_context(|| format!("no process with a budget of {mib} MiB"))?;
        Ok(self.contributors.remove(at).1)
    }

    /// Waits until no contributor is fetching shards ahead (`fetching_ahead` in `/api/swarm`):
    /// a one-time background download after placement that would otherwise share the CPU with
    /// the timed steps, and that a stall without a spare counts on.
    fn settle(&self) -> anyhow::Result<()> {
        self.wait_until("contributors to fetch their shards ahead", || Ok(get_json(self.addr, "/api/swarm")?["fetching_ahead"] == 0))
    }

    fn wait_until(&self, what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
        let start = Instant::now();
        while !check()? {
            ensure!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what} (logs in {})", self.dir.0.display());
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// A streamed greedy chat completion; `each` hears the count of tokens so far as each arrives.
    fn chat(&self, max_tokens: usize, mut each: impl FnMut(usize)) -> anyhow::Result<Streamed> {
        let body = json!({
            "model": "smollm2",
            "messages": [{ "role": "user", "content": PROMPT }],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": true,
        })
        .to_string();
        let sent = Instant::now();
        let mut stream = request(self.addr, "POST", "/v1/chat/completions", body.as_bytes())?;
        let (status, headers) = read_head(&mut stream)?;
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut streamed = Streamed {
            sent,
            tokens: Vec::new(),
            text: String::new(),
            spans: header("x-tessera-spans").unwrap_or_default(),
            request: header("x-tessera-request").unwrap_or_default(),
        };
        let mut pending = String::new();
        let mut failure = None;
        let whole = read_body(&mut stream, &headers, |piece| {
            pending.push_str(&String::from_utf8_lossy(piece));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else { continue };
                let Ok(chunk) = serde_json::from_str::<Value>(data) else { continue };
                if chunk.get("error").is_some() {
                    failure = Some(chunk.to_string());
                }
                // One chunk per token (the first also carries the role); the last, with a finish
                // reason, carries none.
                let Some(choice) = chunk["choices"].get(0) else { continue };
                if choice["finish_reason"].is_null() {
                    streamed.tokens.push(Instant::now());
                    streamed.text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
                    each(streamed.tokens.len());
                }
            }
        })?;
        ensure!(status == 200, "POST /v1/chat/completions: {status}: {}", String::from_utf8_lossy(&whole));
        if let Some(failure) = failure {
            bail!("the stream failed: {failure}");
        }
        Ok(streamed)
    }
}

/// What a streamed request gave.
struct Streamed {
    sent: Instant,
    /// When each token's chunk arrived.
    tokens: Vec<Instant>,
    text: String,
    /// `x-tessera-spans`: `0-10=3,10-20=5,...`
    spans: String,
    request: String,
}

impl Streamed {
    fn spans(&self) -> usize {
        self.spans.split(',').filter(|s| !s.is_empty()).count()
    }
}

/// `0-10=3,10-20=5`: (first block, end block, contributor) per span.
fn parse_spans(value: &str) -> anyhow::Result<Vec<(u32, u32, u64)>> {
    value
        .split(',')
        .map(|span| {
            let parsed = span.split_once('=').and_then(|(blocks, holder)| {
                let (a, b) = blocks.split_once('-')?;
                Some((a.parse().ok()?, b.parse().ok()?, holder.parse().ok()?))
            });
            parsed.with_context(|| format!("a span of x-tessera-spans {value:?}"))
        })
        .collect()
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> anyhow::Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    Ok(BufReader::new(stream))
}

/// The status and the headers (names in lower case).
fn read_head(reader: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("a status line, got {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            return Ok((status, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
}

/// The body, handed to `each` piece by piece as it arrives (chunked or not); returns all of it.
fn read_body(reader: &mut BufReader<TcpStream>, headers: &[(String, String)], mut each: impl FnMut(&[u8])) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    if !headers.iter().any(|(k, v)| k == "transfer-encoding" && v == "chunked") {
        reader.read_to_end(&mut body)?;
        each(&body);
        return Ok(body);
    }
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size)? == 0 {
            return Ok(body);
        }
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).context("a chunk size")?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        chunk.truncate(size);
        if size == 0 {
            return Ok(body);
        }
        each(&chunk);
        body.extend_from_slice(&chunk);
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut reader = request(addr, method, path, body.unwrap_or_default())?;
    let (status, headers) = read_head(&mut reader)?;
    Ok((status, read_body(&mut reader, &headers, |_| {})?))
}

fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, body) = http(addr, "GET", path, None)?;
    ensure!(status == 200, "GET {path}: {status}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
}
