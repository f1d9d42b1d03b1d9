//! `tessera contribute`: a native contributor. It joins a coordinator over WebRTC and runs the
//! contributor's protocol, `tessera_contributor::Session` (the one a browser tab runs too, with
//! `Policy::NATIVE`), on this machine's GPU. This file is glue: it moves messages between the
//! session and the sockets, runs the jobs the session hands out, and reports back; it decides
//! nothing the session decides.
//!
//! One loop per connection owns the session. Jobs run elsewhere and report on one queue: units
//! (`units.rs`, on a blocking thread, their models loaded once and fetched through the session),
//! span jobs (`spans.rs`, one task running them in order, forwards batched as the session's
//! `next_span_jobs` groups them), blob jobs (checked, kept and read in the verified
//! `BlobStore` on blocking threads) and direct channels (`links.rs`, a task each). The session
//! wakes the loop by its own deadlines (heartbeats, links that must open, passes and borrows
//! that take too long).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_contributor::{BlobJob, Event, MAX_LENDS, Millis, Outgoing, Output, Policy, Session, StoreError};
use tessera_coordinator::blobs::{BlobError, BlobStore};
use tessera_engine::Gpu;
use tessera_engine::bert::Bert;
use tessera_engine::checks::Rng;
use tessera_engine::cid::Cid;
use tessera_protocol::{AdapterLimits, Capabilities, ErrorCode, Incoming, MAX_LINKS};
use tessera_rtc::{Endpoint, Message, PeerEvent};
use tokio::sync::{Mutex, mpsc, oneshot};

mod links;
mod spans;
mod units;

#[derive(clap::Args)]
pub struct ContributeArgs {
    /// The coordinator's address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    coordinator: String,
    /// Where verified model files are kept (default: the user's cache folder).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Testing only: add noise to every result and corrupt every shard lent, as a dishonest
    /// contributor would. The coordinator must never accept these results, nor a borrower
    /// those shards.
    #[arg(long, hide = true)]
    perturb: bool,
    /// GPU memory the coordinator may use here, in MiB (default: what the adapter allows, at
    /// most 2 GiB). It decides how many blocks of a language model this contributor holds.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// Testing only: report this matmul score (GFLOP/s) instead of measuring one, so that a
    /// benchmark's placement does not depend on a noisy measurement.
    #[arg(long, hide = true, value_parser = positive_score)]
    score: Option<f64>,
    /// Testing only: refuse `Link`s, so every hop goes through the coordinator.
    #[arg(long, hide = true)]
    no_links: bool,
}

fn positive_score(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(score) if score.is_finite() && score > 0.0 => Ok(score),
        _ => Err(format!("a score is a positive number of GFLOP/s, not {text:?}")),
    }
}

/// Reconnection back-off after the coordinator goes away.
const BACKOFF: [u64; 6] = [1, 2, 4, 8, 15, 30];
/// Completions and messages from the jobs and channels waiting for the loop.
const DONE_QUEUE: usize = 1024;

