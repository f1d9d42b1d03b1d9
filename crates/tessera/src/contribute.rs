//! `tessera contribute`: a native contributor. It joins a coordinator over WebRTC, speaking the
//! protocol a browser tab speaks, announces this machine's GPU, and runs the units it is given
//! on the engine. Model files are fetched over the DataChannel by CID, checked against it, and
//! kept in a local blob cache, so the next start loads them at once.
//!
//! Five tasks share one DataChannel: the reader (routes what arrives), the heartbeat, the
//! worker (one unit at a time: fetch what it lacks, compute on a blocking thread, send the result
//! as tensor frames followed by `UnitResult`), the span worker (spans of a language model:
//! fetch a span's shard by CID, load it as a `SpanStage`, run each `Forward` on a blocking
//! thread, those queued together for one span as one batch, and send the states on: as tensor
//! frames and a `PeerMessage::Forward` over the direct channel to the next stage when one is
//! open, then `Passed`, or else back as tensor frames followed by `Forwarded`) and the
//! prefetcher (shards a `Prefetch` names, fetched into the cache ahead of a takeover).
//! Heartbeats never wait for the others.
//!
//! Hot standbys: a step passed on directly also goes, after its `Passed`, as a shadow copy
//! (`Forward { shadow: true }`) to each standby of the next span with an open channel here, sent
//! in order by a task of its own (`send_shadows`), so a slow standby never holds up the span. A
//! shadow step runs like any other, keeping that standby's caches current for a takeover, but
//! is never answered or passed on, and its failures are only logged.
//!
//! Direct channels with the contributors holding the spans next to ours (`Link`, `Unlink`; the
//! table of them is `links.rs`) have a task each: an upstream contributor's channel is answered
//! by an `Endpoint` of this connection, and what it sends becomes span jobs in the span worker's
//! queue, as the coordinator's `Forward`s do; a channel to a downstream one is offered (SDP
//! relayed by the coordinator as `Signal`s) and carries our outputs. Anything wrong on a channel
//! closes that channel only; its hops go through the coordinator. Links end with the connection.
//!
//! Shards from peers (`shards.rs`): a contributor that loads a span fetches its shard from the
//! peers the `LoadSpan` names, over a channel it offers them, before trying the coordinator; and
//! it lends the shards it holds to the contributors a `Lend` names, from its verified cache.
//! Whatever a peer sends is checked against the CID before it is used or kept.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_coordinator::blobs::{BlobError, BlobStore};
use tessera_engine::Gpu;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::checks::Rng;
use tessera_engine::cid::Cid;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::stage::{EXACT_BATCH_ROWS, SpanStage, Step};
use tessera_protocol::{
    AdapterLimits, Architecture, Blocks, Capabilities, ChannelPurpose, Chunker, ContributorId, ContributorMessage, CoordinatorMessage, Decoded, ErrorCode,
    Forward, Incoming, MAX_LINKS, MAX_PREFETCH, ModelManifest, NextHop, PROTOCOL_VERSION, Payload, PayloadKind, PayloadRef, PeerMessage,
    Reassembler, ReassemblyLimits, SignalPayload, Standby, UnitId, Work,
};
use tessera_rtc::{Endpoint, Message, PeerEvent, PeerSender};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::links::{Lends, Links, Side};

mod shards;

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

/// The largest blob (a model file) fetched in one piece; a bound on what a coordinator can make
/// this process buffer.
const MAX_BLOB_BYTES: u64 = 1 << 30;
/// Complete tensor payloads waiting for their `Forward`.
const MAX_WAITING_TENSORS: usize = 8;
/// Largest hidden-state tensor accepted for a `Forward` (a full 8k context of a 576-wide model
/// is 19 MB).
const MAX_HIDDEN_BYTES: usize = 32 << 20;
/// Shadow copies waiting to go out to standbys; more are dropped (the standby falls behind).
const SHADOW_QUEUE: usize = 64;
/// Reconnection back-off after the coordinator goes away.
const BACKOFF: [u64; 6] = [1, 2, 4, 8, 15, 30];
/// How long a downstream contributor may take to answer our offer (relayed by the coordinator),
/// and a direct channel to open once offered (a busy tab can be slow to do either).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses before offering a downstream contributor a channel again, after one failed to open.
const OFFER_RETRIES: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(10)];
/// How long passing a step's output over a direct channel may take; then the channel is closed
/// and the output goes through the coordinator.
const PASS_TIMEOUT: Duration = Duration::from_secs(5);

