//! Several contributor cores, driven by the coordinator's sans-IO pieces (`Scheduler` for
//! units, `placement` for spans, `Pipeline` for generation) over a simulated network in
//! simulated time: an embedding job by quorum, a model split into spans with a standby, steps
//! passed along direct links with shadow copies to the standby, a direct link cut (its hops go
//! through the coordinator), and a holder whose connection drops (its standby takes over, the
//! session replays) and that connects again as a new contributor. The coordinator here is a
//! small shell around those pieces, as `serve` is; the contributors are `Session`s with glue
//! that computes at once: a span adds its block count to every value, a unit's embedding is a
//! function of its token ids. Everything is deterministic: the same run every time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::ops::Range;

use tessera_contributor::{BlobJob, Event, Millis, Outgoing, Output, Policy, Session, SpanJob, next_span_jobs};
use tessera_coordinator::pipeline::{self, Pipeline, PipelineConfig, Received, SessionId};
use tessera_coordinator::placement::{self, Candidate, ModelShape, Plan};
use tessera_coordinator::{Config, JobSpec, MemoryStore, Scheduler};
use tessera_protocol::{
    AdapterLimits, Blocks, Capabilities, Chunker, ContributorId, ContributorMessage, CoordinatorMessage, Decoded, Forward, Incoming, NextHop,
    PROTOCOL_VERSION, Payload, PayloadKind, PayloadRef, Reassembler, Standby, Tensor, UnitId, Work, decode, encode_control,
};

/// One way across the simulated network, in ms.
const LATENCY: Millis = 5.0;
/// The model's width and depth.
const DIM: usize = 4;
const BLOCKS: u32 = 12;
const PROMPT: [u32; 3] = [1, 2, 3];
const TOKENS: usize = 24;
/// Placement that takes three stages of four blocks over four of three (a third slower, one
/// hop fewer), so that the fourth contributor stands by.
const PLACEMENT: placement::Policy = placement::Policy { max_drops: 3, bottleneck_slack: 0.5, replan_gain: 0.7 };
/// The largest message a simulated channel takes.
const MAX_MESSAGE: usize = 256 << 10;

/// A message on a channel.
#[derive(Debug, Clone)]
enum Wire {
    Text(String),
    Binary(Vec<u8>),
}

impl Wire {
    fn of(outgoing: Outgoing) -> Wire {
        match outgoing {
            Outgoing::Text(text) => Wire::Text(text),
            Outgoing::Binary(bytes) => Wire::Binary(bytes),
        }
    }

    fn incoming(&self) -> Incoming<'_> {
        match self {
            Wire::Text(text) => Incoming::Text(text),
            Wire::Binary(bytes) => Incoming::Binary(bytes),
        }
    }
}

/// One end of a direct link: a node, its connection and the session's link number.
type End = (usize, u64, u64);

/// What the network delivers, to a node's connection `conn` (stale once it reconnected).
#[derive(Debug)]
enum Delivery {
    ToCoordinator { node: usize, conn: u64, wire: Wire },
    ToNode { node: usize, conn: u64, wire: Wire },
    OnLink { to: End, wire: Wire },
    Described { to: End, sdp: String },
    LinkOpen { to: End },
    LinkClosed { to: End, reason: String },
    Passed { to: End, session: u64, step: u64, result: Result<(), String> },
    UnitDone { node: usize, conn: u64, unit: UnitId, rows: Vec<Vec<f32>> },
}

/// A contributor: a core and the glue around it.
struct Node {
    session: Session,
    conn: u64,
    online: bool,
    /// Spans loaded, by shard.
    spans: BTreeMap<String, Range<usize>>,
    queue: VecDeque<SpanJob>,
    /// Steps run here, shadow copies included (a shadow and its real step are both counted).
    steps: usize,
    passed: usize,
}

/// The coordinator's shell around its sans-IO pieces.
struct Coordinator {
    scheduler: Scheduler<MemoryStore>,
    /// Who is on which node and connection.
    members: BTreeMap<ContributorId, (usize, u64)>,
    next_id: u64,
    frames: BTreeMap<ContributorId, Reassembler>,
    tensors: BTreeMap<ContributorId, Vec<Payload>>,
    next_stream: u64,
    plan: Option<Plan>,
    pipeline: Option<Pipeline>,
    /// Contributors whose span is loaded.
    ready: BTreeSet<ContributorId>,
    links: BTreeSet<(ContributorId, ContributorId)>,
    hops: BTreeMap<(u64, u64), Hop>,
    /// Generated tokens, and whether generation began.
    tokens: Vec<u32>,
    started: bool,
    units_accepted: usize,
    verdicts_rejected: usize,
    job_done: bool,
    relayed: usize,
    errors: Vec<String>,
}

