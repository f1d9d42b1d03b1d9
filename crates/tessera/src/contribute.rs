//! `tessera contribute`: a native contributor. It joins a coordinator over WebRTC, speaking the
//! protocol a browser tab speaks, announces this machine's GPU, and runs the units it is given
//! on the engine. Model files are fetched over the DataChannel by CID, checked against it, and
//! kept in a local blob cache, so the next start loads them at once.
//!
//! Three tasks share one DataChannel: the reader (routes what arrives), the heartbeat, and the
//! worker (one unit at a time: fetch what it lacks, compute on a blocking thread, send the result
//! as tensor frames followed by `UnitResult`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_coordinator::blobs::BlobStore;
use tessera_engine::Gpu;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::checks::Rng;
use tessera_engine::cid::Cid;
use tessera_protocol::{
    AdapterLimits, Architecture, Capabilities, Chunker, ContributorMessage, CoordinatorMessage, Decoded, ErrorCode, Incoming,
    ModelManifest, PROTOCOL_VERSION, PayloadKind, PayloadRef, Reassembler, ReassemblyLimits, UnitId, Work,
};
use tessera_rtc::{Message, PeerEvent, PeerSender};
use tokio::sync::{Mutex, mpsc, oneshot};

#[derive(clap::Args)]
pub struct ContributeArgs {
    /// The coordinator's address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    coordinator: String,
    /// Where verified model files are kept (default: the user's cache folder).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Testing only: add noise to every result, as a dishonest contributor would. The
    /// coordinator must never accept these results.
    #[arg(long, hide = true)]
    perturb: bool,
}

/// The largest blob (a model file) fetched in one piece; a bound on what a coordinator can make
/// this process buffer.
const MAX_BLOB_BYTES: u64 = 1 << 30;
/// Reconnection back-off after the coordinator goes away.
const BACKOFF: [u64; 6] = [1, 2, 4, 8, 15, 30];