pub fn contribute(args: ContributeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: ContributeArgs) -> anyhow::Result<()> {
    let gpu = Arc::new(Gpu::request().await.context("this machine has no GPU adapter wgpu can use")?);
    let cache_dir = args.cache.clone().unwrap_or_else(|| tessera_engine::cache::model_cache_dir().join("blobs"));
    let blobs = Arc::new(BlobStore::open(&cache_dir).with_context(|| format!("opening the blob cache {}", cache_dir.display()))?);
    let mut capabilities = capabilities(&gpu, args.memory_budget_mib, args.score).await?;
    // Lending takes the direct channels `--no-links` turns off.
    capabilities.lends_blobs &= !args.no_links;
    eprintln!("tessera contribute: {} ({}), score {:.1} GFLOP/s", capabilities.adapter, capabilities.backend, capabilities.benchmark_score);
    let models = Arc::new(Mutex::new(HashMap::new()));
    let mut failures = 0;
    loop {
        let session = Session { gpu: gpu.clone(), blobs: blobs.clone(), models: models.clone(), perturb: args.perturb, no_links: args.no_links };
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
#[derive(Clone)]
struct Session {
    gpu: Arc<Gpu>,
    blobs: Arc<BlobStore>,
    /// Models loaded so far, by model id (manifest CID); they survive reconnections.
    models: Arc<Mutex<HashMap<String, Arc<Bert>>>>,
    perturb: bool,
    /// `--no-links`: every hop through the coordinator.
    no_links: bool,
}

/// What the reader hands the worker.
enum Job {
    Unit { unit: UnitId, work: Work },
    Cancel(UnitId),
}

/// What the reader hands the span worker.
enum SpanJob {
    /// Load a span, fetching its shard from `peers` (which were told to lend it) or else
    /// from the coordinator.
    Load { shard: String, blocks: Blocks, max_sessions: u32, peers: Vec<ContributorId> },
    Forward { shard: String, step: ForwardStep },
    End { session: u64 },
    Unload { shard: String },
}

/// One session's step through a span: what a `Forward` carries.
struct ForwardStep {
    session: u64,
    step: u64,
    start: u32,
    capacity: u32,
    hidden: tessera_protocol::Tensor,
    /// The stages after this one, for passing the output on directly.
    then: Vec<NextHop>,
    /// A standby's copy of a holder's step: run, never answered.
    shadow: bool,
    /// The upstream contributor that sent it over a direct channel (`None`: the coordinator).
    from: Option<ContributorId>,
    /// When its message arrived: the answer says how long it took here.
    arrived: Instant,
}

impl ForwardStep {
    /// Its hidden-state rows (`usize::MAX` for a tensor that is not `[rows, dim]`, which then
    /// runs alone and fails).
    fn rows(&self) -> usize {
        match self.hidden.dims() {
            [rows, _] => usize::try_from(*rows).unwrap_or(usize::MAX),
            _ => usize::MAX,
        }
    }
}

/// State the reader shares with blob fetches: the fetches in flight, by stream.
#[derive(Default)]
struct Fetches {
    waiting: HashMap<u64, oneshot::Sender<anyhow::Result<Vec<u8>>>>,
}

impl Session {
    async fn run(self, coordinator: &str, capabilities: Capabilities) -> anyhow::Result<()> {
        let signalling = signalling_url(coordinator)?;
        let ip = local_ip_towards(coordinator)?;
        let bind = SocketAddr::new(ip, 0);
        let mut peer = tessera_rtc::connect(bind, tessera_rtc::Config::default(), |offer| async move {
            tessera_rtc::signal::offer_over_websocket(&signalling, offer).await
        })
        .await
        .with_context(|| format!("connecting to {coordinator}"))?;
        peer.opened().await.context("opening the DataChannel")?;
        let sender = peer.sender();
        send(&sender, &ContributorMessage::Hello { protocol_version: PROTOCOL_VERSION, capabilities }).await?;

        let (jobs, job_queue) = mpsc::channel(64);
        let (span_jobs, span_queue) = mpsc::channel(256);
        // Shards to fetch ahead, in case this contributor is asked to take a span over.
        let (prefetches, prefetch_queue) = mpsc::channel::<(Cid, Vec<ContributorId>)>(MAX_PREFETCH);
        let fetches = Arc::new(Mutex::new(Fetches::default()));
        let streams = Arc::new(AtomicU64::new(1));
        // Direct channels from upstream contributors are answered on this endpoint, at the
        // address the coordinator sees. Without one (`--no-links`), `Link`s are ignored.
        let endpoint = match self.no_links {
            true => Err("--no-links".to_string()),
            false => Endpoint::bind(bind, tessera_rtc::Config { max_peers: MAX_LINKS, connect_timeout: ANSWER_TIMEOUT, ..Default::default() }).await.map_err(|e| e.to_string()),
        };
        let links: Arc<std::sync::Mutex<LinkTable>> = Arc::new(std::sync::Mutex::new(Links::new(MAX_LINKS)));
        let lends: Arc<std::sync::Mutex<Lends<LinkTask>>> = Arc::new(std::sync::Mutex::new(Lends::new(shards::MAX_LENDS, shards::LEND_WINDOW)));
        // Set by the `Welcome` (which gives our id) when there is an endpoint.
        let mut link_context: Option<LinkContext> = None;
        let mut links_ignored = false;
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        let (cache, perturb) = (self.blobs.clone(), self.perturb);
        let mut worker = Some(Worker { session: self, sender: sender.clone(), fetches: fetches.clone(), streams });
        let mut job_queue = Some(job_queue);
        let mut span_queue = Some(span_queue);
        let mut prefetch_queue = Some(prefetch_queue);
        let mut span_task = None;
        let mut prefetch_task = None;
        // Tensor payloads (a `Forward`'s hidden states) that wait for their control message.
        let mut tensors: VecDeque<Payload> = VecDeque::new();
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
                    Ok(Some(payload)) if payload.kind == PayloadKind::Tensor => {
                        if tensors.len() >= MAX_WAITING_TENSORS {
                            break Err(anyhow!("the coordinator sent {MAX_WAITING_TENSORS} tensors without their forward messages"));
                        }
                        tensors.push_back(payload);
                    }
                    Ok(Some(payload)) => {
                        let waiting = fetches.lock().await.waiting.remove(&payload.stream);
                        match waiting {
                            Some(reply) if payload.kind == PayloadKind::Blob => {
                                let _ = reply.send(Ok(payload.bytes));
                            }
                            _ => eprintln!("tessera contribute: ignoring an unexpected {:?} payload on stream {}", payload.kind, payload.stream),
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
                        if let Ok(endpoint) = &endpoint {
                            let answers = Arc::new(std::sync::Mutex::new(HashMap::new()));
                            let (links, span_jobs) = (links.clone(), span_jobs.clone());
                            let lends = lends.clone();
                            link_context = Some(LinkContext { own: contributor, ip, endpoint: endpoint.clone(), coordinator: sender.clone(), links, lends, blobs: cache.clone(), answers, span_jobs, perturb });
                        }
                        if let (Some(worker), Some(queue), Some(spans), Some(ahead)) = (worker.take(), job_queue.take(), span_queue.take(), prefetch_queue.take()) {
                            // Shadow copies go out from a task of their own, in order, so that a slow
                            // standby never holds up the span; it ends with the span worker.
                            let (shadows, copies) = mpsc::channel(SHADOW_QUEUE);
                            tokio::spawn(send_shadows(copies, links.clone(), worker.streams.clone()));
                            let span_worker = SpanWorker { worker: worker.clone(), spans: HashMap::new(), links: links.clone(), shadows, context: link_context.clone() };
                            span_task = Some(tokio::spawn(span_worker.run(spans)));
                            prefetch_task = Some(tokio::spawn(worker.clone().prefetch(ahead, link_context.clone())));
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
                            // The error does not say which stream: every fetch in flight fails.
                            ErrorCode::BlobNotFound => {
                                for (_, reply) in fetches.lock().await.waiting.drain() {
                                    let _ = reply.send(Err(anyhow!("the coordinator has no such blob: {message}")));
                                }
                            }
                            _ => {}
                        }
                    }
                    // Blob sharing between contributors comes later; a contributor holds no blobs
                    // to offer yet.
                    CoordinatorMessage::BlobRequest { cid, stream, .. } => {
                        let refusal = ContributorMessage::Error { code: ErrorCode::BlobNotFound, message: format!("{cid} (stream {stream}): this contributor does not serve blobs") };
                        send(&sender, &refusal).await?;
                    }
                    CoordinatorMessage::Verdict { unit, accepted: false } => eprintln!("tessera contribute: unit {unit}: our result was outvoted"),
                    CoordinatorMessage::Verdict { accepted: true, .. } | CoordinatorMessage::BlobHave { .. } => {}
                    CoordinatorMessage::Link { peer: other, offer } => match &link_context {
                        Some(context) => context.link(other, offer),
                        None if !links_ignored => {
                            links_ignored = true;
                            let why = endpoint.as_ref().err().map_or("not joined yet", String::as_str);
                            eprintln!("tessera contribute: ignoring direct channels ({why}): every hop goes through the coordinator");
                        }
                        None => {}
                    },
                    CoordinatorMessage::Unlink { peer: other } => {
                        if let Some(context) = &link_context {
                            context.unlink(other);
                        }
                    }
                    CoordinatorMessage::Lend { peer: borrower, blobs } => match &link_context {
                        Some(context) => context.lend(borrower, blobs),
                        None => eprintln!("tessera contribute: not lending shards to contributor {borrower}: this connection takes no direct channels"),
                    },
                    CoordinatorMessage::Signal { from, payload, .. } => match (payload, &link_context) {
                        (SignalPayload::Offer { sdp, purpose: ChannelPurpose::Forwards }, Some(context)) => context.offered(from, sdp),
                        (SignalPayload::Offer { sdp, purpose: ChannelPurpose::Blobs }, Some(context)) => context.borrower_offered(from, sdp),
                        (SignalPayload::Answer { sdp }, Some(context)) => context.answered(from, sdp),
                        // Channels go by full SDP (host candidates inside), so candidates are not needed.
                        (SignalPayload::Candidate { .. }, _) => {}
                        (_, None) => eprintln!("tessera contribute: ignoring a signal from contributor {from}: this connection takes no direct channels"),
                    },
                    CoordinatorMessage::LoadSpan { shard, blocks, max_sessions, peers, .. } => {
                        if span_jobs.try_send(SpanJob::Load { shard: shard.clone(), blocks, max_sessions, peers }).is_err() {
                            send(&sender, &ContributorMessage::Error { code: ErrorCode::SpanFailed, message: format!("span {shard}: too many span jobs queued") }).await?;
                        }
                    }
                    CoordinatorMessage::Forward(forward) => {
                        let (session, step, shadow) = (forward.session, forward.step, forward.shadow);
                        let refusal = match forward_job(&mut tensors, forward, None) {
                            Ok(job) => span_jobs.try_send(job).err().map(|_| "too many span jobs queued".to_string()),
                            Err(e) => Some(e),
                        };
                        match refusal {
                            // A shadow step is never answered: this standby only falls behind.
                            Some(why) if shadow => eprintln!("tessera contribute: shadow of session {session} step {step} dropped: {why}"),
                            Some(why) => send(&sender, &ContributorMessage::Error { code: ErrorCode::SpanFailed, message: format!("session {session} step {step}: {why}") }).await?,
                            None => {}
                        }
                    }
                    CoordinatorMessage::EndSession { session } => {
                        let _ = span_jobs.try_send(SpanJob::End { session });
                    }
                    CoordinatorMessage::UnloadSpan { shard } => {
                        let _ = span_jobs.try_send(SpanJob::Unload { shard });
                    }
                    CoordinatorMessage::Prefetch { blobs, mut lenders } => {
                        for blob in blobs.iter().take(MAX_PREFETCH) {
                            match blob.parse::<Cid>() {
                                // A full queue only means fetching this one when it is needed.
                                Ok(cid) => drop(prefetches.try_send((cid, lenders.remove(blob).unwrap_or_default()))),
                                Err(e) => eprintln!("tessera contribute: not prefetching {blob}: {e}"),
                            }
                        }
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
        for task in [span_task, prefetch_task].into_iter().flatten() {
            task.abort();
        }
        // Links and lends die with the connection: their tasks stop, dropping their channels.
        lock(&links).clear();
        lock(&lends).clear();
        outcome
    }
}

/// Runs units one at a time.
#[derive(Clone)]
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
        send_payload(&self.sender, stream, PayloadKind::Tensor, &bytes).await?;
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

    /// Fetches the shards the coordinator names ahead of need, one at a time, from the peers
    /// that lend each (through `context`) or the coordinator, and says so (`BlobHave`: this
    /// contributor may be named to lend them); a failure only means fetching that one when it
    /// is needed.
    async fn prefetch(self, mut queue: mpsc::Receiver<(Cid, Vec<ContributorId>)>, context: Option<LinkContext>) {
        while let Some((cid, lenders)) = queue.recv().await {
            match self.fetch_from(&cid, &lenders, context.as_ref()).await {
                Ok(_) => {
                    if send(&self.sender, &ContributorMessage::BlobHave { cids: vec![cid.to_string()] }).await.is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("tessera contribute: prefetching {cid}: {e:#}"),
            }
        }
    }

    /// Makes sure the cache holds `cid` intact, fetching it from the coordinator if not.
    async fn fetch(&self, cid: &Cid) -> anyhow::Result<()> {
        self.fetch_from(cid, &[], None).await.map(drop)
    }

    /// Makes sure the cache holds `cid` intact, fetching it if not: from each of `peers` in
    /// turn (over a channel offered through `context`), then from the coordinator. A cached
    /// blob is re-hashed first: a file altered on disk is fetched again, never used. The peer
    /// it came from, if one did.
    async fn fetch_from(&self, cid: &Cid, peers: &[ContributorId], context: Option<&LinkContext>) -> anyhow::Result<Option<ContributorId>> {
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
        if intact {
            return Ok(None);
        }
        // Without direct channels (`--no-links`), no peer can be asked.
        for &peer in peers {
            let Some(context) = context else { break };
            let started = Instant::now();
            // The error, and whether the bytes arrived but do not match the CID.
            let fetched = match context.borrow(peer, cid).await {
                Ok(bytes) => match self.session.blobs.insert_expecting(cid, &cid.to_string(), &mut bytes.as_slice()) {
                    Ok(()) => Ok(bytes.len()),
                    Err(e @ BlobError::Cid(_)) => Err((anyhow::Error::from(e), true)),
                    Err(e) => Err((e.into(), false)),
                },
                Err(e) => Err((e, false)),
            };
            match fetched {
                Ok(len) => {
                    eprintln!("tessera contribute: fetched {cid} from contributor {peer} ({len} bytes in {:.1} s)", started.elapsed().as_secs_f64());
                    return Ok(Some(peer));
                }
                Err((e, corrupt)) => {
                    eprintln!("tessera contribute: fetching {cid} from contributor {peer} failed: {e:#}; trying elsewhere");
                    let report = ContributorMessage::BorrowFailed { lender: peer, cid: cid.to_string(), corrupt, message: format!("{e:#}") };
                    send(&self.sender, &report).await?;
                }
            }
        }
        self.download(cid).await?;
        Ok(None)
    }

    /// Fetches `cid` from the coordinator into the cache, which checks it against the CID.
    async fn download(&self, cid: &Cid) -> anyhow::Result<Vec<u8>> {
        let stream = self.streams.fetch_add(1, Ordering::Relaxed);
        let (reply, bytes) = oneshot::channel();
        self.fetches.lock().await.waiting.insert(stream, reply);
        let started = Instant::now();
        send(&self.sender, &ContributorMessage::BlobRequest { cid: cid.to_string(), offset: 0, length: 0, stream }).await?;
        let bytes = bytes.await.map_err(|_| anyhow!("the connection closed while fetching {cid}"))??;
        self.session.blobs.insert_expecting(cid, &cid.to_string(), &mut bytes.as_slice())?;
        eprintln!("tessera contribute: fetched {cid} from the coordinator ({} bytes in {:.1} s)", bytes.len(), started.elapsed().as_secs_f64());
        Ok(bytes)
    }
}

/// Runs span jobs in order: loads, forwards and session ends. `Forward`s for one span that wait
/// in the queue together (distinct sessions, at most `EXACT_BATCH_ROWS` rows in all) run as one
/// batch, which computes for each exactly what it would alone; any other job is a barrier. A
/// span lives as long as this connection (its sessions' caches would be stale on another).
struct SpanWorker {
    worker: Worker,
    /// Loaded spans by shard CID.
    spans: HashMap<String, Arc<std::sync::Mutex<SpanStage>>>,
    /// The direct channels, for passing outputs on.
    links: Arc<std::sync::Mutex<LinkTable>>,
    /// Copies of the steps passed on, for the next spans' standbys (`send_shadows`).
    shadows: mpsc::Sender<ShadowCopy>,
    /// For fetching shards from peers; none without direct channels (`--no-links`).
    context: Option<LinkContext>,
}

impl SpanWorker {
    async fn run(mut self, mut queue: mpsc::Receiver<SpanJob>) {
        // A job taken from the queue that did not join the batch before it.
        let mut next = None;
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match queue.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let outcome = match job {
                SpanJob::Load { shard, blocks, max_sessions, peers } => {
                    let started = Instant::now();
                    match self.load(&shard, blocks, max_sessions, &peers).await {
                        Ok(fetched_from) => {
                            eprintln!("tessera contribute: span {}..{} ({shard}) loaded in {:.1} s", blocks.start, blocks.end, started.elapsed().as_secs_f64());
                            send(&self.worker.sender, &ContributorMessage::SpanReady { shard, fetched_from }).await
                        }
                        Err(e) => self.fail(format!("span {}..{} ({shard}): {e:#}", blocks.start, blocks.end)).await,
                    }
                }
                SpanJob::Forward { shard, step } => {
                    let steps;
                    (steps, next) = batch_forwards(&shard, step, &mut queue);
                    self.forward(&shard, steps).await
                }
                SpanJob::End { session } => {
                    for stage in self.spans.values() {
                        if let Ok(mut stage) = stage.lock() {
                            stage.end(session);
                        }
                    }
                    Ok(())
                }
                SpanJob::Unload { shard } => {
                    if self.spans.remove(&shard).is_some() {
                        eprintln!("tessera contribute: span {shard} unloaded");
                    }
                    Ok(())
                }
            };
            if outcome.is_err() {
                return;
            }
        }
    }

    async fn fail(&self, message: String) -> anyhow::Result<()> {
        eprintln!("tessera contribute: {message}");
        send(&self.worker.sender, &ContributorMessage::Error { code: ErrorCode::SpanFailed, message }).await
    }

    /// Fetches and checks the shard (or finds it in the cache) and loads its blocks; the peer
    /// the shard came from, if one of `peers` lent it.
    async fn load(&mut self, shard: &str, blocks: Blocks, max_sessions: u32, peers: &[ContributorId]) -> anyhow::Result<Option<ContributorId>> {
        if self.spans.contains_key(shard) {
            return Ok(None);
        }
        let cid: Cid = shard.parse()?;
        let fetched_from = self.worker.fetch_from(&cid, peers, self.context.as_ref()).await?;
        let mut blob = self.worker.session.blobs.get(&cid)?;
        let gpu = self.worker.session.gpu.clone();
        let range = blocks.start as usize..blocks.end as usize;
        let name = format!("span shard {shard}");
        let stage = tokio::task::spawn_blocking(move || -> anyhow::Result<SpanStage> {
            let model = Llama::load(&gpu, &name, &mut blob.file, &Stages { embedding: false, blocks: range.clone(), head: false })?;
            Ok(SpanStage::new(model, range, max_sessions.max(1) as usize)?)
        })
        .await??;
        self.spans.insert(shard.to_string(), Arc::new(std::sync::Mutex::new(stage)));
        Ok(fetched_from)
    }

    /// Runs sessions' steps through a loaded span, as one batch, and sends each its states back
    /// (or an error naming it). Fails only when the connection does.
    async fn forward(&self, shard: &str, steps: Vec<ForwardStep>) -> anyhow::Result<()> {
        let mut answers: Vec<(Onward, anyhow::Result<Vec<f32>>)> = Vec::with_capacity(steps.len());
        // Each runnable step's `Onward`, and its input for `run_steps`.
        let (mut runnable, mut inputs) = (Vec::with_capacity(steps.len()), Vec::with_capacity(steps.len()));
        for ForwardStep { session, step, start, capacity, hidden, then, shadow, from, arrived } in steps {
            let values = match hidden.dims() {
                &[rows, _] => hidden.f32_values().map(|v| (rows, v.collect())).with_context(|| format!("hidden states of {:?}, not F32", hidden.dtype())),
                dims => Err(anyhow!("hidden states of dims {dims:?}, not [rows, dim]")),
            };
            match values {
                Ok((rows, values)) => {
                    runnable.push(Onward { session, step, start, capacity, rows, then, shadow, from, arrived });
                    inputs.push((session, capacity as usize, start as usize, values));
                }
                Err(e) => answers.push((Onward { session, step, start, capacity, rows: 0, then, shadow, from, arrived }, Err(e))),
            }
        }
        let outputs: Vec<anyhow::Result<Vec<f32>>> = match self.spans.get(shard) {
            _ if inputs.is_empty() => Vec::new(),
            None => inputs.iter().map(|_| Err(anyhow!("this span is not loaded here"))).collect(),
            Some(stage) => {
                let (stage, gpu) = (stage.clone(), self.worker.session.gpu.clone());
                let count = inputs.len();
                match tokio::task::spawn_blocking(move || run_steps(&stage, &gpu, &inputs)).await {
                    Ok(outputs) => outputs,
                    Err(e) => (0..count).map(|_| Err(anyhow!("the span's thread failed: {e}"))).collect(),
                }
            }
        };
        answers.extend(runnable.into_iter().zip(outputs));
        // Copies for the standbys of the steps passed on directly, sent once every step is answered.
        let mut copies = Vec::new();
        for (onward, output) in answers {
            match output {
                // A shadow step only keeps this standby's caches current: nothing is answered.
                Ok(_) if onward.shadow => {}
                Err(e) if onward.shadow => eprintln!("tessera contribute: span {shard}, shadow of session {} step {}: {e:#}", onward.session, onward.step),
                Ok(output) => copies.extend(self.send_states(onward, &output).await?),
                // A peer's step that cannot run here (bad states, or a span moved off this
                // contributor since) is the peer's problem, not this span's: said, never
                // `SpanFailed`, so no peer can get a span taken from its holder.
                Err(e) => match onward.from {
                    Some(peer) => {
                        let message = format!("span {shard}, session {} step {} from contributor {peer}: {e:#}", onward.session, onward.step);
                        eprintln!("tessera contribute: {message}");
                        send(&self.worker.sender, &ContributorMessage::Error { code: ErrorCode::Malformed, message }).await?;
                    }
                    None => self.fail(format!("span {shard}, session {} step {}: {e:#}", onward.session, onward.step)).await?,
                },
            }
        }
        for copy in copies {
            if self.shadows.try_send(copy).is_err() {
                eprintln!("tessera contribute: a shadow copy for a standby dropped: {SHADOW_QUEUE} are waiting to go out");
            }
        }
        Ok(())
    }

    /// Sends a step's output states on: straight to the next stage when the channel to it is
    /// open (then `Passed` to the coordinator, and the copy its standbys are to get comes back),
    /// else back to the coordinator as tensor frames followed by `Forwarded`. A channel that
    /// fails to take them is closed.
    async fn send_states(&self, onward: Onward, output: &[f32]) -> anyhow::Result<Option<ShadowCopy>> {
        let Onward { session, step, start, capacity, rows, then, arrived, .. } = onward;
        let ms = arrived.elapsed().as_secs_f64() * 1e3;
        let tensor = tessera_protocol::Tensor::from_f32(vec![rows, output.len() as u64 / rows.max(1)], output)?;
        let bytes = tensor.encode();
        let passing = lock(&self.links).pass(&then);
        if let (Some((channel, epoch)), Some(next)) = (passing, then.first()) {
            let stream = self.worker.streams.fetch_add(1, Ordering::Relaxed);
            let payload = PayloadRef { stream, bytes: bytes.len() as u64 };
            let forward = PeerMessage::Forward(Forward { shard: next.shard.clone(), session, step, start, capacity, payload, then: then[1..].to_vec(), shadow: false });
            match pass_over(&channel, stream, &bytes, &forward).await {
                Ok(()) => {
                    send(&self.worker.sender, &ContributorMessage::Passed { session, step, to: next.contributor, ms }).await?;
                    let standbys = next.standbys.clone();
                    return Ok((!standbys.is_empty()).then_some(ShadowCopy { session, step, start, capacity, bytes, standbys }));
                }
                Err(e) => {
                    if lock(&self.links).closed(next.contributor, Side::Downstream, epoch) {
                        eprintln!("tessera contribute: direct channel to contributor {} closed: {e:#}", next.contributor);
                    }
                    eprintln!("tessera contribute: session {session} step {step} goes back through the coordinator");
                }
            }
        }
        let stream = self.worker.streams.fetch_add(1, Ordering::Relaxed);
        send_payload(&self.worker.sender, stream, PayloadKind::Tensor, &bytes).await?;
        send(&self.worker.sender, &ContributorMessage::Forwarded { session, step, payload: PayloadRef { stream, bytes: bytes.len() as u64 }, ms }).await?;
        Ok(None)
    }
}

/// Sends the steps passed on directly, in order, to the next spans' standbys that have an open
/// channel here, as shadow `Forward`s. A channel that fails to take its copy is closed; nothing
/// else changes (a standby without a channel gets no copy at all).
async fn send_shadows(mut copies: mpsc::Receiver<ShadowCopy>, links: Arc<std::sync::Mutex<LinkTable>>, streams: Arc<AtomicU64>) {
    while let Some(ShadowCopy { session, step, start, capacity, bytes, standbys }) = copies.recv().await {
        let channels = lock(&links).shadows(&standbys);
        for (standby, channel, epoch) in channels {
            let stream = streams.fetch_add(1, Ordering::Relaxed);
            let payload = PayloadRef { stream, bytes: bytes.len() as u64 };
            let forward = PeerMessage::Forward(Forward { shard: standby.shard.clone(), session, step, start, capacity, payload, then: Vec::new(), shadow: true });
            if let Err(e) = pass_over(&channel, stream, &bytes, &forward).await
                && lock(&links).closed(standby.contributor, Side::Downstream, epoch)
            {
                eprintln!("tessera contribute: direct channel to contributor {} (standby) closed: {e:#}", standby.contributor);
            }
        }
    }
}

/// A step's output as the next span's standbys get it, after the step passed on directly.
struct ShadowCopy {
    session: u64,
    step: u64,
    start: u32,
    capacity: u32,
    /// The encoded output states.
    bytes: Vec<u8>,
    standbys: Vec<Standby>,
}

/// Sends a step's states (the encoded tensor, as frames of `stream`) and then its `Forward`
/// over a direct channel, within `PASS_TIMEOUT`.
async fn pass_over(channel: &PeerSender, stream: u64, bytes: &[u8], forward: &PeerMessage) -> anyhow::Result<()> {
    tokio::time::timeout(PASS_TIMEOUT, async {
        send_payload(channel, stream, PayloadKind::Tensor, bytes).await?;
        channel.send(Message::Text(tessera_protocol::encode_control(forward))).await.context("sending the forward")
    })
    .await
    .unwrap_or_else(|_| Err(anyhow!("it took more than {} s", PASS_TIMEOUT.as_secs())))
}

/// Where a step's output goes, and what the next stage needs to run it.
struct Onward {
    session: u64,
    step: u64,
    start: u32,
    capacity: u32,
    rows: u64,
    then: Vec<NextHop>,
    /// A shadow step: nothing is answered or passed on.
    shadow: bool,
    from: Option<ContributorId>,
    arrived: Instant,
}

/// The span job a `Forward` asks for, its hidden states taken from the tensors waiting; why
/// not, when they are missing or bad.
fn forward_job(tensors: &mut VecDeque<Payload>, forward: Forward, from: Option<ContributorId>) -> Result<SpanJob, String> {
    let Forward { shard, session, step, start, capacity, payload, then, shadow } = forward;
    match tensors.iter().position(|p| p.stream == payload.stream).and_then(|at| tensors.remove(at)) {
        Some(p) if p.bytes.len() as u64 == payload.bytes => tessera_protocol::Tensor::decode(&p.bytes, MAX_HIDDEN_BYTES)
            .map(|hidden| SpanJob::Forward { shard, step: ForwardStep { session, step, start, capacity, hidden, then, shadow, from, arrived: Instant::now() } })
            .map_err(|e| e.to_string()),
        Some(p) => Err(format!("stream {} carried {} bytes, the forward says {}", payload.stream, p.bytes.len(), payload.bytes)),
        None => Err(format!("no tensor arrived on stream {}", payload.stream)),
    }
}

/// What an upstream contributor sends over a direct channel, taken apart: tensor frames,
/// bounded as the coordinator's are (`MAX_HIDDEN_BYTES` a tensor, `MAX_WAITING_TENSORS`
/// waiting), and `PeerMessage`s, each `Forward` becoming the span job a coordinator's would.
/// An error closes the channel.
struct PeerInbox {
    peer: ContributorId,
    reassembler: Reassembler,
    tensors: VecDeque<Payload>,
}

impl PeerInbox {
    fn new(peer: ContributorId) -> Self {
        let limits = ReassemblyLimits { max_message_bytes: MAX_HIDDEN_BYTES as u64, max_partial_messages: MAX_WAITING_TENSORS, max_buffered_bytes: 2 * MAX_HIDDEN_BYTES as u64 };
        PeerInbox { peer, reassembler: Reassembler::new(limits), tensors: VecDeque::new() }
    }

    /// Takes one message: a span job once a `Forward` arrives, or why the channel must close.
    fn push(&mut self, message: &Message) -> Result<Option<SpanJob>, String> {
        let decoded = match message {
            Message::Text(text) => tessera_protocol::decode::<PeerMessage>(Incoming::Text(text)),
            Message::Binary(bytes) => tessera_protocol::decode::<PeerMessage>(Incoming::Binary(bytes)),
        };
        match decoded.map_err(|e| e.to_string())? {
            Decoded::Chunk(chunk) => match self.reassembler.push(chunk).map_err(|e| e.to_string())? {
                None => Ok(None),
                Some(payload) if payload.kind != PayloadKind::Tensor => Err(format!("a {:?} payload on stream {}", payload.kind, payload.stream)),
                Some(_) if self.tensors.len() >= MAX_WAITING_TENSORS => Err(format!("{MAX_WAITING_TENSORS} tensors without their forward messages")),
                Some(payload) => {
                    self.tensors.push_back(payload);
                    Ok(None)
                }
            },
            Decoded::Control(PeerMessage::Forward(forward)) => {
                let (session, step) = (forward.session, forward.step);
                forward_job(&mut self.tensors, forward, Some(self.peer)).map(Some).map_err(|e| format!("session {session} step {step}: {e}"))
            }
            Decoded::Control(PeerMessage::BlobRequest { .. } | PeerMessage::Error { .. }) => Err("a blob message on a channel for forwards".into()),
        }
    }
}

/// A link's task, stopped when dropped (an `Unlink`, a failed pass, the connection's end),
/// which drops its `Peer` and so closes the channel.
struct LinkTask(tokio::task::AbortHandle);

impl Drop for LinkTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type LinkTable = Links<PeerSender, LinkTask>;

/// What the reader and the links' tasks share for direct channels, for one connection.
#[derive(Clone)]
struct LinkContext {
    /// Our id, from the `Welcome`.
    own: ContributorId,
    /// The address the coordinator's channel uses; offers bind a socket of their own on it.
    ip: IpAddr,
    /// Answers upstream contributors' offers.
    endpoint: Endpoint,
    coordinator: PeerSender,
    links: Arc<std::sync::Mutex<LinkTable>>,
    /// The contributors that may fetch shards from here, and their channels' tasks.
    lends: Arc<std::sync::Mutex<Lends<LinkTask>>>,
    /// The verified cache lent shards are read from.
    blobs: Arc<BlobStore>,
    /// Offers of ours waiting for the answer the coordinator relays, by the peer offered to.
    answers: Arc<std::sync::Mutex<HashMap<ContributorId, oneshot::Sender<String>>>>,
    /// The span worker's queue, for the `Forward`s upstream contributors send.
    span_jobs: mpsc::Sender<SpanJob>,
    /// `--perturb`: lend corrupted shards, as a dishonest contributor would.
    perturb: bool,
}

impl LinkContext {
    /// A `Link`: as the offering (downstream) side, start connecting; as the answering side,
    /// wait for the peer's offer.
    fn link(&self, peer: ContributorId, offer: bool) {
        let side = if offer { Side::Downstream } else { Side::Upstream };
        let mut links = lock(&self.links);
        match links.link(peer, side) {
            Err(e) => eprintln!("tessera contribute: refusing a direct channel with contributor {peer}: {e}"),
            Ok(epoch) if offer => {
                let task = tokio::spawn(self.clone().downstream(peer, epoch));
                links.start(peer, side, epoch, LinkTask(task.abort_handle()));
            }
            Ok(_) => {}
        }
    }

    /// An `Unlink`: both directions with `peer` close and are forgotten.
    fn unlink(&self, peer: ContributorId) {
        if lock(&self.links).unlink(peer) {
            eprintln!("tessera contribute: direct channel with contributor {peer} closed (unlinked)");
        }
    }

    /// An offer relayed from `peer`: answered only when `peer` is linked upstream of us.
    fn offered(&self, peer: ContributorId, sdp: String) {
        let mut links = lock(&self.links);
        let Some(epoch) = links.offer(peer) else {
            eprintln!("tessera contribute: ignoring an offer from contributor {peer}: it is not linked to send to us");
            return;
        };
        let task = tokio::spawn(self.clone().upstream(peer, epoch, sdp));
        links.start(peer, Side::Upstream, epoch, LinkTask(task.abort_handle()));
    }

    /// An answer relayed from `peer`, for the offer we made it.
    fn answered(&self, peer: ContributorId, sdp: String) {
        match lock(&self.answers).remove(&peer) {
            Some(reply) => drop(reply.send(sdp)),
            None => eprintln!("tessera contribute: ignoring an answer from contributor {peer}: we made it no offer"),
        }
    }

    /// Serves the channel upstream `peer` offers: answers it, then turns what arrives into span
    /// jobs until it closes.
    async fn upstream(self, peer: ContributorId, epoch: u64, offer: String) {
        let mut open = false;
        let Err(e) = self.serve_upstream(peer, offer, &mut open).await;
        self.down(peer, Side::Upstream, epoch, open, e);
    }

    async fn serve_upstream(&self, peer: ContributorId, offer: String, open: &mut bool) -> anyhow::Result<Infallible> {
        let (answer, mut channel) = self.endpoint.accept_offer(&offer).await.context("answering its offer")?;
        send(&self.coordinator, &ContributorMessage::Signal { from: self.own, to: peer, payload: SignalPayload::Answer { sdp: answer } }).await?;
        channel.opened().await?;
        *open = true;
        eprintln!("tessera contribute: direct channel from contributor {peer} open");
        let mut inbox = PeerInbox::new(peer);
        loop {
            let message = match channel.recv().await {
                Some(PeerEvent::Message(message)) => message,
                Some(PeerEvent::Closed(reason)) => bail!("{reason}"),
                Some(PeerEvent::Connected | PeerEvent::Open) => continue,
                None => bail!("the transport stopped"),
            };
            let Some(job) = inbox.push(&message).map_err(|e| anyhow!("it sent {e}"))? else { continue };
            let (what, shadow) = match &job {
                SpanJob::Forward { step, .. } => (format!("session {} step {}", step.session, step.step), step.shadow),
                _ => (String::new(), false),
            };
            match self.span_jobs.try_send(job) {
                Ok(()) => {}
                // A shadow that does not fit is dropped: this standby only falls behind.
                Err(_) if shadow => eprintln!("tessera contribute: shadow of {what} from contributor {peer} dropped: too many span jobs queued"),
                // A peer that floods the queue loses its channel; the span here is not at fault.
                Err(_) => bail!("{what}: more span jobs than this contributor queues"),
            }
        }
    }

    /// Opens the channel to downstream `peer` (our offer, its answer relayed by the
    /// coordinator) and holds it until it closes; meanwhile the span worker passes outputs on
    /// over it.
    async fn downstream(self, peer: ContributorId, epoch: u64) {
        let mut retries = OFFER_RETRIES.iter();
        loop {
            let mut open = false;
            let Err(e) = self.serve_downstream(peer, epoch, &mut open).await;
            match retries.next() {
                Some(pause) if !open => {
                    eprintln!("tessera contribute: direct channel to contributor {peer} failed to open: {e:#}; offering again in {} s", pause.as_secs());
                    tokio::time::sleep(*pause).await;
                }
                _ => return self.down(peer, Side::Downstream, epoch, open, e),
            }
        }
    }

    async fn serve_downstream(&self, peer: ContributorId, epoch: u64, open: &mut bool) -> anyhow::Result<Infallible> {
        let mut channel = self.offer(peer, ChannelPurpose::Forwards, ANSWER_TIMEOUT).await?;
        if !lock(&self.links).opened(peer, epoch, channel.sender()) {
            bail!("unlinked");
        }
        *open = true;
        eprintln!("tessera contribute: direct channel to contributor {peer} open");
        loop {
            match channel.recv().await {
                Some(PeerEvent::Message(_)) => bail!("it sent a message, and a downstream contributor sends none"),
                Some(PeerEvent::Closed(reason)) => bail!("{reason}"),
                Some(PeerEvent::Connected | PeerEvent::Open) => {}
                None => bail!("the transport stopped"),
            }
        }
    }

    /// Offers `peer` a direct channel for `purpose` (the SDP offer and answer relayed by the
    /// coordinator) and waits until it is open, at most `timeout` for each. One offer to a peer
    /// at a time: the answer names no offer, so a second is refused rather than mistaken for
    /// the first.
    async fn offer(&self, peer: ContributorId, purpose: ChannelPurpose, timeout: Duration) -> anyhow::Result<tessera_rtc::Peer> {
        let (reply, answer) = oneshot::channel();
        {
            let mut answers = lock(&self.answers);
            if answers.get(&peer).is_some_and(|waiting| !waiting.is_closed()) {
                bail!("another offer to contributor {peer} waits for its answer");
            }
            answers.insert(peer, reply);
        }
        let (coordinator, own) = (self.coordinator.clone(), self.own);
        let signal = |sdp| async move {
            send(&coordinator, &ContributorMessage::Signal { from: own, to: peer, payload: SignalPayload::Offer { sdp, purpose } }).await?;
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(sdp)) => Ok(sdp),
                Ok(Err(_)) => Err(anyhow!("the offer was forgotten")),
                Err(_) => Err(anyhow!("no answer in {} s", timeout.as_secs())),
            }
        };
        let config = tessera_rtc::Config { connect_timeout: timeout, ..Default::default() };
        let channel = tessera_rtc::connect(SocketAddr::new(self.ip, 0), config, signal).await;
        // Our offer's reply slot, answered or not.
        lock(&self.answers).retain(|_, reply| !reply.is_closed());
        let mut channel = channel?;
        channel.opened().await?;
        Ok(channel)
    }

    /// A link's channel failed to open, or closed after `open`: logged, and the link marked
    /// down (which stops this task at its next wait: call it last).
    fn down(&self, peer: ContributorId, side: Side, epoch: u64, open: bool, why: anyhow::Error) {
        let direction = match side {
            Side::Upstream => "from",
            Side::Downstream => "to",
        };
        let what = if open { "closed" } else { "failed to open" };
        eprintln!("tessera contribute: direct channel {direction} contributor {peer} {what}: {why:#}");
        lock(&self.links).closed(peer, side, epoch);
    }
}

/// The link table (or another plain structure shared between tasks): a panic elsewhere while
/// it was held leaves plain data, still usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `first` and the `Forward`s queued right behind it that can run with it as one exact batch:
/// for the same shard, each for another session, at most `EXACT_BATCH_ROWS` rows in all. Takes
/// only what is queued already; the first job that does not fit (any other kind is a barrier)
/// comes back to run next.
fn batch_forwards(shard: &str, first: ForwardStep, queue: &mut mpsc::Receiver<SpanJob>) -> (Vec<ForwardStep>, Option<SpanJob>) {
    let mut rows = first.rows();
    let mut steps = vec![first];
    while rows < EXACT_BATCH_ROWS {
        let Ok(job) = queue.try_recv() else { break };
        match job {
            SpanJob::Forward { shard: other, step }
                if other == shard && rows.saturating_add(step.rows()) <= EXACT_BATCH_ROWS && steps.iter().all(|s| s.session != step.session) =>
            {
                rows += step.rows();
                steps.push(step);
            }
            job => return (steps, Some(job)),
        }
    }
    (steps, None)
}

/// Runs `steps` (session, capacity, start, hidden states) through `stage` as one batch, and
/// each step's outcome in order. A batch fails whole when one step is bad, changing nothing, so
/// then each step runs alone for an answer of its own.
fn run_steps(stage: &std::sync::Mutex<SpanStage>, gpu: &Gpu, steps: &[(u64, usize, usize, Vec<f32>)]) -> Vec<anyhow::Result<Vec<f32>>> {
    let Ok(mut stage) = stage.lock() else {
        return steps.iter().map(|_| Err(anyhow!("the span's lock is poisoned"))).collect();
    };
    let batch: Vec<Step> = steps.iter().map(|(session, capacity, start, hidden)| Step { session: *session, capacity: *capacity, start: *start, hidden }).collect();
    match pollster::block_on(stage.forward_batch(gpu, &batch)) {
        Ok(outputs) => outputs.into_iter().map(Ok).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e.into())],
        Err(_) => batch.iter().map(|s| Ok(pollster::block_on(stage.forward(gpu, s.session, s.capacity, s.start, s.hidden))?)).collect(),
    }
}

