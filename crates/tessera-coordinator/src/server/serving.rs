//! Generation across contributors: the task that owns the span plan (`placement`) and the
//! generation sessions (`Pipeline`), and turns their outputs into messages and GPU work.
//!
//! A request's prompt is embedded here (the coordinator's `EndsStage`), its hidden states go to
//! the first span's holder in a `Forward`, and from stage to stage over direct DataChannels
//! between the holders: each pair of consecutive holders is told to `Link` (the upstream one
//! offers, through the `Signal` relay), and each `Forward` names the later stages (`then`) whose
//! holders are linked and ready. A stage that passed its output on says `Passed`, which times its
//! hop and starts the next one's clock; a stage with no open channel answers `Forwarded` with the
//! states, and the coordinator relays them. The last stage's states go through the head here,
//! and the `Sampler` picks the next token.
//!
//! The plan is made on the first request (so an embedding-only swarm never loads a span) and
//! kept: each holder, then each standby, gets a `LoadSpan` naming its span's shard
//! (`placement::loads`), published into the blob store on first use, and a hop to a holder whose
//! span is not loaded yet waits for its `SpanReady`; a standby whose span is ready takes over at
//! once, and it is hot: it gets a shadow copy of every step its span runs (from the holder
//! before, linked to it too, or from here for the first span and relayed hops), so its caches
//! are current and the replay when it takes over costs it no GPU time (a `SpanStage` answers
//! positions fed again with the same states from what it gave). A contributor whose role moves
//! off a span it holds gets `UnloadSpan`.
//! When a holder leaves or reports `SpanFailed`, `placement::repair` moves its span (to its
//! standby, another contributor, or a fresh plan); when it misses its deadline (the pipeline's
//! per-holder allowance, from its measured pace), `placement::relieve` moves its span the same
//! way but keeps it connected, counts a drop against it and lets it stand by (its late answers
//! are stale and ignored), or, when nobody else can take the span, waits longer. Either way
//! `Pipeline::set_plan` abandons the steps in flight and replays every session into the new
//! holders, and the streams carry on: with greedy sampling, exactly as if nothing had happened.
//! A contributor that joins stands by (`placement::admit`) and disturbs no session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_engine::generate::Sampler;
use tessera_protocol::{Blocks, Capabilities, ContributorId, CoordinatorMessage, Forward, NextHop, PayloadRef, Standby, Tensor};
use tokio::sync::{mpsc, oneshot};

use crate::completions::{FinishReason, Sampling};
use crate::openai::ApiError;
use crate::pipeline::{Output, Pipeline, PipelineConfig, Received, SessionId};
use crate::placement::{self, Candidate, ModelShape, Plan, Policy};
use crate::server::llm::ServedLlama;
use crate::server::log;
use crate::server::peer::Outbound;
use crate::server::swarm::{self, Swarm};
use crate::time::Millis;

/// Commands waiting for the task, at most.
pub const QUEUE: usize = 4096;
/// How often deadlines are checked.
const CADENCE: Duration = Duration::from_millis(100);
/// The coordinator numbers the tensor streams it starts from here, apart from the streams a
/// contributor picks for its blob requests (which the coordinator answers on).
const OWN_STREAMS: u64 = 1 << 63;
/// How long a missed deadline counts against a contributor (`Candidate::recent_drops`).
const DROPS_REMEMBERED_MS: u64 = 10 * 60 * 1000;
/// Finished requests remembered for `/api/requests/{id}`.
const REQUESTS_KEPT: usize = 1024;
/// The most contributors named to lend a shard to one that loads it.
const MAX_LENDERS: usize = 2;

/// How generation is served.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// Sessions at once; each span holder keeps a KV cache for each.
    pub max_sessions: usize,
    /// KV cache positions per session that placement reserves on every span holder.
    pub planned_positions: usize,
    /// The most one holder may take for one hop (once the hops queued ahead of it are done)
    /// before its span moves; also the allowance before its pace is measured.
    pub stage_deadline: Duration,
    /// The least allowance for a hop, however fast its holder has been.
    pub stage_floor: Duration,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig { max_sessions: 8, planned_positions: 2048, stage_deadline: Duration::from_secs(20), stage_floor: Duration::from_secs(1) }
    }
}

/// What a request's handler hears.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    /// Generation ended; `spans` names every contributor that served a span of it.
    Done { finish: FinishReason, spans: String },
    Failed(ApiError),
}

/// A generation request, tokenized and checked.
#[derive(Debug)]
pub struct Generate {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (they fit the context).
    pub budget: usize,
    pub sampling: Sampling,
    pub events: mpsc::UnboundedSender<Event>,
}

/// A request that started: its id (`/api/requests/{id}`) and the spans it starts on.
#[derive(Debug, Clone)]
pub struct Started {
    pub request: u64,
    pub spans: String,
}

pub enum Command {
    Joined { id: ContributorId, capabilities: Capabilities, outbox: mpsc::Sender<Outbound> },
    Left(ContributorId),
    SpanReady { from: ContributorId, shard: String, fetched_from: Option<ContributorId> },
    /// A contributor holds these blobs, verified (shards it was told to prefetch).
    BlobHave { from: ContributorId, cids: Vec<String> },
    /// A contributor could not fetch blob `cid` from `lender`; `corrupt`: the bytes did not
    /// match the CID.
    BorrowFailed { from: ContributorId, lender: ContributorId, cid: String, corrupt: bool, message: String },
    /// `ms`: how long the step took at `from`, as it says (for the hop figures only).
    Forwarded { from: ContributorId, session: u64, step: u64, hidden: Tensor, ms: f64 },
    /// `from` sent its output of `step` straight to `to`.
    Passed { from: ContributorId, session: u64, step: u64, to: ContributorId, ms: f64 },
    SpanFailed { from: ContributorId, message: String },
    Generate { request: Generate, reply: oneshot::Sender<Result<Started, ApiError>> },
    /// The client went away, or a stop sequence ended the text.
    Stop { request: u64 },
    Request(u64, oneshot::Sender<Option<Value>>),
    /// `/api/swarm`: members, plan, live rate, recent requests.
    Swarm(oneshot::Sender<Value>),
    /// From the task's own GPU and blob work.
    Embedded { session: u64, step: u64, result: Result<Vec<f32>, String> },
    Logits { session: u64, result: Result<Vec<f32>, String> },
    Published { blocks: Range<u32>, result: Result<String, String> },
}