pub fn contribute(args: ContributeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: ContributeArgs) -> anyhow::Result<()> {
    let gpu = Arc::new(Gpu::request().await.context("this machine has no GPU adapter wgpu can use")?);
    let cache_dir = args.cache.clone().unwrap_or_else(|| tessera_engine::cache::model_cache_dir().join("blobs"));
    let blobs = Arc::new(BlobStore::open(&cache_dir).with_context(|| format!("opening the blob cache {}", cache_dir.display()))?);
    let capabilities = capabilities(&gpu).await?;
    eprintln!("tessera contribute: {} ({}), score {:.1} GFLOP/s", capabilities.adapter, capabilities.backend, capabilities.benchmark_score);
    let models = Arc::new(Mutex::new(HashMap::new()));
    let mut failures = 0;
    loop {
        let session = Session { gpu: gpu.clone(), blobs: blobs.clone(), models: models.clone(), perturb: args.perturb };
        let started = Instant::now();
        tokio::select! {
            result = session.run(&args.coordinator, capabilities.clone()) => match result {
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
#[error("the coordinator refused this contributor: {0}")]
struct Refused(String);

/// One connection to the coordinator.
struct Session {
    gpu: Arc<Gpu>,
    blobs: Arc<BlobStore>,
    /// Models loaded so far, by model id (manifest CID); they survive reconnections.
    models: Arc<Mutex<HashMap<String, Arc<Bert>>>>,
    perturb: bool,
}

/// What the reader hands the worker.
enum Job {
    Unit { unit: UnitId, work: Work },
    Cancel(UnitId),
}

/// State the reader shares with blob fetches: the fetch in flight, if any.
#[derive(Default)]
struct Fetches {
    waiting: Option<(u64, oneshot::Sender<anyhow::Result<Vec<u8>>>)>,
}

impl Session {
    async fn run(self, coordinator: &str, capabilities: Capabilities) -> anyhow::Result<()> {
        let signalling = signalling_url(coordinator)?;
        let bind = SocketAddr::new(local_ip_towards(coordinator)?, 0);
        let mut peer = tessera_rtc::connect(bind, tessera_rtc::Config::default(), |offer| async move {
            tessera_rtc::signal::offer_over_websocket(&signalling, offer).await
        })
        .await
        .with_context(|| format!("connecting to {coordinator}"))?;
        peer.opened().await.context("opening the DataChannel")?;
        let sender = peer.sender();
        send(&sender, &ContributorMessage::Hello { protocol_version: PROTOCOL_VERSION, capabilities }).await?;

        let (jobs, job_queue) = mpsc::channel(64);
        let fetches = Arc::new(Mutex::new(Fetches::default()));
        let streams = Arc::new(AtomicU64::new(1));
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        let mut worker = Some(Worker { session: self, sender: sender.clone(), fetches: fetches.clone(), streams });
        let mut job_queue = Some(job_queue);
        let mut reassembler = Reassembler::new(ReassemblyLimits { max_message_bytes: MAX_BLOB_BYTES, max_partial_messages: 4, max_buffered_bytes: MAX_BLOB_BYTES });
        let mut worker_task = None;

        let outcome = loop {
            let Some(event) = peer.recv().await else { break Err(anyhow!("the transport stopped")) };
            let message = match event {
                PeerEvent::Message(message) => message,
                PeerEvent::Closed(reason) => break Err(anyhow!("the coordinator's DataChannel closed: {reason}")),
                PeerEvent::Connected | PeerEvent::Open => continue,
            };
            let decoded = match &message {
                Message::Text(text) => tessera_protocol::decode::<CoordinatorMessage>(Incoming::Text(text)),
                Message::Binary(bytes) => tessera_protocol::decode::<CoordinatorMessage>(Incoming::Binary(bytes)),
            };
            match decoded {
                Ok(Decoded::Chunk(chunk)) => match reassembler.push(chunk) {
                    Ok(Some(payload)) => {
                        let mut fetches = fetches.lock().await;
                        match fetches.waiting.take() {
                            Some((stream, reply)) if stream == payload.stream && payload.kind == PayloadKind::Blob => {
                                let _ = reply.send(Ok(payload.bytes));
                            }
                            other => {
                                fetches.waiting = other;
                                eprintln!("tessera contribute: ignoring an unexpected {:?} payload on stream {}", payload.kind, payload.stream);
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break Err(anyhow!("the coordinator sent a bad frame: {e}")),
                },
                Ok(Decoded::Control(message)) => match message {
                    CoordinatorMessage::Welcome { contributor, heartbeat_interval_ms, .. } => {
                        eprintln!("tessera contribute: joined as contributor {contributor}");
                        let interval = Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000));
                        let beat = sender.clone();
                        heartbeat = Some(tokio::spawn(async move {
                            let mut ticks = tokio::time::interval(interval);
                            loop {
                                ticks.tick().await;
                                if send(&beat, &ContributorMessage::Heartbeat).await.is_err() {
                                    return;
                                }
                            }
                        }));
                        if let (Some(worker), Some(queue)) = (worker.take(), job_queue.take()) {
                            worker_task = Some(tokio::spawn(worker.run(queue)));
                        }
                    }
                    CoordinatorMessage::Assign { unit, work, .. } => {
                        if jobs.try_send(Job::Unit { unit, work }).is_err() {
                            eprintln!("tessera contribute: unit {unit} dropped: too many units queued");
                        }
                    }
                    CoordinatorMessage::Cancel { unit } => {
                        let _ = jobs.try_send(Job::Cancel(unit));
                    }
                    CoordinatorMessage::Error { code, message } => {
                        eprintln!("tessera contribute: the coordinator says {code:?}: {message}");
                        match code {
                            ErrorCode::UnsupportedVersion => break Err(Refused(message).into()),
                            ErrorCode::BlobNotFound => {
                                if let Some((_, reply)) = fetches.lock().await.waiting.take() {
                                    let _ = reply.send(Err(anyhow!("the coordinator has no such blob: {message}")));
                                }
                            }
                            _ => {}
                        }
                    }
                    // Direct contributor-to-contributor channels and blob sharing between
                    // contributors come with span serving; a contributor holds no blobs to offer yet.
                    CoordinatorMessage::BlobRequest { cid, stream, .. } => {
                        let refusal = ContributorMessage::Error { code: ErrorCode::BlobNotFound, message: format!("{cid} (stream {stream}): this contributor does not serve blobs") };
                        send(&sender, &refusal).await?;
                    }
                    CoordinatorMessage::Verdict { unit, accepted: false } => eprintln!("tessera contribute: unit {unit}: our result was outvoted"),
                    CoordinatorMessage::Verdict { accepted: true, .. } | CoordinatorMessage::BlobHave { .. } | CoordinatorMessage::Signal { .. } => {}
                    CoordinatorMessage::LoadSpan { .. } | CoordinatorMessage::Forward { .. } | CoordinatorMessage::EndSession { .. } => {
                        send(&sender, &ContributorMessage::Error { code: ErrorCode::SpanFailed, message: "this contributor does not serve spans yet".into() }).await?;
                    }
                },
                Err(e) => eprintln!("tessera contribute: ignoring a message the coordinator should not have sent: {e}"),
            }
        };
        if let Some(task) = heartbeat {
            task.abort();
        }
        if let Some(task) = worker_task {
            task.abort();
        }
        outcome
    }
}

/// Runs units one at a time.
struct Worker {
    session: Session,
    sender: PeerSender,
    fetches: Arc<Mutex<Fetches>>,
    streams: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self, mut queue: mpsc::Receiver<Job>) {
        let mut cancelled = Vec::new();
        while let Some(job) = queue.recv().await {
            let (unit, work) = match job {
                Job::Cancel(unit) => {
                    cancelled.push(unit);
                    continue;
                }
                Job::Unit { unit, .. } if cancelled.contains(&unit) => continue,
                Job::Unit { unit, work } => (unit, work),
            };
            let started = Instant::now();
            match self.unit(unit, work).await {
                Ok(inputs) => eprintln!("tessera contribute: unit {unit}: {inputs} inputs in {:.2} s", started.elapsed().as_secs_f64()),
                Err(e) => {
                    eprintln!("tessera contribute: unit {unit} failed: {e:#}");
                    let report = ContributorMessage::Error { code: ErrorCode::Internal, message: format!("unit {unit}: {e:#}") };
                    if send(&self.sender, &report).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Computes one unit and sends its result; returns how many inputs it had.
    async fn unit(&self, unit: UnitId, work: Work) -> anyhow::Result<usize> {
        let Work::Embedding { model, inputs } = work;
        let bert = self.model(&model).await?;
        let gpu = self.session.gpu.clone();
        let count = inputs.len();
        let mut vectors = tokio::task::spawn_blocking(move || pollster::block_on(bert.embed(&gpu, &inputs))).await??;
        if self.session.perturb {
            perturb(&mut vectors, unit.0);
        }
        let width = vectors.first().map_or(0, Vec::len);
        let flat: Vec<f32> = vectors.into_iter().flatten().collect();
        let tensor = tessera_protocol::Tensor::from_f32(vec![count as u64, width as u64], &flat)?;
        let bytes = tensor.encode();
        let stream = self.streams.fetch_add(1, Ordering::Relaxed);
        for frame in Chunker::new(stream, PayloadKind::Tensor, &bytes)? {
            self.sender.send(Message::Binary(frame)).await?;
        }
        send(&self.sender, &ContributorMessage::UnitResult { unit, payload: PayloadRef { stream, bytes: bytes.len() as u64 } }).await?;
        Ok(count)
    }

    /// The model `id` names (a manifest CID), loaded once.
    async fn model(&self, id: &str) -> anyhow::Result<Arc<Bert>> {
        if let Some(bert) = self.session.models.lock().await.get(id) {
            return Ok(bert.clone());
        }
        let manifest = ModelManifest::parse(&self.blob(id).await?).with_context(|| format!("model {id}"))?;
        if manifest.architecture != Architecture::Bert {
            bail!("model {} is a {:?} model; embedding units need a BERT encoder", manifest.name, manifest.architecture);
        }
        let config_bytes = self.blob(manifest.file("config.json")?).await?;
        let config = BertConfig::from_json("config.json", &config_bytes)?;
        let weights = manifest.file("model.safetensors")?.parse::<Cid>()?;
        self.fetch(&weights).await?;
        let mut blob = self.session.blobs.get(&weights)?;
        let gpu = self.session.gpu.clone();
        let name = format!("{} model.safetensors", manifest.name);
        let bert = tokio::task::spawn_blocking(move || Bert::load(&gpu, config, &name, &mut blob.file)).await??;
        let bert = Arc::new(bert);
        self.session.models.lock().await.insert(id.to_string(), bert.clone());
        eprintln!("tessera contribute: loaded {} ({id})", manifest.name);
        Ok(bert)
    }

    /// The bytes of a (small) blob, from the cache if it holds them intact.
    async fn blob(&self, cid: &str) -> anyhow::Result<Vec<u8>> {
        let cid: Cid = cid.parse()?;
        if let Ok(mut blob) = self.session.blobs.get(&cid) {
            let mut bytes = Vec::with_capacity(blob.len as usize);
            std::io::Read::read_to_end(&mut blob.file, &mut bytes)?;
            if cid.verify(&cid.to_string(), &bytes).is_ok() {
                return Ok(bytes);
            }
        }
        self.download(&cid).await
    }

    /// Makes sure the cache holds `cid` intact, fetching it if not. A cached blob is re-hashed
    /// first: a file altered on disk is fetched again, never used.
    async fn fetch(&self, cid: &Cid) -> anyhow::Result<()> {
        let blobs = self.session.blobs.clone();
        let cached = *cid;
        let intact = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            if !blobs.contains(&cached) {
                return Ok(false);
            }
            let mut blob = blobs.get(&cached)?;
            Ok(Cid::of_reader(&cached.to_string(), &mut blob.file)? == cached)
        })
        .await??;
        if !intact {
            self.download(cid).await?;
        }
        Ok(())
    }

    /// Fetches `cid` from the coordinator into the cache, which checks it against the CID.
    async fn download(&self, cid: &Cid) -> anyhow::Result<Vec<u8>> {
        let stream = self.streams.fetch_add(1, Ordering::Relaxed);
        let (reply, bytes) = oneshot::channel();
        self.fetches.lock().await.waiting = Some((stream, reply));
        send(&self.sender, &ContributorMessage::BlobRequest { cid: cid.to_string(), offset: 0, length: 0, stream }).await?;
        let bytes = bytes.await.map_err(|_| anyhow!("the connection closed while fetching {cid}"))??;
        let started = Instant::now();
        self.session.blobs.insert_expecting(cid, &cid.to_string(), &mut bytes.as_slice())?;
        eprintln!("tessera contribute: fetched {cid} ({} bytes, stored in {:.1} s)", bytes.len(), started.elapsed().as_secs_f64());
        Ok(bytes)
    }
}

async fn send(sender: &PeerSender, message: &ContributorMessage) -> anyhow::Result<()> {
    let text = serde_json::to_string(message)?;
    sender.send(Message::Text(text)).await.context("sending to the coordinator")
}

/// What this contributor tells the coordinator about itself, with a measured score.
async fn capabilities(gpu: &Gpu) -> anyhow::Result<Capabilities> {
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
        memory_budget_bytes: limits.max_buffer_size.min(2 << 30),
        benchmark_score: {
            let started = Instant::now();
            tessera_engine::score::matmul_score(gpu, &|| started.elapsed().as_secs_f64() * 1e3).await?
        },
        max_concurrent_units: 1,
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