async fn send(sender: &PeerSender, message: &ContributorMessage) -> anyhow::Result<()> {
    let text = serde_json::to_string(message)?;
    sender.send(Message::Text(text)).await.context("sending to the coordinator")
}

/// Sends a payload as binary frames of `stream`, each within a DataChannel message's bound, to
/// the coordinator or over a direct channel.
async fn send_payload(sender: &PeerSender, stream: u64, kind: PayloadKind, bytes: &[u8]) -> anyhow::Result<()> {
    for frame in Chunker::new(stream, kind, bytes)? {
        sender.send(Message::Binary(frame)).await?;
    }
    Ok(())
}

/// What this contributor tells the coordinator about itself, with a measured score.
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

    /// Queued forwards join the one before them while they fit (one shard, distinct sessions,
    /// eight rows); the first that does not, or any other job, ends the batch and runs next.
    #[test]
    fn queued_forwards_batch_up_to_a_barrier() {
        fn forward(shard: &str, session: u64, rows: u64) -> SpanJob {
            let hidden = tessera_protocol::Tensor::from_f32(vec![rows, 2], &vec![0.0; rows as usize * 2]).unwrap();
            SpanJob::Forward { shard: shard.into(), step: ForwardStep { session, step: 0, start: 0, capacity: 16, hidden, then: Vec::new(), shadow: false, from: None, arrived: Instant::now() } }
        }
        fn describe(job: &SpanJob) -> String {
            match job {
                SpanJob::Forward { shard, step } => format!("{shard}:{}", step.session),
                SpanJob::End { session } => format!("end {session}"),
                SpanJob::Load { shard, .. } => format!("load {shard}"),
                SpanJob::Unload { shard } => format!("unload {shard}"),
            }
        }
        // The queue after a first forward of session 1 (one row) on shard "a", and the batches
        // and leftover job: (sessions batched, the job that runs next).
        let cases: Vec<(Vec<SpanJob>, &[u64], Option<&str>)> = vec![
            (vec![], &[1], None),
            (vec![forward("a", 2, 1), forward("a", 3, 2)], &[1, 2, 3], None),
            (vec![forward("a", 2, 1), SpanJob::End { session: 2 }, forward("a", 3, 1)], &[1, 2], Some("end 2")),
            (vec![forward("a", 2, 1), SpanJob::Unload { shard: "a".into() }], &[1, 2], Some("unload a")),
            (vec![forward("a", 2, 1), forward("a", 1, 1), forward("a", 3, 1)], &[1, 2], Some("a:1")),
            (vec![forward("b", 2, 1), forward("a", 3, 1)], &[1], Some("b:2")),
            (vec![forward("a", 2, 4), forward("a", 3, 3), forward("a", 4, 1)], &[1, 2, 3], None),
            (vec![forward("a", 2, 4), forward("a", 3, 4)], &[1, 2], Some("a:3")),
            (vec![forward("a", 2, 8)], &[1], Some("a:2")),
        ];
        for (queued, expected, leftover) in cases {
            let (sender, mut queue) = mpsc::channel(16);
            for job in queued {
                sender.try_send(job).ok().unwrap();
            }
            let SpanJob::Forward { shard, step } = forward("a", 1, 1) else { unreachable!() };
            let (steps, next) = batch_forwards(&shard, step, &mut queue);
            assert_eq!(steps.iter().map(|s| s.session).collect::<Vec<_>>(), expected);
            assert_eq!(next.as_ref().map(describe).as_deref(), leftover);
        }
        // A first step of more than eight rows runs alone without taking anything.
        let (sender, mut queue) = mpsc::channel(4);
        sender.try_send(forward("a", 2, 1)).ok().unwrap();
        let SpanJob::Forward { shard, step } = forward("a", 1, 9) else { unreachable!() };
        let (steps, next) = batch_forwards(&shard, step, &mut queue);
        assert_eq!((steps.len(), next.is_none(), queue.len()), (1, true, 1));
    }

    /// What an upstream contributor sends over a direct channel: a `Forward` after its tensor
    /// becomes a span job (carrying the rest of the route, or marked a shadow); anything else that is wrong is an
    /// error, which closes that channel.
    #[test]
    fn an_upstream_channel_yields_span_jobs_or_closes() {
        fn tensor(stream: u64) -> Vec<Message> {
            let bytes = tessera_protocol::Tensor::from_f32(vec![2, 3], &[0.5; 6]).unwrap().encode();
            Chunker::new(stream, PayloadKind::Tensor, &bytes).unwrap().map(Message::Binary).collect()
        }
        // The route after this stage; session 8's steps are shadows, which have none.
        fn then(session: u64) -> Vec<NextHop> {
            let standbys = vec![Standby { contributor: ContributorId(10), shard: "spare".into() }];
            if session == 8 { Vec::new() } else { vec![NextHop { contributor: ContributorId(9), shard: "next".into(), standbys }] }
        }
        fn forward(session: u64, stream: u64, bytes: u64) -> Vec<Message> {
            let forward = Forward { shard: "here".into(), session, step: 4, start: 7, capacity: 64, payload: PayloadRef { stream, bytes }, then: then(session), shadow: session == 8 };
            vec![Message::Text(tessera_protocol::encode_control(&PeerMessage::Forward(forward)))]
        }
        let size = tessera_protocol::Tensor::from_f32(vec![2, 3], &[0.5; 6]).unwrap().encode().len() as u64;
        let frames = |kind, bytes: &[u8]| -> Vec<Message> { Chunker::new(1, kind, bytes).unwrap().take(1).map(Message::Binary).collect() };
        let (too_large, limit) = (vec![0; MAX_HIDDEN_BYTES + 1], format!("limit of {MAX_HIDDEN_BYTES} bytes"));
        // The messages, in order, and the sessions of the jobs they make, or the first error.
        type Case<'a> = (Vec<Message>, Result<&'a [u64], &'a str>);
        let cases: Vec<Case> = vec![
            ([tensor(1), forward(5, 1, size)].concat(), Ok(&[5])),
            ([tensor(1), tensor(2), forward(6, 2, size), forward(5, 1, size)].concat(), Ok(&[6, 5])),
            ([tensor(1), tensor(2), forward(8, 1, size), forward(5, 2, size)].concat(), Ok(&[8, 5])),
            (forward(5, 1, size), Err("session 5 step 4: no tensor arrived on stream 1")),
            ([tensor(2), forward(5, 1, size)].concat(), Err("no tensor arrived on stream 1")),
            ([tensor(1), forward(5, 1, size + 1)].concat(), Err("carried")),
            (frames(PayloadKind::Tensor, b"not a tensor at all"), Ok(&[])),
            ([frames(PayloadKind::Tensor, b"not a tensor at all"), forward(5, 1, 19)].concat(), Err("session 5")),
            (frames(PayloadKind::Blob, b"bytes"), Err("Blob payload")),
            (frames(PayloadKind::Tensor, &too_large), Err(&limit)),
            ((0..=MAX_WAITING_TENSORS as u64).flat_map(tensor).collect(), Err("tensors without their forward")),
            (vec![Message::Text("hello".into())], Err("JSON")),
            (vec![Message::Text(r#"{"type":"heartbeat"}"#.into())], Err("heartbeat")),
            (vec![Message::Binary(b"TSRA, but not a frame".to_vec())], Err("")),
        ];
        for (messages, expected) in cases {
            let mut inbox = PeerInbox::new(ContributorId(2));
            let mut sessions = Vec::new();
            let outcome = messages.iter().try_for_each(|message| {
                if let Some(SpanJob::Forward { shard, step }) = inbox.push(message)? {
                    assert_eq!((shard.as_str(), step.step, step.start, step.capacity, step.rows()), ("here", 4, 7, 64, 2));
                    assert_eq!((step.then.as_slice(), step.shadow), (then(step.session).as_slice(), step.session == 8));
                    sessions.push(step.session);
                }
                Ok::<_, String>(())
            });
            match (outcome, expected) {
                (Ok(()), Ok(expected)) => assert_eq!(sessions, expected),
                (Err(e), Err(expected)) => assert!(e.contains(expected), "{e:?} should say {expected:?}"),
                (outcome, expected) => panic!("{outcome:?}, expected {expected:?}"),
            }
        }
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