/// A step on its way along its route.
struct Hop {
    positions: Range<usize>,
    route: Vec<ContributorId>,
    next: usize,
    sample: bool,
    /// A later stage's answer that overtook the `Passed` before it.
    early: Option<(ContributorId, Option<Vec<f32>>)>,
}

struct Sim {
    now: Millis,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    pending: BTreeMap<u64, Delivery>,
    nodes: Vec<Node>,
    coordinator: Coordinator,
    /// Open direct links, both ways.
    pairs: BTreeMap<End, End>,
    /// Offers made and not answered yet, by the SDP that names them.
    offers: BTreeMap<String, End>,
    /// Links cut by the network: they never open again.
    cut: BTreeSet<(ContributorId, ContributorId)>,
}

fn capabilities() -> Capabilities {
    Capabilities {
        adapter: "simulated".into(),
        backend: "none".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: 1 << 27,
            max_buffer_size: 1 << 28,
            max_compute_workgroup_storage_size: 16384,
            max_compute_invocations_per_workgroup: 256,
        },
        memory_budget_bytes: 5 << 20,
        benchmark_score: 10.0,
        max_concurrent_units: 1,
        lends_blobs: true,
    }
}

/// A unit's honest embedding: a function of each input's ids.
fn embedding(inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    inputs
        .iter()
        .map(|ids| {
            let row: Vec<f32> = (0..8).map(|k| ids.iter().map(|&t| (t as f32 + k as f32).sin()).sum::<f32>() + 0.5).collect();
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter().map(|v| v / norm).collect()
        })
        .collect()
}

fn shard(blocks: &Range<u32>) -> String {
    format!("bafkspan{}x{}", blocks.start, blocks.end)
}

fn ms(now: Millis) -> tessera_coordinator::Millis {
    tessera_coordinator::Millis(now as u64)
}

impl Sim {
    fn new(nodes: usize) -> Sim {
        let config = Config { heartbeat_interval_ms: 1_000, heartbeat_timeout_ms: 30_000, ..Config::default() };
        let coordinator = Coordinator {
            scheduler: Scheduler::restore(config, MemoryStore::new(), tessera_coordinator::Millis(0)).unwrap(),
            members: BTreeMap::new(),
            next_id: 1,
            frames: BTreeMap::new(),
            tensors: BTreeMap::new(),
            next_stream: 1,
            plan: None,
            pipeline: None,
            ready: BTreeSet::new(),
            links: BTreeSet::new(),
            hops: BTreeMap::new(),
            tokens: PROMPT.to_vec(),
            started: false,
            units_accepted: 0,
            verdicts_rejected: 0,
            job_done: false,
            relayed: 0,
            errors: Vec::new(),
        };
        let mut sim = Sim {
            now: 0.0,
            seq: 0,
            events: BinaryHeap::new(),
            pending: BTreeMap::new(),
            nodes: Vec::new(),
            coordinator,
            pairs: BTreeMap::new(),
            offers: BTreeMap::new(),
            cut: BTreeSet::new(),
        };
        for node in 0..nodes {
            sim.nodes.push(Node {
                session: Session::new(capabilities(), Policy::NATIVE, 1.0, MAX_MESSAGE),
                conn: 0,
                online: true,
                spans: BTreeMap::new(),
                queue: VecDeque::new(),
                steps: 0,
                passed: 0,
            });
            sim.pump(node);
        }
        sim
    }

    fn at(&mut self, delay: Millis, delivery: Delivery) {
        self.seq += 1;
        self.events.push(Reverse(((self.now + delay) as u64, self.seq)));
        self.pending.insert(self.seq, delivery);
    }

    /// Runs events until `until` (ms), waking each core at its deadlines.
    fn run_until(&mut self, until: Millis) {
        self.run_until_or(until, |_| false);
    }