/// What the HTTP handlers share with the task.
#[derive(Clone)]
pub struct Serving {
    pub commands: mpsc::Sender<Command>,
    /// The model's API name, when one is configured.
    pub name: Option<String>,
    /// Set once the model is loaded (or could not be).
    pub model: Arc<OnceLock<Result<Arc<ServedLlama>, String>>>,
}

struct Member {
    capabilities: Capabilities,
    outbox: mpsc::Sender<Outbound>,
    /// It failed a span: it holds none for this connection.
    failed: bool,
    /// When it missed a hop's deadline while holding a span.
    drops: Vec<Millis>,
    /// The shards it was told to prefetch.
    prefetched: BTreeSet<String>,
    /// Those of them it says it has fetched (`BlobHave`), verified: it can lend them.
    fetched: BTreeSet<String>,
    /// A borrower reported bytes from it that do not match their CID: it is named as a lender
    /// no more. (The report cannot be checked here; at worst an honest lender stops lending,
    /// and the coordinator's copy serves instead.)
    barred: bool,
}

impl Member {
    /// Spans it dropped within `DROPS_REMEMBERED_MS` of `now`.
    fn recent_drops(&self, now: Millis) -> usize {
        self.drops.iter().filter(|&&at| now.since(at) < DROPS_REMEMBERED_MS).count()
    }
}

/// A hop waiting for its holder's span to load.
struct Waiting {
    session: u64,
    step: u64,
    hidden: Vec<f32>,
}

/// What a plan's holder or standby holds (or is loading).
struct Holding {
    blocks: Range<u32>,
    shard: Option<String>,
    ready: bool,
    waiting: Vec<Waiting>,
}

/// A step on its way along its route.
struct Hop {
    positions: Range<usize>,
    route: Vec<ContributorId>,
    /// The route's next stage.
    next: usize,
    sample: bool,
    /// An answer from a later stage that came before the `Passed` that handed the step to it
    /// (the two travel different channels); taken up once that `Passed` arrives.
    early: Option<Answer>,
    /// When the stage before the next one was done (its `Passed` or `Forwarded` arrived), and
    /// whether it passed the states on directly: the next answer, less the time its stage says
    /// it took, is the hop's overhead.
    handed: Option<(Instant, bool)>,
}

/// What a stage says when it is done with a step (`ms`: how long it says the step took there).
enum Answer {
    /// Its output, for the coordinator to relay or to sample from.
    Forwarded { from: ContributorId, hidden: Tensor, ms: f64 },
    /// Its output went straight to `to`.
    Passed { from: ContributorId, to: ContributorId, ms: f64 },
}

impl Answer {
    fn from(&self) -> ContributorId {
        match self {
            Answer::Forwarded { from, .. } | Answer::Passed { from, .. } => *from,
        }
    }

    fn ms(&self) -> f64 {
        match self {
            Answer::Forwarded { ms, .. } | Answer::Passed { ms, .. } => *ms,
        }
    }
}

struct Live {
    events: mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    budget: usize,
    generated: usize,
    capacity: usize,
}

struct Record {
    prompt_tokens: usize,
    completion_tokens: usize,
    state: &'static str,
    finish: Option<FinishReason>,
    failure: Option<String>,
    /// (blocks, contributor) pairs that served a sampled step.
    served: BTreeSet<(u32, u32, u64)>,
    replans: u32,
    started: Instant,
    first_token_ms: Option<u64>,
    elapsed_ms: Option<u64>,
}

struct Task {
    config: ServingConfig,
    serving: Serving,
    blobs: Arc<crate::blobs::BlobStore>,
    own: mpsc::Sender<Command>,
    start: Instant,
    members: BTreeMap<ContributorId, Member>,
    plan: Option<Plan>,
    pipeline: Option<Pipeline>,
    holdings: HashMap<ContributorId, Holding>,
    publishing: BTreeSet<(u32, u32)>,
    hops: HashMap<(u64, u64), Hop>,
    /// The direct channels asked for: (upstream, downstream) holders of consecutive spans.
    links: BTreeSet<(ContributorId, ContributorId)>,
    live: HashMap<u64, Live>,
    records: BTreeMap<u64, Record>,
    next_request: u64,
    next_stream: u64,
    swarm: Swarm,
}