pub fn contribute(args: ContributeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: ContributeArgs) -> anyhow::Result<()> {
    let gpu = Arc::new(Gpu::request().await.context("this machine has no GPU adapter wgpu can use")?);
    let cache_dir = args.cache.clone().unwrap_or_else(|| tessera_engine::cache::model_cache_dir().join("blobs"));
    let blobs = Arc::new(BlobStore::open(&cache_dir).with_context(|| format!("opening the blob cache {}", cache_dir.display()))?);
    let capabilities = capabilities(&gpu, args.memory_budget_mib, args.score).await?;
    eprintln!("tessera contribute: {} ({}), score {:.1} GFLOP/s", capabilities.adapter, capabilities.backend, capabilities.benchmark_score);
    let machine = Machine { gpu, blobs, models: Arc::new(Mutex::new(HashMap::new())), perturb: args.perturb };
    let policy = Policy { links: !args.no_links, ..Policy::NATIVE };
    let mut failures = 0;
    loop {
        let started = Instant::now();
        tokio::select! {
            result = connection(&machine, &args.coordinator, capabilities.clone(), policy) => match result {
                Ok(()) => return Ok(()),
                Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
                Err(e) => eprintln!("tessera contribute: {e:#}"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        // A session that ran a while resets the back-off.
        failures = if started.elapsed() > Duration::from_secs(60) { 0 } else { failures + 1 };
        let wait = BACKOFF[failures.min(BACKOFF.len() - 1)];
        eprintln!("tessera contribute: reconnecting in {wait} s");
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// The coordinator refused this contributor for good (e.g. another protocol version).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// What outlives a connection: the GPU, the verified blob cache and the models loaded for units.
#[derive(Clone)]
struct Machine {
    gpu: Arc<Gpu>,
    blobs: Arc<BlobStore>,
    /// Models loaded for units, by model id (manifest CID).
    models: Arc<Mutex<HashMap<String, Arc<Bert>>>>,
    /// `--perturb`: lie in unit results and lent shards.
    perturb: bool,
}

/// What a job or a channel reports to the loop.
enum Done {
    Unit {
        unit: tessera_protocol::UnitId,
        busy_ms: f64,
        result: Result<Vec<Vec<f32>>, String>,
    },
    /// A unit's job needs blob `cid` in the cache.
    Fetch {
        cid: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Span(spans::SpanDone),
    Checked {
        cid: String,
        held: bool,
    },
    Stored {
        cid: String,
        result: Result<(), StoreError>,
    },
    Read {
        link: u64,
        stream: u64,
        cid: String,
        result: Result<Vec<u8>, (ErrorCode, String)>,
    },
    Link(u64, links::LinkEvent),
}

/// Milliseconds since `start`, the session's clock.
fn millis(start: Instant) -> Millis {
    start.elapsed().as_secs_f64() * 1e3
}

/// One connection to the coordinator: until it fails, or the coordinator refuses us.
async fn connection(machine: &Machine, coordinator: &str, capabilities: Capabilities, mut policy: Policy) -> anyhow::Result<()> {
    let signalling = signalling_url(coordinator)?;
    let ip = local_ip_towards(coordinator)?;
    let bind = SocketAddr::new(ip, 0);
    let mut peer =
        tessera_rtc::connect(bind, tessera_rtc::Config::default(), |offer| async move { tessera_rtc::signal::offer_over_websocket(&signalling, offer).await })
            .await
            .with_context(|| format!("connecting to {coordinator}"))?;
    peer.opened().await.context("opening the DataChannel")?;
    let coordinator_channel = peer.sender();
    // Direct channels from other contributors are answered on an endpoint of this connection,
    // at the address the coordinator sees.
    let endpoint = match policy.links {
        false => None,
        true => {
            let config = tessera_rtc::Config { max_peers: MAX_LINKS + MAX_LENDS, connect_timeout: links::CONNECT_TIMEOUT, ..Default::default() };
            match Endpoint::bind(bind, config).await {
                Ok(endpoint) => Some(endpoint),
                Err(e) => {
                    eprintln!("tessera contribute: no direct channels ({e}): every hop goes through the coordinator");
                    policy.links = false;
                    None
                }
            }
        }
    };
    let start = Instant::now();
    let mut session = Session::new(capabilities, policy, 1.0, tessera_rtc::STR0M_SEND_BUFFER);
    let (done, mut completions) = mpsc::channel::<Done>(DONE_QUEUE);
    let spans = spans::SpanWorker::start(machine.clone(), done.clone());
    let mut channels = links::Links::new(bind, endpoint, done.clone());
    let mut waiting: HashMap<String, Vec<oneshot::Sender<Result<(), String>>>> = HashMap::new();
    loop {
        while let Some(output) = session.poll() {
            match output {
                Output::Send(message) => coordinator_channel.send(message_of(message)).await.context("sending to the coordinator")?,
                Output::Run(assignment) => {
                    tokio::spawn(units::run(machine.clone(), assignment, done.clone()));
                }
                Output::Span(job) => spans.push(job),
                Output::Blob(job) => blob_job(machine, job, done.clone()),
                Output::Fetched { cid, result } => {
                    for reply in waiting.remove(&cid).unwrap_or_default() {
                        let _ = reply.send(result.clone());
                    }
                }
                Output::Offer { link, peer } => channels.offer(link, peer),
                Output::Answer { link, peer, sdp } => channels.answer(link, peer, sdp),
                Output::Accept { link, sdp } => channels.accept(link, sdp),
                Output::Close { link } => channels.close(link),
                Output::Pass { link, session: id, step, messages } => {
                    if let Err(why) = channels.send(link, messages, Some((id, step))) {
                        session.passed(millis(start), link, id, step, Err(why));
                    }
                }
                Output::SendOn { link, messages } => {
                    if let Err(why) = channels.send(link, messages, None) {
                        session.link_closed(millis(start), link, why);
                    }
                }
                Output::Event(event) => log_event(&event),
                Output::Log(line) => eprintln!("tessera contribute: {line}"),
                Output::Restart(reason) if session.refused() => return Err(Refused(reason).into()),
                Output::Restart(reason) => bail!(reason),
            }
        }
        let wake = session.poll_timeout().map(|at| start + Duration::from_secs_f64((at / 1e3).max(0.0)));
        let timer = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = peer.recv() => match event {
                Some(PeerEvent::Message(Message::Text(text))) => session.handle(millis(start), Incoming::Text(&text)),
                Some(PeerEvent::Message(Message::Binary(bytes))) => session.handle(millis(start), Incoming::Binary(&bytes)),
                Some(PeerEvent::Connected | PeerEvent::Open) => {}
                Some(PeerEvent::Closed(reason)) => bail!("the coordinator's DataChannel closed: {reason}"),
                None => bail!("the transport stopped"),
            },
            Some(completion) = completions.recv() => {
                let now = millis(start);
                match completion {
                    Done::Unit { unit, busy_ms, result } => session.finished(now, unit, busy_ms, result),
                    Done::Fetch { cid, reply } => {
                        waiting.entry(cid.clone()).or_default().push(reply);
                        session.fetch(now, cid);
                    }
                    Done::Span(done) => done.report(&mut session, now),
                    Done::Checked { cid, held } => session.blob_checked(now, &cid, held),
                    Done::Stored { cid, result } => session.blob_stored(now, &cid, result),
                    Done::Read { link, stream, cid, result } => session.blob_read(now, link, stream, &cid, result),
                    Done::Link(link, event) => channels.report(&mut session, now, link, event),
                }
            }
            () = timer => session.handle_timeout(millis(start)),
        }
    }
}

fn message_of(outgoing: Outgoing) -> Message {
    match outgoing {
        Outgoing::Text(text) => Message::Text(text),
        Outgoing::Binary(bytes) => Message::Binary(bytes),
    }
}

/// What the log says of the session's events (the tests read the "joined" line).
fn log_event(event: &Event) {
    match event {
        Event::Joined { contributor } => {
            eprintln!("tessera contribute: joined as contributor {contributor}")
        }
        Event::Unit { unit, inputs, ms, .. } => eprintln!("tessera contribute: unit {unit}: {inputs} inputs in {:.2} s", ms / 1e3),
        Event::Verdict { unit, accepted: false } => eprintln!("tessera contribute: unit {unit}: our result was outvoted"),
        Event::SpanLoaded { shard, start, end } => {
            eprintln!("tessera contribute: span {start}..{end} ({shard}) loaded")
        }
        Event::SpanDropped { shard } => eprintln!("tessera contribute: span {shard} dropped"),
        _ => {}
    }
}

/// Runs a blob job on a blocking thread: the cache is checked, written and read there, and
/// everything kept is checked against its CID first.
fn blob_job(machine: &Machine, job: BlobJob, done: mpsc::Sender<Done>) {
    let (blobs, perturb) = (machine.blobs.clone(), machine.perturb);
    tokio::task::spawn_blocking(move || {
        let report = match job {
            BlobJob::Check { cid } => {
                let held = cid.parse::<Cid>().is_ok_and(|parsed| {
                    blobs.contains(&parsed) && blobs.get(&parsed).is_ok_and(|mut blob| Cid::of_reader(&cid, &mut blob.file).is_ok_and(|c| c == parsed))
                });
                Done::Checked { cid, held }
            }
            BlobJob::Store { cid, bytes } => {
                let result = match cid.parse::<Cid>() {
                    Err(e) => Err(StoreError { corrupt: false, message: format!("{cid:?} is not a CID: {e}") }),
                    Ok(parsed) => match blobs.insert_expecting(&parsed, &cid, &mut bytes.as_slice()) {
                        Ok(()) => Ok(()),
                        Err(e @ BlobError::Cid(_)) => Err(StoreError { corrupt: true, message: e.to_string() }),
                        Err(e) => Err(StoreError { corrupt: false, message: e.to_string() }),
                    },
                };
                Done::Stored { cid, result }
            }
            BlobJob::Read { link, stream, cid, offset, length } => {
                let mut result = blobs.request(&cid, offset, length);
                // `--perturb`: lend corrupted shards, as a dishonest contributor would.
                if perturb && let Ok(Some(byte)) = result.as_mut().map(|bytes| bytes.first_mut()) {
                    *byte ^= 0xff;
                }
                Done::Read { link, stream, cid, result }
            }
        };
        let _ = done.blocking_send(report);
    });
}

/// What this contributor tells the coordinator about itself, with a measured score (the
/// session says whether it lends).
async fn capabilities(gpu: &Gpu, memory_budget_mib: Option<u64>, score: Option<f64>) -> anyhow::Result<Capabilities> {
    let limits = gpu.limits();
    let adapter = gpu.adapter();
    Ok(Capabilities {
        adapter: adapter.name.clone(),
        backend: adapter.backend.clone(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        },
        // What one model of the sizes served needs with room to spare; the scheduler only
        // compares it with what a unit's model takes.
        memory_budget_bytes: memory_budget_mib.map_or(limits.max_buffer_size.min(2 << 30), |mib| mib << 20),
        benchmark_score: match score {
            Some(score) => score,
            None => {
                let started = Instant::now();
                tessera_engine::score::matmul_score(gpu, &|| started.elapsed().as_secs_f64() * 1e3).await?
            }
        },
        max_concurrent_units: 1,
        lends_blobs: true,
    })
}

/// The `--perturb` testing mode: noise of about the vectors' own size, then re-normalised.
fn perturb(vectors: &mut [Vec<f32>], seed: u64) {
    let mut rng = Rng::new(seed ^ u64::from(std::process::id()) << 32 ^ 0x9e37_79b9_7f4a_7c15);
    for vector in vectors {
        for value in vector.iter_mut() {
            *value += rng.uniform(-0.15, 0.15);
        }
        let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        vector.iter_mut().for_each(|v| *v /= norm);
    }
}

/// `ws://HOST:PORT/ws` for `http://HOST:PORT` (and `wss` for `https`).
fn signalling_url(coordinator: &str) -> anyhow::Result<String> {
    let base = coordinator.trim_end_matches('/');
    let url = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}/ws")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}/ws")
    } else {
        bail!("the coordinator's address must start with http:// or https://, got {coordinator:?}");
    };
    Ok(url)
}

/// The local IP this machine reaches the coordinator from: a WebRTC host candidate must be a
/// concrete address. Connecting a UDP socket sends nothing; it only picks the route.
fn local_ip_towards(coordinator: &str) -> anyhow::Result<IpAddr> {
    let host_port = coordinator.split("://").nth(1).unwrap_or(coordinator).split('/').next().unwrap_or_default();
    let with_port = if host_port.contains(':') { host_port.to_string() } else { format!("{host_port}:80") };
    let remote = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving the coordinator {host_port:?}"))?
        .next()
        .ok_or_else(|| anyhow!("the coordinator {host_port:?} resolves to no address"))?;
    if remote.ip().is_loopback() {
        return Ok(remote.ip());
    }
    let unspecified = if remote.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) };
    let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
    socket.connect(remote).with_context(|| format!("finding a route to {remote}"))?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses_become_signalling_urls() {
        assert_eq!(signalling_url("http://127.0.0.1:8080").unwrap(), "ws://127.0.0.1:8080/ws");
        assert_eq!(signalling_url("https://tessera.example/").unwrap(), "wss://tessera.example/ws");
        assert!(signalling_url("127.0.0.1:8080").unwrap_err().to_string().contains("http://"));
        assert_eq!(local_ip_towards("http://127.0.0.1:8080").unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn a_pinned_score_is_a_positive_number() {
        assert_eq!(positive_score("2.5"), Ok(2.5));
        for bad in ["0", "-1", "NaN", "inf", "fast"] {
            assert!(positive_score(bad).unwrap_err().contains("positive number"), "{bad}");
        }
    }

    #[test]
    fn perturbed_vectors_are_far_from_the_honest_ones() {
        let honest: Vec<f32> = (0..384).map(|i| ((i as f32) * 0.37).sin()).collect();
        let norm = honest.iter().map(|v| v * v).sum::<f32>().sqrt();
        let honest: Vec<f32> = honest.iter().map(|v| v / norm).collect();
        let mut lied = vec![honest.clone()];
        perturb(&mut lied, 3);
        let cosine: f32 = honest.iter().zip(&lied[0]).map(|(a, b)| a * b).sum();
        assert!(cosine < 0.99, "cosine {cosine}");
    }
}