    /// Runs events until `until` (ms), or until `done` holds.
    fn run_until_or(&mut self, until: Millis, done: impl Fn(&Sim) -> bool) {
        loop {
            if done(self) {
                return;
            }
            let node_wake = self.nodes.iter().filter(|n| n.online).filter_map(|n| n.session.poll_timeout()).min_by(f64::total_cmp);
            let next_event = self.events.peek().map(|Reverse((t, _))| *t as f64);
            let next = [node_wake, next_event].into_iter().flatten().min_by(f64::total_cmp);
            let Some(next) = next.filter(|&t| t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if next_event.is_some_and(|t| t <= self.now) {
                let Some(Reverse((_, seq))) = self.events.pop() else { unreachable!() };
                let delivery = self.pending.remove(&seq).unwrap();
                self.deliver(delivery);
            } else {
                for node in 0..self.nodes.len() {
                    if self.nodes[node].online && self.nodes[node].session.poll_timeout().is_some_and(|t| t <= self.now) {
                        self.nodes[node].session.handle_timeout(self.now);
                        self.pump(node);
                    }
                }
            }
        }
    }

    fn live(&self, node: usize, conn: u64) -> bool {
        self.nodes[node].online && self.nodes[node].conn == conn
    }

    fn deliver(&mut self, delivery: Delivery) {
        let now = self.now;
        match delivery {
            Delivery::ToCoordinator { node, conn, wire } if self.live(node, conn) => self.coordinator_receives(node, conn, &wire),
            Delivery::ToNode { node, conn, wire } if self.live(node, conn) => {
                self.nodes[node].session.handle(now, wire.incoming());
                self.pump(node);
            }
            Delivery::OnLink { to: (node, conn, link), wire } if self.live(node, conn) => {
                self.nodes[node].session.link_message(now, link, wire.incoming());
                self.pump(node);
            }
            Delivery::Described { to: (node, conn, link), sdp } if self.live(node, conn) => {
                self.nodes[node].session.described(now, link, Ok(sdp));
                self.pump(node);
            }
            Delivery::LinkOpen { to: (node, conn, link) } if self.live(node, conn) => {
                self.nodes[node].session.link_open(now, link, MAX_MESSAGE);
                self.pump(node);
            }
            Delivery::LinkClosed { to: (node, conn, link), reason } if self.live(node, conn) => {
                self.nodes[node].session.link_closed(now, link, reason);
                self.pump(node);
            }
            Delivery::Passed { to: (node, conn, link), session, step, result } if self.live(node, conn) => {
                self.nodes[node].session.passed(now, link, session, step, result);
                self.pump(node);
            }
            Delivery::UnitDone { node, conn, unit, rows } if self.live(node, conn) => {
                self.nodes[node].session.finished(now, unit, 1.0, Ok(rows));
                self.pump(node);
            }
            _ => {}
        }
    }

    /// Runs what node `node`'s core hands out, until it hands out nothing more.
    fn pump(&mut self, node: usize) {
        let now = self.now;
        let conn = self.nodes[node].conn;
        while let Some(output) = self.nodes[node].session.poll() {
            match output {
                Output::Send(message) => self.at(LATENCY, Delivery::ToCoordinator { node, conn, wire: Wire::of(message) }),
                Output::Run(assignment) => {
                    let rows = embedding(&assignment.inputs);
                    self.at(1.0, Delivery::UnitDone { node, conn, unit: assignment.unit, rows });
                }
                Output::Span(job) => self.nodes[node].queue.push_back(job),
                // The simulated cache holds every shard.
                Output::Blob(BlobJob::Check { cid }) => self.nodes[node].session.blob_checked(now, &cid, true),
                Output::Blob(job) => panic!("node {node}: {job:?}"),
                Output::Fetched { cid, .. } => panic!("node {node}: fetched {cid}, which nobody asked for"),
                Output::Offer { link, .. } => {
                    let sdp = format!("offer {node} {conn} {link}");
                    self.offers.insert(sdp.clone(), (node, conn, link));
                    self.at(1.0, Delivery::Described { to: (node, conn, link), sdp });
                }
                Output::Answer { link, sdp, .. } => {
                    let Some(&offerer) = self.offers.get(&sdp) else { continue };
                    self.offers.remove(&sdp);
                    let answer = format!("answer {node} {conn} {link} to {} {} {}", offerer.0, offerer.1, offerer.2);
                    self.pairs.insert(offerer, (node, conn, link));
                    self.pairs.insert((node, conn, link), offerer);
                    self.at(1.0, Delivery::Described { to: (node, conn, link), sdp: answer });
                }
                Output::Accept { link, .. } => {
                    let end = (node, conn, link);
                    if let Some(&other) = self.pairs.get(&end) {
                        let cut = self.member(end.0).zip(self.member(other.0)).is_some_and(|(a, b)| self.cut.contains(&(a, b)) || self.cut.contains(&(b, a)));
                        if cut {
                            self.close_pair(end, "the network between them is cut");
                        } else {
                            self.at(LATENCY, Delivery::LinkOpen { to: end });
                            self.at(LATENCY, Delivery::LinkOpen { to: other });
                        }
                    }
                }
                Output::Close { link } => {
                    if let Some(other) = self.pairs.remove(&(node, conn, link)) {
                        self.pairs.remove(&other);
                        self.at(LATENCY, Delivery::LinkClosed { to: other, reason: format!("node {node} closed it") });
                    }
                }
                Output::Pass { link, session, step, messages } => {
                    if self.pairs.contains_key(&(node, conn, link)) {
                        self.send_on((node, conn, link), messages);
                        self.nodes[node].passed += 1;
                        self.at(0.0, Delivery::Passed { to: (node, conn, link), session, step, result: Ok(()) });
                    } else {
                        let result = Err("the channel is gone".to_string());
                        self.at(0.0, Delivery::Passed { to: (node, conn, link), session, step, result });
                    }
                }
                Output::SendOn { link, messages } => self.send_on((node, conn, link), messages),
                Output::Event(Event::Forwarded { .. }) => self.nodes[node].steps += 1,
                Output::Event(_) | Output::Log(_) => {}
                Output::Restart(reason) => panic!("node {node} restarted: {reason}"),
            }
            self.run_span_jobs(node);
        }
    }

    /// The span jobs queued on `node`, run at once: a span adds its block count to every value.
    fn run_span_jobs(&mut self, node: usize) {
        let now = self.now;
        loop {
            let jobs = next_span_jobs(&mut self.nodes[node].queue, 8);
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                let n = &mut self.nodes[node];
                match job {
                    SpanJob::Load { shard, blocks, .. } => {
                        n.spans.insert(shard.clone(), blocks.clone());
                        n.session.span_loaded(now, shard, blocks, Ok(()));
                    }
                    SpanJob::Forward { shard, session, step, hidden, .. } => {
                        let result = match n.spans.get(&shard) {
                            Some(blocks) => Ok((hidden.iter().map(|v| v + blocks.len() as f32).collect(), DIM)),
                            None => Err(format!("span {shard} is not loaded here")),
                        };
                        n.session.forwarded(now, session, step, 1.0, result);
                    }
                    SpanJob::End { .. } => {}
                    SpanJob::Unload { shard } => drop(n.spans.remove(&shard)),
                }
            }
        }
    }