/// Starts the task; `model` is set by whoever loads the model.
pub fn start(config: ServingConfig, name: Option<String>, blobs: Arc<crate::blobs::BlobStore>) -> Serving {
    let (commands, inbox) = mpsc::channel(QUEUE);
    let serving = Serving { commands: commands.clone(), name, model: Arc::new(OnceLock::new()) };
    let task = Task {
        config,
        serving: serving.clone(),
        blobs,
        own: commands,
        start: Instant::now(),
        members: BTreeMap::new(),
        plan: None,
        pipeline: None,
        holdings: HashMap::new(),
        publishing: BTreeSet::new(),
        hops: HashMap::new(),
        links: BTreeSet::new(),
        live: HashMap::new(),
        records: BTreeMap::new(),
        next_request: 1,
        next_stream: OWN_STREAMS,
        swarm: Swarm::new(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
    };
    tokio::spawn(task.run(inbox));
    serving
}

/// `0-10=3,10-20=5`: blocks and holder, per span.
fn describe(spans: impl IntoIterator<Item = (u32, u32, u64)>) -> String {
    spans.into_iter().map(|(a, b, c)| format!("{a}-{b}={c}")).collect::<Vec<_>>().join(",")
}

impl Task {
    fn now(&self) -> Millis {
        Millis(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn model(&self) -> Option<Arc<ServedLlama>> {
        self.serving.model.get().and_then(|m| m.as_ref().ok()).cloned()
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut ticks = tokio::time::interval(CADENCE);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = inbox.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                _ = ticks.tick() => {
                    // Answers that arrived already count before any deadline is judged (after
                    // a busy spell both are ready at once).
                    for _ in 0..QUEUE {
                        let Ok(command) = inbox.try_recv() else { break };
                        self.handle(command);
                        self.pump();
                    }
                    let now = self.now();
                    if let Some(pipeline) = &mut self.pipeline {
                        pipeline.tick(now);
                    }
                }
            }
            self.pump();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Joined { id, capabilities, outbox } => {
                self.members.insert(id, Member { capabilities, outbox, failed: false, drops: Vec::new(), prefetched: BTreeSet::new(), fetched: BTreeSet::new(), barred: false });
                self.admit(id);
            }
            Command::Left(id) => {
                if let Some(pipeline) = &mut self.pipeline {
                    pipeline.forget(id);
                }
                if self.members.remove(&id).is_some() {
                    self.lost(id, "left");
                }
            }
            Command::SpanReady { from, shard, fetched_from } => {
                let Some(holding) = self.holdings.get_mut(&from) else { return };
                if holding.shard.as_deref() != Some(shard.as_str()) || holding.ready {
                    return;
                }
                holding.ready = true;
                let source = fetched_from.map_or("the coordinator or its cache".to_string(), |peer| format!("contributor {peer}"));
                log(format_args!("contributor {from} holds blocks {}..{} (shard from {source})", holding.blocks.start, holding.blocks.end));
                let waiting = std::mem::take(&mut holding.waiting);
                self.swarm.shard_loaded(fetched_from.is_some());
                for waiting in waiting {
                    self.send_hop(waiting.session, waiting.step, waiting.hidden);
                }
                // The last span loaded lets holders fetch ahead (`prefetch`).
                self.prefetch();
            }
            Command::BlobHave { from, cids } => {
                if let Some(member) = self.members.get_mut(&from) {
                    // Only what it was asked to fetch: a contributor cannot grow this set.
                    let named: Vec<String> = cids.into_iter().filter(|cid| member.prefetched.contains(cid)).collect();
                    member.fetched.extend(named);
                }
            }
            Command::BorrowFailed { from, lender, cid, corrupt, message } => {
                log(format_args!("contributor {from} could not fetch {cid} from contributor {lender}: {message}"));
                if corrupt && let Some(member) = self.members.get_mut(&lender) {
                    log(format_args!("contributor {lender} lent bytes that do not match their CID: it lends no more"));
                    member.barred = true;
                    self.swarm.corrupt_lend();
                }
            }
            Command::SpanFailed { from, message } => {
                log(format_args!("contributor {from}: span failed: {message}"));
                if let Some(member) = self.members.get_mut(&from) {
                    member.failed = true;
                }
                if self.holdings.contains_key(&from) || self.plan.as_ref().is_some_and(|p| p.members().contains(&from)) {
                    self.lost(from, "failed its span");
                }
            }
            Command::Forwarded { from, session, step, hidden, ms } => self.answered(session, step, Answer::Forwarded { from, hidden, ms }),
            Command::Passed { from, session, step, to, ms } => self.answered(session, step, Answer::Passed { from, to, ms }),
            Command::Generate { request, reply } => {
                let _ = reply.send(self.generate(request));
            }
            Command::Stop { request } => self.end(request, None),
            Command::Request(id, reply) => {
                let _ = reply.send(self.request(id));
            }
            Command::Swarm(reply) => {
                let view = swarm::View {
                    name: self.serving.name.as_deref(),
                    model: self.serving.model.get().map(|m| m.as_ref().map(|m| m.config.blocks as u32).map_err(String::as_str)),
                    members: self.members.iter().map(|(&id, m)| (id, &m.capabilities, m.failed)).collect(),
                    plan: self.plan.as_ref(),
                    ready: self.holdings.iter().filter(|(_, h)| h.ready).map(|(&id, _)| id).collect(),
                    links: &self.links,
                    fetching_ahead: self.members.values().map(|m| m.prefetched.difference(&m.fetched).count()).sum(),
                };
                let _ = reply.send(self.swarm.json(self.now(), &view));
            }
            Command::Embedded { session, step, result } => {
                if !self.hops.contains_key(&(session, step)) {
                    return;
                }
                match result {
                    Ok(hidden) => self.send_hop(session, step, hidden),
                    Err(e) => self.fail(session, ApiError::internal(format!("embedding the tokens failed: {e}"))),
                }
            }
            Command::Logits { session, result } => match result {
                Ok(logits) => self.sampled(session, &logits),
                Err(e) => self.fail(session, ApiError::internal(format!("the head failed: {e}"))),
            },
            Command::Published { blocks, result } => {
                self.publishing.remove(&(blocks.start, blocks.end));
                match result {
                    Ok(cid) => {
                        let mut holders: Vec<ContributorId> =
                            self.holdings.iter().filter(|(_, h)| h.blocks == blocks && h.shard.is_none()).map(|(&id, _)| id).collect();
                        // Holders load before standbys.
                        let holding = |id: &ContributorId| self.plan.as_ref().is_some_and(|p| p.stages.iter().any(|s| s.contributor == *id));
                        holders.sort_by_key(|id| (!holding(id), *id));
                        for id in holders {
                            self.load(id, &cid);
                        }
                        self.prefetch();
                    }
                    // Sessions fail only when a holder waits for the shard (not for one only to
                    // fetch ahead).
                    Err(e) if self.holdings.values().any(|h| h.blocks == blocks) => {
                        self.fail_all(ApiError::internal(format!("writing the shard of blocks {}..{} failed: {e}", blocks.start, blocks.end)))
                    }
                    Err(e) => log(format_args!("writing the shard of blocks {}..{} to fetch ahead failed: {e}", blocks.start, blocks.end)),
                }
            }
        }
    }

    fn candidates(&self, model: &ServedLlama) -> Vec<Candidate> {
        let now = self.now();
        self.members
            .iter()
            .filter(|(_, m)| !m.failed)
            .map(|(&id, m)| Candidate {
                contributor: id,
                blocks_per_second: m.capabilities.benchmark_score * 1e9 / model.block_flops.max(1.0),
                memory_bytes: m.capabilities.memory_budget_bytes,
                recent_drops: m.recent_drops(now) as u32,
            })
            .collect()
    }

    fn shape(&self, model: &ServedLlama) -> ModelShape {
        let c = &model.config;
        let kv = 2 * c.kv_heads * c.head_dim * 4 * self.config.planned_positions * self.config.max_sessions;
        ModelShape { blocks: c.blocks as u32, bytes_per_block: model.block_weight_bytes + kv as u64 }
    }

    fn generate(&mut self, request: Generate) -> Result<Started, ApiError> {
        let name = self.serving.name.clone().unwrap_or_default();
        let model = match self.serving.model.get() {
            None => return Err(ApiError::unavailable(format!("{name} is still loading on this coordinator; try again in a moment"))),
            Some(Err(reason)) => return Err(ApiError::unavailable(format!("{name} cannot be served: {reason}"))),
            Some(Ok(model)) => Arc::clone(model),
        };
        let now = self.now();
        if self.plan.is_none() {
            let candidates = self.candidates(&model);
            if candidates.is_empty() {
                return Err(ApiError::unavailable(format!(
                    "No contributor holds {name}: none is connected that can hold a span of it; start one with `tessera contribute --coordinator URL`"
                )));
            }
            let plan = placement::plan(&self.shape(&model), &candidates, &Policy::default())
                .map_err(|e| ApiError::unavailable(format!("The contributors connected cannot hold {name}: {e}")))?;
            let shape = self.shape(&model);
            log(format_args!("{name} placed ({} bytes a block): {}", shape.bytes_per_block, describe(plan.stages.iter().map(|s| (s.blocks.start, s.blocks.end, s.contributor.0)))));
            let stage_deadline_ms = u64::try_from(self.config.stage_deadline.as_millis()).unwrap_or(u64::MAX);
            let stage_floor_ms = u64::try_from(self.config.stage_floor.as_millis()).unwrap_or(u64::MAX);
            let config = PipelineConfig { stage_deadline_ms, stage_floor_ms, max_sessions: self.config.max_sessions };
            self.pipeline = Some(Pipeline::new(config, plan.clone()));
            self.plan = Some(plan);
            self.ensure_loads(&model);
        }
        let (Some(plan), Some(pipeline)) = (&self.plan, &mut self.pipeline) else {
            return Err(ApiError::internal("no plan"));
        };
        let id = self.next_request;
        let prompt_tokens = request.prompt.len();
        pipeline.start(SessionId(id), request.prompt).map_err(|e| ApiError::unavailable(format!("{e}; try again in a moment")))?;
        self.next_request += 1;
        let spans = describe(plan.stages.iter().map(|s| (s.blocks.start, s.blocks.end, s.contributor.0)));
        let seed = request.sampling.seed.unwrap_or_else(|| id ^ u64::from(self.start.elapsed().subsec_nanos()) << 20);
        let sampler = Sampler::new(request.sampling.temperature, request.sampling.top_p, seed);
        let capacity = (prompt_tokens + request.budget).min(model.config.context);
        self.live.insert(id, Live { events: request.events, sampler, budget: request.budget, generated: 0, capacity });
        self.records.insert(
            id,
            Record {
                prompt_tokens,
                completion_tokens: 0,
                state: "running",
                finish: None,
                failure: None,
                served: BTreeSet::new(),
                replans: 0,
                started: Instant::now(),
                first_token_ms: None,
                elapsed_ms: None,
            },
        );
        while self.records.len() > REQUESTS_KEPT {
            self.records.pop_first();
        }
        self.swarm.started(now, id, prompt_tokens, &spans);
        Ok(Started { request: id, spans })
    }

    /// Tells every holder of the plan, then every standby, without its span to load it
    /// (publishing the shard first), and every contributor whose role moved off a span it holds
    /// to unload that span.
    fn ensure_loads(&mut self, model: &Arc<ServedLlama>) {
        let Some(plan) = &self.plan else { return };
        let held: BTreeMap<ContributorId, Range<u32>> = self.holdings.iter().map(|(&id, h)| (id, h.blocks.clone())).collect();
        let loads = placement::loads(&held, plan);
        for (id, blocks) in loads.unload {
            let Some(holding) = self.holdings.remove(&id) else { continue };
            log(format_args!("contributor {id}: unload blocks {}..{}", blocks.start, blocks.end));
            if let Some(shard) = holding.shard {
                self.send(id, Outbound::Control(CoordinatorMessage::UnloadSpan { shard }));
            }
        }
        for placement::Role { contributor: id, blocks, .. } in loads.load {
            if !self.members.contains_key(&id) {
                continue;
            }
            self.holdings.insert(id, Holding { blocks: blocks.clone(), shard: None, ready: false, waiting: Vec::new() });
            match model.shard_cid(&blocks) {
                Some(cid) => self.load(id, &cid),
                None => self.publish(model, blocks),
            }
        }
        self.prefetch();
        self.link();
    }

    /// Writes the shard of `blocks` into the blob store in the background (once at a time);
    /// `Published` follows.
    fn publish(&mut self, model: &Arc<ServedLlama>, blocks: Range<u32>) {
        if !self.publishing.insert((blocks.start, blocks.end)) {
            return;
        }
        let (model, blobs, own) = (Arc::clone(model), Arc::clone(&self.blobs), self.own.clone());
        tokio::spawn(async move {
            let range = blocks.clone();
            let result = tokio::task::spawn_blocking(move || model.shard(&blobs, range)).await.unwrap_or_else(|e| Err(e.to_string()));
            let _ = own.send(Command::Published { blocks, result }).await;
        });
    }

    /// Asks each pair of consecutive holders for a direct channel (the downstream one first, so
    /// that it expects the offer), and each holder and the next span's standby (which shadows
    /// that span's steps), and the pairs no longer so to close theirs.
    fn link(&mut self) {
        let wanted: BTreeSet<(ContributorId, ContributorId)> = self
            .plan
            .iter()
            .flat_map(|plan| plan.stages.windows(2).flat_map(|w| [Some((w[0].contributor, w[1].contributor)), w[1].standby.map(|s| (w[0].contributor, s))]))
            .flatten()
            .filter(|(up, down)| up != down)
            .collect();
        let gone: Vec<_> = self.links.difference(&wanted).copied().collect();
        let new: Vec<_> = wanted.difference(&self.links).copied().collect();
        for (up, down) in gone {
            self.send(up, Outbound::Control(CoordinatorMessage::Unlink { peer: down }));
            self.send(down, Outbound::Control(CoordinatorMessage::Unlink { peer: up }));
        }
        for &(up, down) in &new {
            log(format_args!("contributors {up} -> {down}: direct channel asked for"));
            self.send(down, Outbound::Control(CoordinatorMessage::Link { peer: up, offer: false }));
            self.send(up, Outbound::Control(CoordinatorMessage::Link { peer: down, offer: true }));
        }
        self.links = wanted;
    }

    /// Names to each native contributor the shards it should fetch ahead, each once a
    /// connection, with the peers that can lend each (told to first, with `Lend`): to one that
    /// holds no span, the spans it could take over (`placement::prefetches`); to a holder, the
    /// spans a fresh plan would give it if another holder were lost with nobody to take over
    /// (`placement::contingencies`). Shards not written yet are published first, and named
    /// once they are. Tabs fetch nothing ahead, so nothing is named to them.
    fn prefetch(&mut self) {
        let (Some(plan), Some(model)) = (&self.plan, self.model()) else { return };
        let (shape, candidates) = (self.shape(&model), self.candidates(&model));
        let mut ahead = placement::prefetches(&shape, plan, &candidates);
        // Holders fetch ahead only once every span is loaded: the plan's own shards come first.
        if self.holdings.values().all(|h| h.ready) {
            ahead.extend(placement::contingencies(&shape, plan, &candidates, &Policy::default()));
        }
        ahead.retain(|(id, _)| self.native(*id));
        let unpublished: Vec<Range<u32>> = ahead.iter().flat_map(|(_, spans)| spans).filter(|blocks| model.shard_cid(blocks).is_none()).cloned().collect();
        for blocks in unpublished {
            // Once a block range (`publish` ignores a range being written already).
            self.publish(&model, blocks);
        }
        for (id, spans) in ahead {
            let Some(member) = self.members.get_mut(&id) else { continue };
            let blobs: Vec<String> = spans.iter().filter_map(|blocks| model.shard_cid(blocks)).filter(|cid| member.prefetched.insert(cid.clone())).collect();
            if blobs.is_empty() {
                continue;
            }
            let lenders: BTreeMap<String, Vec<ContributorId>> = blobs.iter().map(|cid| (cid.clone(), self.lenders(id, cid))).filter(|(_, peers)| !peers.is_empty()).collect();
            let mut lent: BTreeMap<ContributorId, Vec<String>> = BTreeMap::new();
            for (cid, peers) in &lenders {
                for &peer in peers {
                    lent.entry(peer).or_default().push(cid.clone());
                }
            }
            for (peer, blobs) in lent {
                self.send(peer, Outbound::Control(CoordinatorMessage::Lend { peer: id, blobs }));
            }
            log(format_args!("contributor {id}: prefetch {} shard(s), {} from peers", blobs.len(), lenders.len()));
            self.send(id, Outbound::Control(CoordinatorMessage::Prefetch { blobs, lenders }));
        }
    }

    /// Tells `id` to load the shard `cid` of the span it holds or stands by for, naming the
    /// contributors that can lend it the shard (each told to first, with `Lend`).
    fn load(&mut self, id: ContributorId, cid: &str) {
        let Some(holding) = self.holdings.get_mut(&id) else { return };
        holding.shard = Some(cid.to_string());
        let blocks = Blocks { start: holding.blocks.start, end: holding.blocks.end };
        let peers = self.lenders(id, cid);
        for &peer in &peers {
            self.send(peer, Outbound::Control(CoordinatorMessage::Lend { peer: id, blobs: vec![cid.to_string()] }));
        }
        let message = CoordinatorMessage::LoadSpan {
            model: self.serving.name.clone().unwrap_or_default(),
            shard: cid.to_string(),
            blocks,
            max_sessions: self.config.max_sessions as u32,
            peers: peers.clone(),
        };
        log(format_args!("contributor {id}: load blocks {}..{} ({cid}; peers that lend it: {peers:?})", blocks.start, blocks.end));
        self.send(id, Outbound::Control(message));
    }

    /// Who can lend `fetcher` the shard `cid`: at most `MAX_LENDERS` other contributors that
    /// lend blobs and hold that shard verified: loaded, or fetched ahead (`BlobHave`); those
    /// with it loaded first. None that dropped a span lately (`DROPS_REMEMBERED_MS`: a holder
    /// that went silent may be gone, and a borrower would wait for its answer in vain), none
    /// reported for corrupt bytes, and none for a browser tab, which fetches from the
    /// coordinator only.
    fn lenders(&self, fetcher: ContributorId, cid: &str) -> Vec<ContributorId> {
        if !self.native(fetcher) {
            return Vec::new();
        }
        let loaded = |id: &ContributorId| self.holdings.get(id).is_some_and(|h| h.ready && h.shard.as_deref() == Some(cid));
        let now = self.now();
        let mut lenders: Vec<(bool, ContributorId)> = self
            .members
            .iter()
            .filter(|&(&id, m)| id != fetcher && m.capabilities.lends_blobs && !m.failed && !m.barred && m.recent_drops(now) == 0)
            .filter(|&(id, m)| loaded(id) || m.fetched.contains(cid))
            .map(|(&id, _)| (!loaded(&id), id))
            .collect();
        lenders.sort();
        lenders.into_iter().take(MAX_LENDERS).map(|(_, id)| id).collect()
    }

    /// Whether `id` is a native contributor (not a browser tab).
    fn native(&self, id: ContributorId) -> bool {
        self.members.get(&id).is_some_and(|m| swarm::kind(&m.capabilities.backend) == Some("native"))
    }

    /// Queues a message for a member; one whose queue is full or gone is lost.
    fn send(&mut self, id: ContributorId, message: Outbound) {
        let sent = self.members.get(&id).is_some_and(|m| m.outbox.try_send(message).is_ok());
        if !sent && self.members.remove(&id).is_some() {
            self.lost(id, "its send queue is full or closed");
        }
    }

    /// Sends a step's hidden states to the next stage of its route (or keeps them until that
    /// stage's span is loaded).
    fn send_hop(&mut self, session: u64, step: u64, hidden: Vec<f32>) {
        let Some(hop) = self.hops.get(&(session, step)) else { return };
        let Some(&to) = hop.route.get(hop.next) else { return };
        let (start, rows) = (hop.positions.start, hop.positions.len());
        let Some(capacity) = self.live.get(&session).map(|l| l.capacity) else { return };
        let Some(holding) = self.holdings.get_mut(&to) else { return };
        let shard = match (&holding.shard, holding.ready) {
            (Some(shard), true) => shard.clone(),
            _ => {
                holding.waiting.push(Waiting { session, step, hidden });
                return;
            }
        };
        let dim = hidden.len().checked_div(rows).unwrap_or(0);
        let bytes = match Tensor::from_f32(vec![rows as u64, dim as u64], &hidden) {
            Ok(tensor) => tensor.encode(),
            Err(e) => return self.fail(session, ApiError::internal(format!("hidden states of session {session}: {e}"))),
        };
        // The later stages this one can pass the states to directly: linked, each to the one
        // before, and loaded; with the standbys of each that its upstream holder is linked to.
        let mut then = Vec::new();
        for (i, pair) in hop.route.windows(2).enumerate().skip(hop.next) {
            let (up, down) = (pair[0], pair[1]);
            match self.holdings.get(&down) {
                Some(Holding { shard: Some(shard), ready: true, .. }) if self.links.contains(&(up, down)) => {
                    let standbys = self.standbys(i + 1).into_iter().filter(|s| self.links.contains(&(up, s.contributor))).collect();
                    then.push(NextHop { contributor: down, shard: shard.clone(), standbys });
                }
                _ => break,
            }
        }
        let stage = hop.next;
        if stage > 0 {
            self.swarm.hop(false);
        }
        let (start, capacity) = (start as u32, capacity as u32);
        let now = self.now();
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.dispatched(now, SessionId(session), step, to, rows);
        }
        let payload = self.send_tensor(to, &bytes);
        self.send(to, Outbound::Control(CoordinatorMessage::Forward(Forward { shard, session, step, start, capacity, payload, then, shadow: false })));
        // The stage's standby gets a copy from here, as it would from a stage before passing on
        // directly.
        for standby in self.standbys(stage) {
            let payload = self.send_tensor(standby.contributor, &bytes);
            let forward = Forward { shard: standby.shard, session, step, start, capacity, payload, then: Vec::new(), shadow: true };
            self.send(standby.contributor, Outbound::Control(CoordinatorMessage::Forward(forward)));
        }
    }

    /// Sends an encoded tensor to `to` as frames of a stream of the coordinator's; its reference.
    fn send_tensor(&mut self, to: ContributorId, bytes: &[u8]) -> PayloadRef {
        let stream = self.next_stream;
        self.next_stream += 1;
        self.send(to, Outbound::Tensor { stream, bytes: bytes.to_vec() });
        PayloadRef { stream, bytes: bytes.len() as u64 }
    }

    /// The standby of the plan's stage `stage`, when its span is loaded there: it shadows the
    /// stage's steps (hot), so that taking over needs no recomputing.
    fn standbys(&self, stage: usize) -> Vec<Standby> {
        let Some(standby) = self.plan.as_ref().and_then(|p| p.stages.get(stage)).and_then(|s| s.standby) else { return Vec::new() };
        match self.holdings.get(&standby) {
            Some(Holding { shard: Some(shard), ready: true, .. }) => vec![Standby { contributor: standby, shard: shard.clone() }],
            _ => Vec::new(),
        }
    }

    /// A stage is done with a step: its answer times its holder, then the step goes on to the
    /// next stage (relayed here, or already passed on directly) or, after the last, to the head.
    fn answered(&mut self, session: u64, step: u64, answer: Answer) {
        let (from, now) = (answer.from(), self.now());
        if let Some(hop) = self.hops.get_mut(&(session, step))
            && hop.early.is_none()
            && hop.route.iter().skip(hop.next + 1).any(|&c| c == from)
        {
            hop.early = Some(answer);
            return;
        }
        // Every answer times its holder; one for an abandoned step (a late holder's, after its
        // span moved) is stale and ends here.
        let Some(pipeline) = &mut self.pipeline else { return };
        if pipeline.acknowledge(now, SessionId(session), step, from) != Received::Accepted {
            return;
        }
        let Some(hop) = self.hops.get_mut(&(session, step)) else { return };
        if hop.route.get(hop.next) != Some(&from) {
            return;
        }
        let (rows, stage, sample) = (hop.positions.len(), hop.next, hop.sample);
        // The hop into this stage: from the previous stage's being done to this one's answer,
        // less what this one says it spent on the step.
        if let Some((handed, direct)) = hop.handed.take() {
            let overhead = handed.elapsed().as_secs_f64() * 1e3 - answer.ms();
            if overhead >= 0.0 {
                self.swarm.hop_overhead(direct, overhead);
            }
        }
        if sample
            && let (Some(record), Some(stage)) = (self.records.get_mut(&session), self.plan.as_ref().and_then(|p| p.stages.get(stage)))
        {
            record.served.insert((stage.blocks.start, stage.blocks.end, from.0));
        }
        match answer {
            Answer::Passed { to, .. } => {
                if hop.route.get(hop.next + 1) != Some(&to) {
                    log(format_args!("contributor {from}: session {session} step {step} passed to contributor {to}, which is not the next stage"));
                    return self.unfit(from, "passed states to a contributor off the route");
                }
                hop.next += 1;
                hop.handed = Some((Instant::now(), true));
                let early = hop.early.take_if(|early| early.from() == to);
                self.swarm.hop(true);
                if let Some(pipeline) = &mut self.pipeline {
                    pipeline.dispatched(now, SessionId(session), step, to, rows);
                }
                if let Some(early) = early {
                    self.answered(session, step, early);
                }
            }
            Answer::Forwarded { hidden, .. } => self.relay(session, step, from, rows, &hidden),
        }
    }

    /// A stage's output came back here: check it, then send it to the next stage or the head.
    fn relay(&mut self, session: u64, step: u64, from: ContributorId, rows: usize, hidden: &Tensor) {
        let dim = self.model().map_or(0, |m| m.config.dim as u64);
        let values: Option<Vec<f32>> = match hidden.dims() {
            [r, d] if *r == rows as u64 && *d == dim => hidden.f32_values().map(Iterator::collect),
            _ => None,
        };
        let Some(values) = values else {
            log(format_args!("contributor {from}: session {session} step {step}: states of {:?} {:?}, expected F32 [{rows}, {dim}]", hidden.dtype(), hidden.dims()));
            return self.unfit(from, "returned states of the wrong shape");
        };
        let Some(hop) = self.hops.get_mut(&(session, step)) else { return };
        hop.next += 1;
        if hop.next < hop.route.len() {
            hop.handed = Some((Instant::now(), false));
            return self.send_hop(session, step, values);
        }
        self.hops.remove(&(session, step));
        let returned = self.pipeline.as_mut().map(|p| p.returned(SessionId(session), step));
        if returned == Some(Ok(true)) {
            let Some(model) = self.model() else { return };
            let own = self.own.clone();
            tokio::task::spawn_blocking(move || {
                let result = pollster::block_on(model.ends.logits(&model.gpu, &values)).map_err(|e| e.to_string());
                let _ = own.blocking_send(Command::Logits { session, result });
            });
        }
    }

    /// A holder broke the protocol of span serving: it serves no span for this connection.
    fn unfit(&mut self, id: ContributorId, why: &str) {
        if let Some(member) = self.members.get_mut(&id) {
            member.failed = true;
        }
        self.lost(id, why);
    }

    fn sampled(&mut self, session: u64, logits: &[f32]) {
        let now = self.now();
        let eos = self.model().and_then(|m| m.eos);
        let Some(live) = self.live.get_mut(&session) else { return };
        let token = live.sampler.sample(logits);
        if Some(token) == eos {
            return self.end(session, Some(FinishReason::Stop));
        }
        live.generated += 1;
        self.swarm.token(now, session);
        let (generated, budget) = (live.generated, live.budget);
        let delivered = live.events.send(Event::Token(token)).is_ok();
        if let Some(record) = self.records.get_mut(&session) {
            record.completion_tokens = generated;
            record.first_token_ms.get_or_insert(u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        }
        if !delivered {
            return self.end(session, None);
        }
        if generated >= budget {
            return self.end(session, Some(FinishReason::Length));
        }
        if let Some(pipeline) = &mut self.pipeline {
            let _ = pipeline.push_token(SessionId(session), token);
        }
    }

    /// Acts on what the pipeline asks for.
    fn pump(&mut self) {
        loop {
            let Some(output) = self.pipeline.as_mut().and_then(Pipeline::poll) else { return };
            match output {
                Output::Step { session, step, positions, tokens, route, sample } => {
                    let Some(model) = self.model() else { return };
                    self.hops.insert((session.0, step), Hop { positions, route, next: 0, sample, early: None, handed: None });
                    let own = self.own.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = pollster::block_on(model.ends.embed(&model.gpu, &tokens)).map_err(|e| e.to_string());
                        let _ = own.blocking_send(Command::Embedded { session: session.0, step, result });
                    });
                }
                Output::StageLate { session, step, contributor, misses } => {
                    // A holder still loading its span is not late: its hops wait for it.
                    if self.holdings.get(&contributor).is_some_and(|h| !h.ready) {
                        continue;
                    }
                    self.late(contributor, session, step, misses);
                }
            }
        }
    }

    /// A holder missed a hop's deadline: a drop counts against it, and its span moves to its
    /// standby or a free contributor (or, once it missed twice in a row, to a fresh plan without
    /// it) while it stays connected, free to stand by. When nobody else can take the span, the
    /// pipeline waits longer.
    fn late(&mut self, contributor: ContributorId, session: SessionId, step: u64, misses: u32) {
        let now = self.now();
        let Some(member) = self.members.get_mut(&contributor) else { return };
        member.drops.retain(|&at| now.since(at) < DROPS_REMEMBERED_MS);
        member.drops.push(now);
        let (Some(plan), Some(model)) = (self.plan.clone(), self.model()) else { return };
        let relief = placement::relieve(&self.shape(&model), &plan, &self.candidates(&model), contributor, &Policy::default(), misses >= 2);
        let pace = self.pipeline.as_ref().and_then(|p| p.pace(contributor)).map_or("not measured".into(), |ms| format!("now allowing for {ms:.0} ms a token"));
        if relief.moves.is_empty() {
            log(format_args!("contributor {contributor}: session {} step {step} is late ({misses} in a row, {pace}); its span stays: waiting longer", session.0));
            return;
        }
        let why = format!("missed session {} step {step}'s deadline ({misses} in a row, {pace})", session.0);
        self.apply(&model, relief, contributor, &why);
    }

    /// A contributor joined: it stands by (and preloads), unless no session is running and a
    /// fresh plan is worth it.
    fn admit(&mut self, id: ContributorId) {
        let (Some(plan), Some(model)) = (self.plan.clone(), self.model()) else { return };
        let idle = self.live.is_empty();
        if let Ok(admitted) = placement::admit(&self.shape(&model), &plan, &self.candidates(&model), &Policy::default(), idle) {
            self.apply(&model, admitted, id, "joined");
        }
    }

    /// Switches to `repair.plan`: when a stage changed hands, abandons the hops in flight and
    /// lets the pipeline replay (a plan that only changes standbys disturbs no session); then
    /// loads and unloads what the roles need. `id` and `why` say what prompted it, for the log.
    fn apply(&mut self, model: &Arc<ServedLlama>, repair: placement::Repair, id: ContributorId, why: &str) {
        let route = |plan: &Plan| plan.stages.iter().map(|s| (s.blocks.clone(), s.contributor)).collect::<Vec<_>>();
        let moved = self.plan.as_ref().is_none_or(|old| route(old) != route(&repair.plan));
        if moved {
            let spans = describe(repair.plan.stages.iter().map(|s| (s.blocks.start, s.blocks.end, s.contributor.0)));
            log(format_args!("contributor {id} {why}: {} re-placed{}: {spans}", model.name, if repair.replanned { " afresh" } else { "" }));
            self.hops.clear();
            for holding in self.holdings.values_mut() {
                holding.waiting.clear();
            }
            for id in self.live.keys() {
                if let Some(record) = self.records.get_mut(id) {
                    record.replans += 1;
                }
            }
        }
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.set_plan(repair.plan.clone());
        }
        self.plan = Some(repair.plan);
        self.ensure_loads(model);
    }

    /// A contributor that held a span (or stood by) is gone or unfit: repair the plan.
    fn lost(&mut self, id: ContributorId, why: &str) {
        self.holdings.remove(&id);
        let Some(plan) = self.plan.clone() else { return };
        if !plan.members().contains(&id) {
            return;
        }
        let Some(model) = self.model() else { return };
        let name = model.name.clone();
        let candidates = self.candidates(&model);
        match placement::repair(&self.shape(&model), &plan, &candidates, &Policy::default()) {
            Ok(repair) => self.apply(&model, repair, id, why),
            Err(e) => {
                log(format_args!("contributor {id} {why}: {name} cannot be placed any more: {e}"));
                self.fail_all(ApiError::unavailable(format!("A contributor holding part of {name} {why}, and the others cannot hold it: {e}")));
                self.plan = None;
                self.pipeline = None;
                let unloads: Vec<(ContributorId, String)> = self.holdings.drain().filter_map(|(id, h)| h.shard.map(|shard| (id, shard))).collect();
                for (id, shard) in unloads {
                    self.send(id, Outbound::Control(CoordinatorMessage::UnloadSpan { shard }));
                }
                self.link();
            }
        }
    }

    fn fail(&mut self, session: u64, error: ApiError) {
        if let Some(live) = self.live.get(&session) {
            let _ = live.events.send(Event::Failed(error.clone()));
        }
        if let Some(record) = self.records.get_mut(&session) {
            record.state = "failed";
            record.failure = Some(error.message);
        }
        self.end(session, None);
    }

    fn fail_all(&mut self, error: ApiError) {
        let sessions: Vec<u64> = self.live.keys().copied().collect();
        for session in sessions {
            self.fail(session, error.clone());
        }
    }

    /// Ends a session: its handler hears `finish` (if any), its holders free its caches.
    fn end(&mut self, session: u64, finish: Option<FinishReason>) {
        let Some(live) = self.live.remove(&session) else { return };
        if let Some(pipeline) = &mut self.pipeline {
            let _ = pipeline.finish(SessionId(session));
        }
        self.hops.retain(|&(s, _), _| s != session);
        let holders: Vec<ContributorId> = self.holdings.keys().copied().collect();
        for holding in self.holdings.values_mut() {
            holding.waiting.retain(|w| w.session != session);
        }
        for id in holders {
            self.send(id, Outbound::Control(CoordinatorMessage::EndSession { session }));
        }
        let now = self.now();
        let Some(record) = self.records.get_mut(&session) else { return };
        record.elapsed_ms = Some(u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        if let Some(finish) = finish {
            record.state = "done";
            record.finish = Some(finish);
            let _ = live.events.send(Event::Done { finish, spans: describe(record.served.iter().copied()) });
        } else if record.state == "running" {
            record.state = "stopped";
        }
        self.swarm.ended(now, session, record.state, &describe(record.served.iter().copied()));
    }

    fn request(&self, id: u64) -> Option<Value> {
        let r = self.records.get(&id)?;
        let spans: Vec<Value> = r.served.iter().map(|&(start, end, contributor)| json!({ "blocks": [start, end], "contributor": contributor })).collect();
        Some(json!({
            "id": id,
            "model": self.serving.name,
            "state": r.state,
            "finish_reason": r.finish,
            "failure": r.failure,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "spans": spans,
            "x_tessera_spans": describe(r.served.iter().copied()),
            "replans": r.replans,
            "first_token_ms": r.first_token_ms,
            "elapsed_ms": r.elapsed_ms,
        }))
    }
}