    fn send_on(&mut self, from: End, messages: Vec<Outgoing>) {
        match self.pairs.get(&from).copied() {
            Some(to) => {
                for message in messages {
                    self.at(LATENCY, Delivery::OnLink { to, wire: Wire::of(message) });
                }
            }
            None => self.at(0.0, Delivery::LinkClosed { to: from, reason: "the channel is gone".into() }),
        }
    }

    fn close_pair(&mut self, end: End, reason: &str) {
        if let Some(other) = self.pairs.remove(&end) {
            self.pairs.remove(&other);
            self.at(LATENCY, Delivery::LinkClosed { to: other, reason: reason.into() });
        }
        self.at(LATENCY, Delivery::LinkClosed { to: end, reason: reason.into() });
    }

    fn member(&self, node: usize) -> Option<ContributorId> {
        let conn = self.nodes[node].conn;
        self.coordinator.members.iter().find(|(_, (n, c))| *n == node && *c == conn).map(|(&id, _)| id)
    }

    fn node_of(&self, id: ContributorId) -> Option<(usize, u64)> {
        self.coordinator.members.get(&id).copied()
    }

    /// The direct link between two contributors fails, for good.
    fn cut_link(&mut self, a: ContributorId, b: ContributorId) {
        self.cut.insert((a, b));
        let ends: Vec<End> = self.pairs.keys().copied().filter(|&(node, ..)| self.member(node) == Some(a)).collect();
        for end in ends {
            if let Some(&other) = self.pairs.get(&end)
                && self.member(other.0) == Some(b)
            {
                self.close_pair(end, "the network between them is cut");
            }
        }
    }

    /// `node`'s connection drops: the coordinator loses it, its peers lose their links to it.
    fn disconnect(&mut self, node: usize) {
        let conn = self.nodes[node].conn;
        self.nodes[node].online = false;
        let ends: Vec<End> = self.pairs.keys().copied().filter(|&(n, c, _)| n == node && c == conn).collect();
        for end in ends {
            self.close_pair(end, "its peer is gone");
        }
        if let Some(id) = self.member(node) {
            self.lost(id);
        }
    }

    /// `node` connects again: a new core, a new connection, no spans.
    fn reconnect(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        (n.session, n.conn, n.online) = (Session::new(capabilities(), Policy::NATIVE, 1.0, MAX_MESSAGE), n.conn + 1, true);
        n.spans.clear();
        n.queue.clear();
        self.pump(node);
    }

    // The coordinator's side.

    fn send(&mut self, id: ContributorId, message: &CoordinatorMessage) {
        if let Some((node, conn)) = self.node_of(id) {
            self.at(LATENCY, Delivery::ToNode { node, conn, wire: Wire::Text(encode_control(message)) });
        }
    }

    fn send_tensor(&mut self, id: ContributorId, bytes: &[u8]) -> PayloadRef {
        let stream = self.coordinator.next_stream;
        self.coordinator.next_stream += 1;
        if let Some((node, conn)) = self.node_of(id) {
            for frame in Chunker::new(stream, PayloadKind::Tensor, bytes).unwrap() {
                self.at(LATENCY, Delivery::ToNode { node, conn, wire: Wire::Binary(frame) });
            }
        }
        PayloadRef { stream, bytes: bytes.len() as u64 }
    }

    fn coordinator_receives(&mut self, node: usize, conn: u64, wire: &Wire) {
        let from = self.coordinator.members.iter().find(|(_, (n, c))| *n == node && *c == conn).map(|(&id, _)| id);
        let message = match decode::<ContributorMessage>(wire.incoming()) {
            Ok(Decoded::Control(message)) => message,
            Ok(Decoded::Chunk(chunk)) => {
                let id = from.expect("frames come from a member");
                if let Some(payload) = self.coordinator.frames.entry(id).or_default().push(chunk).unwrap() {
                    self.coordinator.tensors.entry(id).or_default().push(payload);
                }
                return;
            }
            Err(e) => panic!("node {node} sent what does not decode: {e}"),
        };
        if let ContributorMessage::Hello { capabilities, .. } = message {
            let id = ContributorId(self.coordinator.next_id);
            self.coordinator.next_id += 1;
            self.coordinator.members.insert(id, (node, conn));
            self.coordinator.scheduler.join(ms(self.now), id, capabilities).unwrap();
            self.send(id, &CoordinatorMessage::Welcome { protocol_version: PROTOCOL_VERSION, contributor: id, heartbeat_interval_ms: 1_000 });
            return self.coordinator_tick();
        }
        let id = from.expect("a member speaks after its hello");
        let _ = self.coordinator.scheduler.heartbeat(ms(self.now), id);
        match message {
            ContributorMessage::UnitResult { unit, payload } => {
                let tensor = self.take_tensor(id, &payload);
                self.coordinator.scheduler.report(ms(self.now), id, unit, tensor).unwrap();
            }
            ContributorMessage::SpanReady { .. } => {
                self.coordinator.ready.insert(id);
                self.start_generation();
            }
            ContributorMessage::Passed { session, step, to, .. } => self.answered(id, session, step, Some(to), None),
            ContributorMessage::Forwarded { session, step, payload, .. } => {
                let values = self.take_tensor(id, &payload).f32_values().unwrap().collect();
                self.answered(id, session, step, None, Some(values));
            }
            ContributorMessage::Signal { from, to, payload } => {
                assert_eq!(from, id, "a signal names its sender");
                self.send(to, &CoordinatorMessage::Signal { from, to, payload });
            }
            ContributorMessage::Error { code, message } => self.coordinator.errors.push(format!("contributor {id}: {code:?}: {message}")),
            ContributorMessage::Heartbeat | ContributorMessage::BlobHave { .. } => {}
            other => panic!("contributor {id} sent {other:?}"),
        }
        self.coordinator_tick();
    }

    fn take_tensor(&mut self, id: ContributorId, payload: &PayloadRef) -> Tensor {
        let tensors = self.coordinator.tensors.entry(id).or_default();
        let at = tensors.iter().position(|t| t.stream == payload.stream).expect("the tensor came first");
        Tensor::decode(&tensors.remove(at).bytes, usize::MAX).unwrap()
    }

    /// The scheduler's and the pipeline's outputs, carried out.
    fn coordinator_tick(&mut self) {
        let now = ms(self.now);
        self.coordinator.scheduler.tick(now).unwrap();
        self.coordinator.scheduler.flush(now).unwrap();
        while let Some(output) = self.coordinator.scheduler.poll() {
            match output {
                tessera_coordinator::Output::Assign { contributor, job, unit, work, .. } => {
                    let work: Work = (*work).clone();
                    self.send(contributor, &CoordinatorMessage::Assign { job, unit, deadline_ms: 60_000, work });
                }
                tessera_coordinator::Output::UnitAccepted { unit, agreed, rejected, .. } => {
                    self.coordinator.units_accepted += 1;
                    self.coordinator.verdicts_rejected += rejected.len();
                    for (id, accepted) in agreed.into_iter().map(|a| (a, true)).chain(rejected.into_iter().map(|r| (r, false))) {
                        self.send(id, &CoordinatorMessage::Verdict { unit, accepted });
                    }
                }
                tessera_coordinator::Output::JobDone { .. } => self.coordinator.job_done = true,
                other => panic!("the scheduler said {other:?}"),
            }
        }
        let Some(pipeline) = self.coordinator.pipeline.as_mut() else { return };
        pipeline.tick(now);
        let mut steps = Vec::new();
        while let Some(output) = pipeline.poll() {
            match output {
                pipeline::Output::Step { session, step, positions, tokens, route, sample } => steps.push((session, step, positions, tokens, route, sample)),
                late @ pipeline::Output::StageLate { .. } => panic!("nothing is late in this simulation: {late:?}"),
            }
        }
        for (session, step, positions, tokens, route, sample) in steps {
            self.coordinator.hops.insert((session.0, step), Hop { positions, route, next: 0, sample, early: None });
            // The embedding: each token's row holds the token.
            let hidden: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32; DIM]).collect();
            self.send_hop(session.0, step, hidden);
        }
    }

    /// Places the model on the contributors that joined: spans, a standby, and direct links
    /// between consecutive holders (and to the standby).
    fn place(&mut self) {
        let shape = ModelShape { blocks: BLOCKS, bytes_per_block: 1 << 20 };
        let candidates: Vec<Candidate> =
            self.coordinator.members.keys().map(|&contributor| Candidate { contributor, blocks_per_second: 100.0, memory_bytes: 5 << 20, recent_drops: 0 }).collect();
        let plan = placement::plan(&shape, &candidates, &PLACEMENT).unwrap();
        assert!(plan.stages.len() >= 3 && plan.stages.iter().any(|s| s.standby.is_some()), "{plan:?}");
        for stage in &plan.stages {
            for id in [Some(stage.contributor), stage.standby].into_iter().flatten() {
                let blocks = Blocks { start: stage.blocks.start, end: stage.blocks.end };
                let load = CoordinatorMessage::LoadSpan { model: "sim".into(), shard: shard(&stage.blocks), blocks, max_sessions: 4, peers: Vec::new() };
                self.send(id, &load);
            }
        }
        self.coordinator.pipeline = Some(Pipeline::new(PipelineConfig::default(), plan.clone()));
        self.coordinator.plan = Some(plan);
        self.link();
    }

    fn link(&mut self) {
        let plan = self.coordinator.plan.as_ref().unwrap();
        let wanted: BTreeSet<(ContributorId, ContributorId)> = plan
            .stages
            .windows(2)
            .flat_map(|w| [Some((w[0].contributor, w[1].contributor)), w[1].standby.map(|s| (w[0].contributor, s))])
            .flatten()
            .filter(|(up, down)| up != down)
            .collect();
        let gone: Vec<_> = self.coordinator.links.difference(&wanted).copied().collect();
        let new: Vec<_> = wanted.difference(&self.coordinator.links).copied().collect();
        for (up, down) in gone {
            self.send(up, &CoordinatorMessage::Unlink { peer: down });
            self.send(down, &CoordinatorMessage::Unlink { peer: up });
        }
        for (up, down) in new {
            self.send(down, &CoordinatorMessage::Link { peer: up, offer: false });
            self.send(up, &CoordinatorMessage::Link { peer: down, offer: true });
        }
        self.coordinator.links = wanted;
    }

    fn start_generation(&mut self) {
        let Some(plan) = &self.coordinator.plan else { return };
        let all_ready = plan.stages.iter().all(|s| self.coordinator.ready.contains(&s.contributor));
        if self.coordinator.started || !all_ready {
            return;
        }
        self.coordinator.started = true;
        self.coordinator.pipeline.as_mut().unwrap().start(SessionId(1), PROMPT.to_vec()).unwrap();
        self.coordinator_tick();
    }

    /// Sends the step to its route's next stage, naming the stages after it that it can pass
    /// to directly, and a shadow copy to that stage's standby.
    fn send_hop(&mut self, session: u64, step: u64, hidden: Vec<f32>) {
        let Some(hop) = self.coordinator.hops.get(&(session, step)) else { return };
        let plan = self.coordinator.plan.clone().unwrap();
        let stage_shard = |i: usize| shard(&plan.stages[i].blocks);
        let to = hop.route[hop.next];
        let (start, rows) = (hop.positions.start as u32, hop.positions.len());
        let ready = self.coordinator.ready.clone();
        let standbys = |i: usize| -> Vec<Standby> {
            plan.stages[i].standby.filter(|s| ready.contains(s)).map(|s| Standby { contributor: s, shard: stage_shard(i) }).into_iter().collect()
        };
        let mut then = Vec::new();
        for (i, pair) in hop.route.windows(2).enumerate().skip(hop.next) {
            if !(self.coordinator.links.contains(&(pair[0], pair[1])) && ready.contains(&pair[1])) {
                break;
            }
            let standbys = standbys(i + 1).into_iter().filter(|s| self.coordinator.links.contains(&(pair[0], s.contributor))).collect();
            then.push(NextHop { contributor: pair[1], shard: stage_shard(i + 1), standbys });
        }
        let stage = hop.next;
        let bytes = Tensor::from_f32(vec![rows as u64, DIM as u64], &hidden).unwrap().encode();
        self.coordinator.pipeline.as_mut().unwrap().dispatched(ms(self.now), SessionId(session), step, to, rows);
        let payload = self.send_tensor(to, &bytes);
        let forward = Forward { shard: stage_shard(stage), session, step, start, capacity: 64, payload, then, shadow: false };
        self.send(to, &CoordinatorMessage::Forward(forward));
        for standby in standbys(stage) {
            let payload = self.send_tensor(standby.contributor, &bytes);
            let forward = Forward { shard: standby.shard, session, step, start, capacity: 64, payload, then: Vec::new(), shadow: true };
            self.send(standby.contributor, &CoordinatorMessage::Forward(forward));
        }
    }

    /// A stage's answer: passed on directly (`to`), or its states back here (`values`).
    fn answered(&mut self, from: ContributorId, session: u64, step: u64, to: Option<ContributorId>, values: Option<Vec<f32>>) {
        let now = ms(self.now);
        if let Some(hop) = self.coordinator.hops.get_mut(&(session, step))
            && hop.early.is_none()
            && hop.route.iter().skip(hop.next + 1).any(|&c| c == from)
        {
            hop.early = Some((from, values));
            return;
        }
        if self.coordinator.pipeline.as_mut().unwrap().acknowledge(now, SessionId(session), step, from) != Received::Accepted {
            return;
        }
        let Some(hop) = self.coordinator.hops.get_mut(&(session, step)) else { return };
        if hop.route.get(hop.next) != Some(&from) {
            return;
        }
        let rows = hop.positions.len();
        match (to, values) {
            (Some(to), _) => {
                assert_eq!(hop.route.get(hop.next + 1), Some(&to), "passed along the route");
                hop.next += 1;
                let early = hop.early.take_if(|(early, _)| *early == to);
                self.coordinator.pipeline.as_mut().unwrap().dispatched(now, SessionId(session), step, to, rows);
                if let Some((early, values)) = early {
                    self.answered(early, session, step, None, values);
                }
            }
            (None, Some(values)) => {
                hop.next += 1;
                if hop.next < hop.route.len() {
                    self.coordinator.relayed += 1;
                    return self.send_hop(session, step, values);
                }
                let sample = hop.sample;
                self.coordinator.hops.remove(&(session, step));
                let returned = self.coordinator.pipeline.as_mut().unwrap().returned(SessionId(session), step);
                if sample && returned == Ok(true) {
                    // The head: the last row's value is the token plus every block's one.
                    let token = values[values.len() - DIM] as u32 % 1000;
                    self.coordinator.tokens.push(token);
                    let pipeline = self.coordinator.pipeline.as_mut().unwrap();
                    if self.coordinator.tokens.len() < PROMPT.len() + TOKENS {
                        pipeline.push_token(SessionId(session), token).unwrap();
                    } else {
                        pipeline.finish(SessionId(session)).unwrap();
                    }
                }
            }
            (None, None) => unreachable!(),
        }
    }

    /// A contributor's connection is gone: its units go elsewhere, its span to its standby, and
    /// the session replays.
    fn lost(&mut self, id: ContributorId) {
        self.coordinator.members.remove(&id);
        self.coordinator.ready.remove(&id);
        self.coordinator.scheduler.leave(ms(self.now), id).unwrap();
        if let Some(plan) = self.coordinator.plan.clone() {
            let shape = ModelShape { blocks: BLOCKS, bytes_per_block: 1 << 20 };
            let candidates: Vec<Candidate> =
                self.coordinator.members.keys().map(|&contributor| Candidate { contributor, blocks_per_second: 100.0, memory_bytes: 5 << 20, recent_drops: 0 }).collect();
            let repair = placement::repair(&shape, &plan, &candidates, &PLACEMENT).unwrap();
            assert!(!repair.replanned, "the standby takes the span over: {repair:?}");
            let pipeline = self.coordinator.pipeline.as_mut().unwrap();
            pipeline.forget(id);
            pipeline.set_plan(repair.plan.clone());
            self.coordinator.plan = Some(repair.plan);
            self.coordinator.links.retain(|&(up, down)| up != id && down != id);
            self.link();
        }
        self.coordinator_tick();
    }
}

#[test]
fn cores_serve_units_and_spans_through_a_lost_link_and_a_reconnection() {
    let mut sim = Sim::new(4);
    sim.run_until(100.0);
    assert_eq!(sim.coordinator.members.len(), 4, "every core said hello and was welcomed");

    // Units by quorum: 6 units of 4 inputs, 2 replicas each.
    let inputs: Vec<Vec<u32>> = (0..24).map(|i| vec![101, 7 + i, 102]).collect();
    let job = JobSpec { inputs_per_unit: 4, ..JobSpec::embedding("bafkminilm", inputs) };
    sim.coordinator.scheduler.submit(ms(sim.now), job).unwrap();
    sim.coordinator_tick();
    // Spans: three holders, a standby, direct links between them.
    sim.place();
    let generated = |count: usize| move |sim: &Sim| sim.coordinator.tokens.len() >= PROMPT.len() + count;
    sim.run_until_or(10_000.0, generated(4));
    let plan = sim.coordinator.plan.clone().unwrap();
    let route: Vec<ContributorId> = plan.stages.iter().map(|s| s.contributor).collect();
    let (standby_stage, standby) = plan.stages.iter().enumerate().find_map(|(i, s)| s.standby.map(|s| (i, s))).unwrap();
    let passed: usize = sim.nodes.iter().map(|n| n.passed).sum();
    assert!(passed > 0, "steps went straight from stage to stage");
    let (standby_node, _) = sim.node_of(standby).unwrap();
    assert!(sim.nodes[standby_node].steps > 0, "the standby runs shadow copies of its span's steps");

    // The direct link between the first two holders fails: their hops go through the
    // coordinator, and the text goes on.
    let relayed = sim.coordinator.relayed;
    sim.cut_link(route[0], route[1]);
    sim.run_until_or(20_000.0, generated(10));
    assert!(sim.coordinator.relayed > relayed, "the coordinator relays the cut hop");

    // The holder with a standby drops its connection: the standby takes the span over (its
    // caches are current), the session replays, and the holder connects again as a new
    // contributor.
    let holder = route[standby_stage];
    let (holder_node, _) = sim.node_of(holder).unwrap();
    sim.disconnect(holder_node);
    assert_eq!(sim.coordinator.plan.as_ref().unwrap().stages[standby_stage].contributor, standby);
    sim.run_until_or(30_000.0, generated(14));
    sim.reconnect(holder_node);
    sim.run_until(60_000.0);
    assert_eq!(sim.coordinator.members.len(), 4, "the lost node is back, under a new id");
    assert!(sim.member(holder_node).is_some_and(|id| id != holder));
    assert!(sim.coordinator.job_done, "the job is done");
    assert_eq!((sim.coordinator.units_accepted, sim.coordinator.verdicts_rejected), (6, 0));

    // Every token is what the model gives: each one the last plus a block's worth per block.
    let expected: Vec<u32> = PROMPT.iter().copied().chain((1..=TOKENS as u32).map(|k| (PROMPT[2] + k * BLOCKS) % 1000)).collect();
    assert_eq!(sim.coordinator.tokens, expected);
    assert_eq!(sim.coordinator.errors, Vec::<String>::new(), "no contributor reported an error");
}
