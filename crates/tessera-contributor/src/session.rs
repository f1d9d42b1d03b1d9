//! One connection's protocol with the coordinator, without I/O: what arrives on the DataChannel
//! goes in (`handle`), with the time; what to send, which job to run, what the page or the log
//! should hear and when to wake next come out (`poll`, `poll_timeout`). The glue only moves
//! bytes and runs the jobs handed out, so everything here runs in `cargo test`.
//!
//! Every message from the coordinator is validated by `tessera_protocol::decode`; one that does
//! not decode, a bad frame, or a refusal of our protocol version ends the connection
//! (`Output::Restart`), never a panic. Units wait in a bounded queue and run one at a time, with
//! a rest after each so that the GPU is busy only the volunteer's share of the time.
//!
//! Spans of a language model are served too: `LoadSpan`, `Forward` (its hidden states arrive as
//! tensor frames first and are reassembled here, within bounds) and `EndSession`/`UnloadSpan`
//! become [`SpanJob`]s, which the glue runs in order ([`next_span_jobs`] batches forwards) and
//! reports with [`Session::span_loaded`] and [`Session::forwarded`]. A span step is part of
//! someone's conversation, so it runs at once, without the rest that units take; its GPU time
//! still counts against the next unit's rest.
//!
//! Steps also travel between contributors directly. The coordinator's `Link` names a peer: with
//! `offer`, this side offers a DataChannel to it (`Output::Offer`, the SDP out as a `Signal`, the
//! relayed answer in as `Output::Accept`) and sends it the outputs of `Forward`s whose `then`
//! starts with it (`Output::Pass`, then `Passed` to the coordinator); without, this side answers
//! an offer from that peer, and from no contributor it was not told of (`Output::Answer`), and
//! runs the `PeerMessage::Forward`s that arrive on it as the coordinator's. A link is numbered
//! here; it belongs to this connection, must open within `LINK_TIMEOUT_MS`, and at most
//! `MAX_LINKS` exist. An offer that fails to open is made again, twice, after a pause. Whatever
//! goes wrong with one (a bad frame, a failed send, a timeout) closes that link only, and its
//! steps go through the coordinator again (`Forwarded`). One offer to a peer is out at a time:
//! the peer's answer names no offer, so a second waits rather than be mistaken for the first.
//!
//! A span's standbys keep their KV caches current by running every step too: a stage that
//! passes its output on directly also sends a shadow copy (a `Forward` with `shadow`, passing
//! nothing on) to each standby of the next span over an open link this side offered it
//! (`Output::SendOn`, after the real pass, never instead of it). A shadow forward received runs
//! like any other, but nothing is answered: no output goes on, and a failure is only logged.
//!
//! Blobs (`blobs.rs`), where the [`Policy`] says so: a span's shard is fetched before its load
//! is handed out, from the peers its `LoadSpan` names and then the coordinator; `Prefetch`ed
//! shards are fetched ahead; and the shards a `Lend` names are lent to that borrower.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use serde::Serialize;
use tessera_protocol::{
    Capabilities, ChannelPurpose, Chunk, Chunker, ContributorId, ContributorMessage, CoordinatorMessage, Decoded, ErrorCode, Forward, Incoming, JobId,
    MAX_LINKS, NextHop, PROTOCOL_VERSION, Payload, PayloadKind, PayloadRef, PeerMessage, Reassembler, ReassemblyLimits, SignalPayload, Tensor, UnitId, Work,
    decode, encode_control,
};

mod blobs;

pub use blobs::{BlobJob, MAX_LENDS, StoreError};
use blobs::{Fetch, Lend};

/// Milliseconds on the glue's clock (a page's `Date.now()`, or a native monotonic clock).
pub type Millis = f64;

/// Units assigned but not started; the coordinator gives one at a time (`max_concurrent_units`),
/// so more than this is a coordinator at fault, and the extra units are dropped.
pub const MAX_QUEUED_UNITS: usize = 8;
/// Bounds on the heartbeat interval a `Welcome` may ask for.
const HEARTBEAT_MS: (u64, u64) = (100, 60_000);
/// The largest hidden-state tensor a `Forward` may carry (a full 8k context of a 576-wide
/// model is 19 MB).
pub const MAX_HIDDEN_BYTES: u64 = 32 << 20;
/// The largest blob (a model file or a shard) fetched in one piece: a bound on what a
/// coordinator or a lender can make this contributor buffer.
pub const MAX_BLOB_BYTES: u64 = 1 << 30;
/// Tensors received and waiting for their `Forward`, at most: the coordinator sends each one
/// just before its message, so more is a coordinator at fault.
const MAX_WAITING_TENSORS: usize = 8;
/// Span jobs handed to the glue and not reported yet, at most (loads and forwards).
const MAX_SPAN_JOBS: usize = 64;
/// How long a direct channel may take to open: from the `Link` (or the next try) on the
/// offering side, from the offer on the answering one. Then it is closed, and its hops go
/// through the coordinator.
pub const LINK_TIMEOUT_MS: Millis = 30_000.0;
/// Pauses before offering a downstream contributor a channel again, after one failed to open.
const OFFER_RETRIES_MS: [Millis; 2] = [2_000.0, 10_000.0];
/// How long passing a step's output over a direct channel may take; then the channel is closed
/// and the output goes through the coordinator.
const PASS_TIMEOUT_MS: Millis = 5_000.0;

/// What a contributor does besides the protocol every contributor speaks: the one place where a
/// tab and a native process differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Takes direct channels to other contributors (`Link`, and shards from and to peers).
    /// Natively, `--no-links` turns them off, so every hop goes through the coordinator.
    pub links: bool,
    /// Blobs a span needs come over the coordinator's channel (or from the peers a `LoadSpan`
    /// names) through this machine, which checks each against its CID (`BlobJob`); otherwise the
    /// glue fetches them itself (a tab, over HTTP with Cache Storage).
    pub fetches_blobs: bool,
    /// Fetches ahead the shards a `Prefetch` names (a tab spares its volunteer's bandwidth).
    pub fetches_ahead: bool,
    /// Lends verified shards to the borrowers a `Lend` names (a tab spares its upload).
    pub lends_blobs: bool,
}

impl Policy {
    /// A browser tab: direct channels for steps, and nothing else of its volunteer's network.
    pub const TAB: Policy = Policy { links: true, fetches_blobs: false, fetches_ahead: false, lends_blobs: false };
    /// A native process: everything.
    pub const NATIVE: Policy = Policy { links: true, fetches_blobs: true, fetches_ahead: true, lends_blobs: true };
}

/// What the page or the log hears (`onEvent`), as plain objects with a `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Event {
    Status {
        status: Status,
        detail: Option<String>,
    },
    /// The coordinator welcomed us under this id.
    Joined {
        contributor: ContributorId,
    },
    /// A blob a unit needed: `bytes` long, from Cache Storage (`cached`) or the network.
    Download {
        cid: String,
        bytes: u64,
        cached: bool,
    },
    /// A unit's result was sent: `inputs` sentences, `ms` of GPU time.
    Unit {
        unit: UnitId,
        job: JobId,
        inputs: usize,
        ms: f64,
    },
    /// The coordinator decided a unit we reported on.
    Verdict {
        unit: UnitId,
        accepted: bool,
    },
    /// A span of a language model is loaded here: blocks `start..end`.
    SpanLoaded {
        shard: String,
        start: u32,
        end: u32,
    },
    /// One step of a conversation went through a span here: `rows` positions in `ms`.
    Forwarded {
        rows: usize,
        ms: f64,
    },
    /// A span was dropped: the coordinator moved it, or its load failed.
    SpanDropped {
        shard: String,
    },
    /// Direct channels to other contributors open now.
    Links {
        open: usize,
    },
    /// A step's output went straight to contributor `to`, over a direct channel.
    Passed {
        to: ContributorId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Connecting,
    Idle,
    Working,
    Paused,
    Error,
}

/// A unit to compute now.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub job: JobId,
    pub unit: UnitId,
    /// The model's manifest CID.
    pub model: String,
    pub inputs: Vec<Vec<u32>>,
}

/// Span work for the glue, to run in the order it comes out: loads and forwards use the GPU and
/// are reported back; ends and unloads only free memory.
#[derive(Debug, Clone, PartialEq)]
pub enum SpanJob {
    /// Load `blocks` from shard `shard` (a blob, checked against its CID: with
    /// `Policy::fetches_blobs` it is in the cache already) and keep KV caches for up to
    /// `max_sessions` sessions; report with [`Session::span_loaded`].
    Load { shard: String, blocks: Range<usize>, max_sessions: usize },
    /// Run `hidden` (`[rows, dim]` row-major, positions `start..start + rows` of `session`)
    /// through span `shard`; report with [`Session::forwarded`].
    Forward { shard: String, session: u64, step: u64, start: usize, capacity: usize, rows: usize, hidden: Vec<f32> },
    /// Free `session`'s caches in every span.
    End { session: u64 },
    /// Drop span `shard` and its caches.
    Unload { shard: String },
}

/// The next span jobs to run together, taken from the front of `queue`: a forward and the
/// forwards right behind it through the same span, each for another session, with at most
/// `max_rows` rows in all (the engine's `EXACT_BATCH_ROWS`, so that each session's output is
/// what it would be alone); or one job of another kind. Anything else is a barrier and stays
/// queued.
pub fn next_span_jobs(queue: &mut VecDeque<SpanJob>, max_rows: usize) -> Vec<SpanJob> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    let SpanJob::Forward { shard, rows, .. } = &first else {
        return vec![first];
    };
    let (shard, mut total) = (shard.clone(), *rows);
    let mut jobs = vec![first];
    while let Some(SpanJob::Forward { shard: next, session, rows, .. }) = queue.front() {
        let fits = *next == shard && total.saturating_add(*rows) <= max_rows;
        let another_session = !jobs.iter().any(|j| matches!(j, SpanJob::Forward { session: s, .. } if s == session));
        if !(fits && another_session) {
            break;
        }
        total += rows;
        jobs.extend(queue.pop_front());
    }
    jobs
}

/// A message for a DataChannel: text is control JSON, binary is one frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
}

impl Outgoing {
    pub fn len(&self) -> usize {
        match self {
            Outgoing::Text(text) => text.len(),
            Outgoing::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this to the coordinator.
    Send(Outgoing),
    /// Start computing this unit; report with [`Session::finished`].
    Run(Assignment),
    /// Queue this span job behind the ones before it.
    Span(SpanJob),
    /// Check, keep or read a blob in the local cache (`Policy::fetches_blobs` or `lends_blobs`).
    Blob(BlobJob),
    /// A blob asked for with [`Session::fetch`] is in the cache, checked (or why not).
    Fetched {
        cid: String,
        result: Result<(), String>,
    },
    /// Make the connection of direct channel `link` to contributor `peer`, offering one ordered,
    /// reliable DataChannel; report its offer's SDP, once ICE gathering is complete, with
    /// [`Session::described`].
    Offer {
        link: u64,
        peer: ContributorId,
    },
    /// Make the connection of `link` answering `peer`'s offer `sdp`, and take the DataChannel
    /// it announces; report the answer's SDP, gathering complete, with [`Session::described`].
    Answer {
        link: u64,
        peer: ContributorId,
        sdp: String,
    },
    /// Apply `sdp`, the peer's answer to this side's offer, to the connection of `link`.
    Accept {
        link: u64,
        sdp: String,
    },
    /// Close the connection of `link`, if there is one, and forget it.
    Close {
        link: u64,
    },
    /// Send `messages` over `link`, in order (a step's output: its frames, then the
    /// `PeerMessage::Forward`), and report with [`Session::passed`].
    Pass {
        link: u64,
        session: u64,
        step: u64,
        messages: Vec<Outgoing>,
    },
    /// Send `messages` over `link`, in order, after whatever went before on it: a shadow copy of
    /// a step for a standby (its frames, then a `PeerMessage::Forward` with `shadow`), a blob
    /// request, or a lent blob. Nothing waits for it; report only a failure, with
    /// [`Session::link_closed`].
    SendOn {
        link: u64,
        messages: Vec<Outgoing>,
    },
    Event(Event),
    /// Something worth a line in the console or the log.
    Log(String),
    /// The connection cannot go on: close it and connect again. Nothing more comes out.
    Restart(String),
}

/// A unit being computed.
#[derive(Debug)]
struct Running {
    job: JobId,
    unit: UnitId,
    inputs: usize,
    cancelled: bool,
}

/// Tensors that arrive as frames, each kept until the `Forward` that names it: the coordinator's,
/// and each upstream contributor's on its own link, within the same bounds.
#[derive(Debug)]
struct Inbox {
    reassembler: Reassembler,
    /// Tensors received whose `Forward` has not arrived yet.
    tensors: VecDeque<Payload>,
}

impl Inbox {
    fn new() -> Inbox {
        let limits = ReassemblyLimits { max_message_bytes: MAX_HIDDEN_BYTES, max_partial_messages: 4, max_buffered_bytes: 2 * MAX_HIDDEN_BYTES };
        Inbox { reassembler: Reassembler::new(limits), tensors: VecDeque::new() }
    }

    /// One frame of a tensor; an error (what the sender sent) when it is bad, or completes a
    /// tensor while too many wait for their forwards already.
    fn push(&mut self, chunk: Chunk<'_>) -> Result<(), String> {
        match self.reassembler.push(chunk) {
            Ok(Some(payload)) if self.tensors.len() >= MAX_WAITING_TENSORS => {
                Err(format!("tensor {} with {MAX_WAITING_TENSORS} others waiting for their forward", payload.stream))
            }
            Ok(Some(payload)) => {
                self.tensors.push_back(payload);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(format!("a bad tensor frame: {e}")),
        }
    }

    /// The tensor a `Forward` names, taken from those received: F32 `[rows, dim]` with
    /// `payload.bytes` bytes.
    fn hidden_states(&mut self, payload: &PayloadRef) -> Result<(usize, Vec<f32>), String> {
        let at = self.tensors.iter().position(|t| t.stream == payload.stream).ok_or_else(|| format!("no tensor arrived on stream {}", payload.stream))?;
        let received = self.tensors.remove(at).ok_or("the tensor went missing")?;
        if received.bytes.len() as u64 != payload.bytes {
            return Err(format!("stream {} carried {} bytes, the forward says {}", payload.stream, received.bytes.len(), payload.bytes));
        }
        let tensor = Tensor::decode(&received.bytes, MAX_HIDDEN_BYTES as usize).map_err(|e| e.to_string())?;
        let rows = match tensor.dims() {
            &[rows, dim] if rows > 0 && dim > 0 => rows as usize,
            dims => return Err(format!("hidden states of dims {dims:?}, not [rows, dim]")),
        };
        let values = tensor.f32_values().ok_or_else(|| format!("hidden states of {:?}, not F32", tensor.dtype()))?.collect();
        Ok((rows, values))
    }
}

/// What a direct channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Steps of spans: the upstream side sends `Forward`s (and their tensors).
    Forwards,
    /// A blob this side fetches from a lender (this side offered).
    Borrow,
    /// Blobs this side lends to a borrower (the borrower offered).
    Lend,
}

/// A direct channel with another contributor.
#[derive(Debug)]
struct Link {
    /// This session's number for it, in outputs and reports; a new connection gets a new one.
    number: u64,
    peer: ContributorId,
    purpose: Purpose,
    /// This side offered: for forwards, it is upstream, and outputs go to `peer` over it.
    /// Otherwise `peer` is upstream and sends forwards on it.
    offered: bool,
    state: LinkState,
    /// When it must be open by (or, queued, when its offer may be made; lent, when it ends);
    /// none while nothing is waited for.
    deadline: Option<Millis>,
    /// The tensors `peer` sends (on a link for forwards this side answered), or the blob a
    /// lender sends (on a borrowing link).
    inbox: Inbox,
    /// Offers made again after one failed to open.
    retries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Told of an upstream peer; its offer has not come yet, and no connection exists.
    Expecting,
    /// This side will offer once no other offer of its to the peer is out and the pause after a
    /// failed one (the deadline) is over.
    Queued,
    /// The glue is making this side's offer or answer.
    Describing,
    /// This side's offer went out; the answer has not come back yet.
    Offered,
    /// The descriptions are exchanged; the channel has not opened yet.
    Connecting,
    /// Open, for messages of up to `max_message` bytes.
    Open { max_message: usize },
}

/// Where the output of a forward handed out goes after this stage, with what the next stage
/// needs of its `Forward`.
#[derive(Debug)]
struct Route {
    session: u64,
    step: u64,
    start: u32,
    capacity: u32,
    then: Vec<NextHop>,
    /// The upstream contributor that sent the step over a direct channel (`None`: the
    /// coordinator).
    from: Option<ContributorId>,
    /// A standby's copy of the step: it only keeps the caches current, and nothing is answered.
    shadow: bool,
}

/// A step's output handed to the glue to pass on over `link`, kept until it says it went (or
/// not, or not in time, and then it goes to the coordinator).
#[derive(Debug)]
struct Passing {
    link: u64,
    to: ContributorId,
    session: u64,
    step: u64,
    /// The encoded output tensor.
    tensor: Vec<u8>,
    /// The step's GPU time here.
    ms: f64,
    deadline: Millis,
}

/// One connection, from the open DataChannel on.
#[derive(Debug)]
pub struct Session {
    policy: Policy,
    /// The largest message the channel takes (`sctp.maxMessageSize`).
    max_message: usize,
    budget: f64,
    contributor: Option<ContributorId>,
    /// The latest time handed in, for the reports that come without one.
    clock: Millis,
    heartbeat_ms: u64,
    next_heartbeat: Option<Millis>,
    queue: VecDeque<Assignment>,
    running: Option<Running>,
    /// When the last unit finished and how long it kept the GPU busy.
    last_unit: Option<(Millis, f64)>,
    next_stream: u64,
    /// The tensors the coordinator sends with `Forward`s.
    inbox: Inbox,
    /// Span loads (fetching or handed out) and forwards handed out, not reported yet.
    span_jobs: usize,
    /// Direct channels with other contributors, at most `MAX_LINKS` for forwards.
    links: Vec<Link>,
    next_link: u64,
    /// `Link`s ignored because this contributor takes no direct channels (said once).
    links_refused: bool,
    /// The forwards handed out, in order, with where their outputs go.
    routes: VecDeque<Route>,
    /// Outputs handed to the glue to pass on, not reported yet.
    passing: VecDeque<Passing>,
    /// Blobs being fetched (`blobs.rs`).
    fetches: Vec<Fetch>,
    /// The blob frames the coordinator sends for fetches.
    blob_frames: Reassembler,
    /// Shards loaded from a peer, by shard, until their `SpanReady` says so.
    fetched_from: HashMap<String, ContributorId>,
    /// Borrowers that may fetch shards from here (`blobs.rs`).
    lends: HashMap<ContributorId, Lend>,
    outputs: VecDeque<Output>,
    ended: bool,
    /// The coordinator refused this contributor for good (another protocol version).
    refused: bool,
}

impl Session {
    /// A session on a channel that just opened: its first output is the `Hello`. What the
    /// capabilities say of lending follows `policy`.
    pub fn new(mut capabilities: Capabilities, policy: Policy, budget: f64, max_message: usize) -> Session {
        capabilities.lends_blobs = policy.lends_blobs && policy.links;
        let blob_limits = ReassemblyLimits { max_message_bytes: MAX_BLOB_BYTES, max_partial_messages: 4, max_buffered_bytes: MAX_BLOB_BYTES };
        let mut session = Session {
            policy,
            max_message,
            budget: clamp_budget(budget),
            contributor: None,
            clock: 0.0,
            heartbeat_ms: 0,
            next_heartbeat: None,
            queue: VecDeque::new(),
            running: None,
            last_unit: None,
            next_stream: 1,
            inbox: Inbox::new(),
            span_jobs: 0,
            links: Vec::new(),
            next_link: 1,
            links_refused: false,
            routes: VecDeque::new(),
            passing: VecDeque::new(),
            fetches: Vec::new(),
            blob_frames: Reassembler::new(blob_limits),
            fetched_from: HashMap::new(),
            lends: HashMap::new(),
            outputs: VecDeque::new(),
            ended: false,
            refused: false,
        };
        session.send(&ContributorMessage::Hello { protocol_version: PROTOCOL_VERSION, capabilities });
        session
    }

    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.ended {
            return None;
        }
        let next_unit = (self.contributor.is_some() && self.running.is_none() && !self.queue.is_empty()).then(|| self.rest_until());
        let links = self.links.iter().filter_map(|l| l.deadline);
        let passing = self.passing.iter().map(|p| p.deadline);
        let fetches = self.fetches.iter().filter_map(Fetch::deadline);
        [self.next_heartbeat, next_unit].into_iter().flatten().chain(links).chain(passing).chain(fetches).min_by(f64::total_cmp)
    }

    /// The compute budget: the share of time the GPU may be busy, in (0, 1].
    pub fn set_budget(&mut self, now: Millis, budget: f64) {
        self.tick(now);
        self.budget = clamp_budget(budget);
        self.start_next(now);
    }

    /// Ends the session politely: the coordinator reissues whatever we hold.
    pub fn leave(&mut self) {
        if !self.ended {
            self.send(&ContributorMessage::Leave);
            self.ended = true;
        }
    }

    /// Whether the session ended because the coordinator refused this contributor for good
    /// (another protocol version): connecting again would not help.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// One message off the coordinator's DataChannel.
    pub fn handle(&mut self, now: Millis, incoming: Incoming<'_>) {
        self.tick(now);
        if self.ended {
            return;
        }
        match decode::<CoordinatorMessage>(incoming) {
            Ok(Decoded::Control(message)) => self.control(now, message),
            Ok(Decoded::Chunk(chunk)) if chunk.header.kind == PayloadKind::Tensor => {
                if let Err(e) = self.inbox.push(chunk) {
                    self.restart(format!("the coordinator sent {e}"));
                }
            }
            Ok(Decoded::Chunk(chunk)) if chunk.header.kind == PayloadKind::Blob && self.downloading(chunk.header.stream) => self.blob_frame(chunk),
            Ok(Decoded::Chunk(chunk)) => {
                let h = chunk.header;
                self.log(format!("ignoring an unrequested {:?} frame (stream {}, chunk {} of {})", h.kind, h.stream, h.index, h.count));
            }
            Err(e) => self.restart(format!("the coordinator sent a message that does not decode: {e}")),
        }
    }

    /// Sends the heartbeats that are due, makes the offers whose pause is over, closes the links
    /// that did not open in time, gives up on passes and borrows that take too long, and starts
    /// a unit whose rest is over.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.tick(now);
        if self.ended {
            return;
        }
        if let Some(due) = self.next_heartbeat
            && now >= due
        {
            self.send(&ContributorMessage::Heartbeat);
            // One beat however late we are; the next one an interval from now.
            self.next_heartbeat = Some(now + self.heartbeat_ms as f64);
        }
        let late: Vec<(u64, LinkState, Purpose)> =
            self.links.iter().filter(|l| l.deadline.is_some_and(|d| now >= d)).map(|l| (l.number, l.state, l.purpose)).collect();
        for (number, state, purpose) in late {
            match (state, purpose) {
                (LinkState::Queued, _) => {
                    if let Some(link) = self.links.iter_mut().find(|l| l.number == number) {
                        link.deadline = None;
                    }
                }
                (_, Purpose::Lend) => self.close_link(number, format!("lent for {} s, the most a borrower gets", blobs::LEND_TIME_MS / 1000.0)),
                _ => {
                    let timeout = if purpose == Purpose::Borrow { blobs::BORROW_ANSWER_MS } else { LINK_TIMEOUT_MS };
                    self.close_link(number, format!("did not open within {} s", timeout / 1000.0));
                }
            }
        }
        self.start_offers();
        let slow: Vec<(u64, u64, u64)> = self.passing.iter().filter(|p| now >= p.deadline).map(|p| (p.link, p.session, p.step)).collect();
        for (link, session, step) in slow {
            self.passed(now, link, session, step, Err(format!("it took more than {} s", PASS_TIMEOUT_MS / 1000.0)));
        }
        self.check_borrows(now);
        self.start_next(now);
    }

    /// The unit from the last `Output::Run` is done: its L2-normalised rows, or why it failed;
    /// `busy_ms` is how long it kept the GPU busy.
    pub fn finished(&mut self, now: Millis, unit: UnitId, busy_ms: f64, result: Result<Vec<Vec<f32>>, String>) {
        self.tick(now);
        let Some(running) = self.running.take_if(|r| r.unit == unit) else {
            return;
        };
        self.last_unit = Some((now, busy_ms.max(0.0)));
        if self.ended {
            return;
        }
        if running.cancelled {
            self.log(format!("unit {unit}: cancelled while it ran; its result is dropped"));
        } else {
            match result.and_then(|rows| self.result_messages(&running, rows)) {
                Ok(messages) => {
                    self.outputs.extend(messages.into_iter().map(Output::Send));
                    let Running { job, unit, inputs, .. } = running;
                    self.event(Event::Unit { unit, job, inputs, ms: busy_ms });
                }
                Err(reason) => {
                    self.log(format!("unit {unit} failed: {reason}"));
                    self.send(&ContributorMessage::Error { code: ErrorCode::Internal, message: format!("unit {unit}: {reason}") });
                }
            }
        }
        if self.ended {
            return;
        }
        self.status(Status::Idle);
        self.start_next(now);
    }

    /// The `SpanJob::Load` of `shard` is done: loaded, or why not.
    pub fn span_loaded(&mut self, now: Millis, shard: String, blocks: Range<usize>, result: Result<(), String>) {
        self.tick(now);
        self.span_jobs = self.span_jobs.saturating_sub(1);
        let fetched_from = self.fetched_from.remove(&shard);
        if self.ended {
            return;
        }
        match result {
            Ok(()) => {
                self.event(Event::SpanLoaded { shard: shard.clone(), start: blocks.start as u32, end: blocks.end as u32 });
                self.send(&ContributorMessage::SpanReady { shard, fetched_from });
            }
            Err(reason) => self.span_failed(&shard, &blocks, &reason),
        }
    }

    /// The `SpanJob::Forward` of `session`'s `step` is done: its output rows of width `dim`
    /// (row-major), or why it failed; `busy_ms` is how long it kept the GPU busy. The output
    /// goes to the next stage directly when its `then` names one linked and open here, and to
    /// the coordinator otherwise; a shadow step's goes nowhere, and its failure is only logged.
    pub fn forwarded(&mut self, now: Millis, session: u64, step: u64, busy_ms: f64, result: Result<(Vec<f32>, usize), String>) {
        self.tick(now);
        self.span_jobs = self.span_jobs.saturating_sub(1);
        self.add_busy(now, busy_ms);
        // Steps are reported in the order they were handed out, so the first route that matches
        // is this one's (a shadow step and a real one may share a session and step).
        let route = self.routes.iter().position(|r| (r.session, r.step) == (session, step)).and_then(|at| self.routes.remove(at));
        let from = route.as_ref().and_then(|r| r.from);
        if self.ended {
            return;
        }
        let rows = result.and_then(|(values, dim)| {
            if dim == 0 || values.is_empty() || !values.len().is_multiple_of(dim) {
                return Err(format!("the span gave {} values, not rows of {dim}", values.len()));
            }
            Ok((values.len() / dim, dim, values))
        });
        if route.as_ref().is_some_and(|r| r.shadow) {
            return match rows {
                Ok((rows, ..)) => self.event(Event::Forwarded { rows, ms: busy_ms }),
                Err(reason) => self.log(format!("session {session} step {step} (a shadow copy) failed: {reason}")),
            };
        }
        let output = rows.and_then(|(rows, dim, values)| {
            let tensor = Tensor::from_f32(vec![rows as u64, dim as u64], &values).map_err(|e| e.to_string())?;
            Ok((rows, tensor.encode()))
        });
        let answered = output.and_then(|(rows, tensor)| match self.pass(now, route, tensor, busy_ms) {
            Ok(()) => Ok(rows),
            Err(tensor) => self.answer_forwarded(session, step, &tensor, busy_ms).map(|()| rows),
        });
        match answered {
            Ok(rows) => self.event(Event::Forwarded { rows, ms: busy_ms }),
            Err(reason) => self.step_failed(session, step, &reason, from),
        }
    }

    /// The glue sent (or failed to send) what `Output::Pass` gave it for `session`'s `step`:
    /// the coordinator hears `Passed`, or, when it failed, the link closes and the output goes
    /// to the coordinator after all.
    pub fn passed(&mut self, now: Millis, link: u64, session: u64, step: u64, result: Result<(), String>) {
        self.tick(now);
        let Some(passing) = self.passing.iter().position(|p| (p.link, p.session, p.step) == (link, session, step)).and_then(|at| self.passing.remove(at))
        else {
            return;
        };
        if self.ended {
            return;
        }
        match result {
            Ok(()) => {
                self.send(&ContributorMessage::Passed { session, step, to: passing.to, ms: passing.ms });
                self.event(Event::Passed { to: passing.to });
            }
            Err(reason) => {
                self.close_link(link, format!("passing session {session} step {step} on failed: {reason}"));
                if let Err(reason) = self.answer_forwarded(session, step, &passing.tensor, passing.ms) {
                    self.step_failed(session, step, &reason, None);
                }
            }
        }
    }

    /// The connection of `link` is made: this side's offer or answer, gathering complete, or
    /// why there is none. The SDP goes to the peer as a `Signal` through the coordinator.
    pub fn described(&mut self, now: Millis, link: u64, result: Result<String, String>) {
        self.tick(now);
        if self.ended {
            return;
        }
        let (Some(own), Some(at)) = (self.contributor, self.links.iter().position(|l| l.number == link && l.state == LinkState::Describing)) else {
            // Closed while its connection was being made: that connection goes too.
            self.outputs.push_back(Output::Close { link });
            return;
        };
        let sdp = match result {
            Ok(sdp) => sdp,
            Err(reason) => return self.close_link(link, format!("could not be set up: {reason}")),
        };
        let entry = &mut self.links[at];
        let (peer, payload) = if entry.offered {
            entry.state = LinkState::Offered;
            let purpose = if entry.purpose == Purpose::Borrow { ChannelPurpose::Blobs } else { ChannelPurpose::Forwards };
            (entry.peer, SignalPayload::Offer { sdp, purpose })
        } else {
            entry.state = LinkState::Connecting;
            (entry.peer, SignalPayload::Answer { sdp })
        };
        self.send(&ContributorMessage::Signal { from: own, to: peer, payload });
    }

    /// The DataChannel of `link` opened; it takes messages of up to `max_message` bytes.
    pub fn link_open(&mut self, now: Millis, link: u64, max_message: usize) {
        self.tick(now);
        if self.ended {
            return;
        }
        let Some(entry) = self.links.iter_mut().find(|l| l.number == link && !matches!(l.state, LinkState::Expecting | LinkState::Queued)) else {
            self.outputs.push_back(Output::Close { link });
            return;
        };
        if matches!(entry.state, LinkState::Open { .. }) {
            return;
        }
        entry.state = LinkState::Open { max_message };
        let purpose = entry.purpose;
        // A lent channel keeps its end; the others waited only for the opening.
        if purpose != Purpose::Lend {
            entry.deadline = None;
        }
        let line = format!("direct channel {} open", link_name(entry));
        self.log(line);
        match purpose {
            Purpose::Forwards => self.event(Event::Links { open: self.open_links() }),
            Purpose::Borrow => self.borrow_open(now, link),
            Purpose::Lend => {}
        }
    }

    /// The connection or the DataChannel of `link` closed or failed, and why.
    pub fn link_closed(&mut self, now: Millis, link: u64, reason: String) {
        self.tick(now);
        if self.ended {
            return;
        }
        if self.links.iter().any(|l| l.number == link) {
            self.close_link(link, reason);
        } else {
            self.outputs.push_back(Output::Close { link });
        }
    }

    /// One message off the DataChannel of `link`. On a link for forwards, a frame of a tensor,
    /// or a `PeerMessage::Forward`, from an upstream peer; on a borrowing link, the blob; on a
    /// lent link, the borrower's requests. Anything else, or anything bad, closes that link
    /// (and only that link).
    pub fn link_message(&mut self, now: Millis, link: u64, incoming: Incoming<'_>) {
        self.tick(now);
        if self.ended {
            return;
        }
        let Some(at) = self.links.iter().position(|l| l.number == link) else {
            self.outputs.push_back(Output::Close { link });
            return;
        };
        match self.links[at].purpose {
            Purpose::Forwards => self.forwards_message(at, incoming),
            Purpose::Borrow => self.borrow_message(now, at, incoming),
            Purpose::Lend => self.lend_message(at, incoming),
        }
    }

    fn forwards_message(&mut self, at: usize, incoming: Incoming<'_>) {
        if self.links[at].offered {
            return self.bad_peer(at, "sent a message on the channel this side offered (only the upstream side sends)".into());
        }
        match decode::<PeerMessage>(incoming) {
            Ok(Decoded::Control(PeerMessage::BlobRequest { .. } | PeerMessage::Error { .. })) => {
                self.bad_peer(at, "sent a blob message on a channel for forwards".into());
            }
            Ok(Decoded::Control(PeerMessage::Forward(forward))) => {
                match self.links[at].inbox.hidden_states(&forward.payload) {
                    Ok((rows, hidden)) => self.forward_job(forward, rows, hidden, Some(self.links[at].peer)),
                    // A shadow copy is answered to no one: the link closes, and only that is said.
                    Err(reason) if forward.shadow => {
                        let why = format!("sent session {} step {} (a shadow copy): {reason}", forward.session, forward.step);
                        self.drop_link(at, why);
                    }
                    Err(reason) => self.bad_peer(at, format!("sent session {} step {}: {reason}", forward.session, forward.step)),
                }
            }
            Ok(Decoded::Chunk(chunk)) if chunk.header.kind == PayloadKind::Tensor => {
                if let Err(e) = self.links[at].inbox.push(chunk) {
                    self.bad_peer(at, format!("sent {e}"));
                }
            }
            Ok(Decoded::Chunk(chunk)) => self.bad_peer(at, format!("sent a {:?} frame (stream {})", chunk.header.kind, chunk.header.stream)),
            Err(e) => self.bad_peer(at, format!("sent a message that does not decode: {e}")),
        }
    }

    /// Sends a step's output to the coordinator: its frames, then `Forwarded`.
    fn answer_forwarded(&mut self, session: u64, step: u64, tensor: &[u8], ms: f64) -> Result<(), String> {
        let (payload, frames) = self.frames(PayloadKind::Tensor, tensor, self.max_message)?;
        self.outputs.extend(frames.into_iter().map(Output::Send));
        self.send(&ContributorMessage::Forwarded { session, step, payload, ms });
        Ok(())
    }

    /// A step could not run or its output not be sent. One from a peer (bad states, or a span
    /// moved off this contributor since) is the peer's problem, not this span's: said, never
    /// `SpanFailed`, so that no peer can get a span taken from its holder.
    fn step_failed(&mut self, session: u64, step: u64, reason: &str, from: Option<ContributorId>) {
        self.log(format!("session {session} step {step} failed: {reason}"));
        let (code, message) = match from {
            Some(peer) => (ErrorCode::Malformed, format!("session {session} step {step} from contributor {peer}: {reason}")),
            None => (ErrorCode::SpanFailed, format!("session {session} step {step}: {reason}")),
        };
        self.send(&ContributorMessage::Error { code, message });
    }

    /// Hands a step's output (`tensor`, encoded) to the glue for the next stage of `route`, over
    /// the link this side offered it, when that link is open and the frames fit it, and then a
    /// shadow copy for each of that stage's standbys linked so and open; gives the output back
    /// when it cannot pass it on (and then no standby gets a copy from here).
    fn pass(&mut self, now: Millis, route: Option<Route>, tensor: Vec<u8>, ms: f64) -> Result<(), Vec<u8>> {
        let Some((route, (next, rest))) = route.as_ref().and_then(|r| Some((r, r.then.split_first()?))) else {
            return Err(tensor);
        };
        let Some((number, max_message)) = self.open_forwards_link(next.contributor) else {
            return Err(tensor);
        };
        let (payload, mut messages) = match self.frames(PayloadKind::Tensor, &tensor, max_message) {
            Ok(framed) => framed,
            Err(reason) => {
                self.log(format!("session {} step {}: not passed on directly: {reason}", route.session, route.step));
                return Err(tensor);
            }
        };
        let &Route { session, step, start, capacity, .. } = route;
        let forward = Forward { shard: next.shard.clone(), session, step, start, capacity, payload, then: rest.to_vec(), shadow: false };
        messages.push(Outgoing::Text(encode_control(&PeerMessage::Forward(forward))));
        self.outputs.push_back(Output::Pass { link: number, session, step, messages });
        for standby in &next.standbys {
            let Some((link, max_message)) = self.open_forwards_link(standby.contributor) else {
                continue;
            };
            match self.frames(PayloadKind::Tensor, &tensor, max_message) {
                Ok((payload, mut messages)) => {
                    let forward = Forward { shard: standby.shard.clone(), session, step, start, capacity, payload, then: Vec::new(), shadow: true };
                    messages.push(Outgoing::Text(encode_control(&PeerMessage::Forward(forward))));
                    self.outputs.push_back(Output::SendOn { link, messages });
                }
                Err(reason) => self.log(format!("session {session} step {step}: no shadow copy for contributor {}: {reason}", standby.contributor)),
            }
        }
        self.passing.push_back(Passing { link: number, to: next.contributor, session, step, tensor, ms, deadline: now + PASS_TIMEOUT_MS });
        Ok(())
    }

    /// The link this side offered `peer` for forwards, when it is open, and its message size.
    fn open_forwards_link(&self, peer: ContributorId) -> Option<(u64, usize)> {
        self.links.iter().find(|l| l.offered && l.purpose == Purpose::Forwards && l.peer == peer).and_then(|l| match l.state {
            LinkState::Open { max_message } => Some((l.number, max_message)),
            _ => None,
        })
    }

    /// A forward, from the coordinator or an upstream peer, as a span job; its route is kept
    /// for where the output goes (a shadow step's: nowhere).
    fn forward_job(&mut self, forward: Forward, rows: usize, hidden: Vec<f32>, from: Option<ContributorId>) {
        let Forward { shard, session, step, start, capacity, then, shadow, .. } = forward;
        let job = SpanJob::Forward { shard, session, step, start: start as usize, capacity: capacity as usize, rows, hidden };
        let full = self.span_jobs >= MAX_SPAN_JOBS;
        if shadow && full {
            return self.log(format!("session {session} step {step} (a shadow copy) dropped: {MAX_SPAN_JOBS} span jobs are queued here already"));
        }
        // A peer's step the queue has no room for is the peer's problem: said, not `SpanFailed`.
        if from.is_some() && full {
            return self.step_failed(session, step, &format!("{MAX_SPAN_JOBS} span jobs are queued here already"), from);
        }
        if self.span_job(job) {
            let then = if shadow { Vec::new() } else { then };
            self.routes.push_back(Route { session, step, start, capacity, then, from, shadow });
        }
    }

    /// `Link`: expect an offer from upstream `peer`, or make one to downstream `peer`.
    fn link(&mut self, peer: ContributorId, offer: bool) {
        if !self.policy.links {
            if !std::mem::replace(&mut self.links_refused, true) {
                self.log("ignoring direct channels (--no-links): every hop goes through the coordinator".into());
            }
            return;
        }
        if self.contributor.is_none_or(|own| own == peer) {
            return self.log(format!("a link to contributor {peer} ignored: this is contributor {:?}", self.contributor));
        }
        let forwards = |l: &Link| l.purpose == Purpose::Forwards;
        if let Some(link) = self.links.iter_mut().find(|l| forwards(l) && l.peer == peer && l.offered == offer) {
            // Asked again while waiting to offer again: the pause is over.
            if link.state == LinkState::Queued {
                link.deadline = None;
                self.start_offers();
            }
            return;
        }
        if self.links.iter().filter(|l| forwards(l)).count() >= MAX_LINKS {
            return self.log(format!("no direct channel with contributor {peer}: {MAX_LINKS} are open or opening already"));
        }
        let state = if offer { LinkState::Queued } else { LinkState::Expecting };
        self.new_link(peer, Purpose::Forwards, offer, state, None);
        self.start_offers();
    }

    /// A new link's number, the link added with an empty inbox.
    fn new_link(&mut self, peer: ContributorId, purpose: Purpose, offered: bool, state: LinkState, deadline: Option<Millis>) -> u64 {
        let number = self.next_link;
        self.next_link += 1;
        let inbox = if purpose == Purpose::Borrow { blobs::blob_inbox() } else { Inbox::new() };
        self.links.push(Link { number, peer, purpose, offered, state, deadline, inbox, retries: 0 });
        number
    }

    /// Makes the offers that may go out: each queued link's whose pause is over, when no other
    /// offer of ours to the same peer waits for its answer.
    fn start_offers(&mut self) {
        let now = self.clock;
        for at in 0..self.links.len() {
            let link = &self.links[at];
            if link.state != LinkState::Queued || link.deadline.is_some_and(|d| now < d) {
                continue;
            }
            let peer = link.peer;
            let busy = self.links.iter().any(|l| l.peer == peer && l.offered && matches!(l.state, LinkState::Describing | LinkState::Offered));
            if busy {
                self.links[at].deadline = None;
                continue;
            }
            let link = &mut self.links[at];
            let timeout = if link.purpose == Purpose::Borrow { blobs::BORROW_ANSWER_MS } else { LINK_TIMEOUT_MS };
            (link.state, link.deadline) = (LinkState::Describing, Some(now + timeout));
            self.outputs.push_back(Output::Offer { link: link.number, peer });
        }
    }

    /// A signal relayed from `from`: an offer from a peer linked here as upstream (or from a
    /// borrower), or the answer to this side's offer. Any other is ignored; candidates are all
    /// in the SDPs.
    fn signal(&mut self, now: Millis, from: ContributorId, to: ContributorId, payload: SignalPayload) {
        if self.contributor != Some(to) {
            return self.log(format!("a signal from contributor {from} for contributor {to} ignored"));
        }
        if !self.policy.links {
            return self.log(format!("ignoring a signal from contributor {from}: this contributor takes no direct channels"));
        }
        match payload {
            SignalPayload::Offer { sdp, purpose: ChannelPurpose::Blobs } => self.borrower_offered(now, from, sdp),
            SignalPayload::Offer { sdp, purpose: ChannelPurpose::Forwards } => {
                let Some(at) = self.links.iter().position(|l| l.peer == from && l.purpose == Purpose::Forwards && !l.offered) else {
                    return self.log(format!("an offer from contributor {from}, which is not linked here as upstream, ignored"));
                };
                // A new offer replaces the connection of an earlier one, under a new number.
                if self.links[at].state != LinkState::Expecting {
                    self.disconnect(at, format!("contributor {from} offered again"));
                    self.links[at].number = self.next_link;
                    self.next_link += 1;
                }
                let entry = &mut self.links[at];
                (entry.state, entry.deadline) = (LinkState::Describing, Some(now + LINK_TIMEOUT_MS));
                let link = entry.number;
                self.outputs.push_back(Output::Answer { link, peer: from, sdp });
            }
            SignalPayload::Answer { sdp } => {
                let Some(entry) = self.links.iter_mut().find(|l| l.peer == from && l.offered && l.state == LinkState::Offered) else {
                    return self.log(format!("an answer from contributor {from}, which was not offered a channel here, ignored"));
                };
                entry.state = LinkState::Connecting;
                let link = entry.number;
                self.outputs.push_back(Output::Accept { link, sdp });
                self.start_offers();
            }
            SignalPayload::Candidate { .. } => {}
        }
    }

    /// Something bad from the peer of the link at `at`: that link closes, and, on a link for
    /// forwards, the coordinator hears of it (the step it carried is lost; the coordinator's
    /// deadline covers it).
    fn bad_peer(&mut self, at: usize, what: String) {
        let message = format!("contributor {} {what}; the direct channel is closed", self.links[at].peer);
        let purpose = self.links[at].purpose;
        self.drop_link(at, what);
        if purpose == Purpose::Forwards {
            self.send(&ContributorMessage::Error { code: ErrorCode::Malformed, message });
        }
    }

    /// Closes link `number`, if it exists. An offer for forwards that never opened is made
    /// again after a pause, twice; any other link this side offered is forgotten; one for
    /// forwards it answers goes back to expecting an offer, as the coordinator still counts it,
    /// so the upstream peer may offer again.
    fn close_link(&mut self, number: u64, why: String) {
        let Some(at) = self.links.iter().position(|l| l.number == number) else {
            return;
        };
        let link = &self.links[at];
        let retry = link.offered && link.purpose == Purpose::Forwards && !matches!(link.state, LinkState::Open { .. }) && link.retries < OFFER_RETRIES_MS.len();
        match (link.offered, link.purpose) {
            _ if retry => {
                let pause = OFFER_RETRIES_MS[link.retries];
                self.disconnect(at, format!("{why}; offering again in {} s", pause / 1000.0));
                let next = self.next_link;
                self.next_link += 1;
                let link = &mut self.links[at];
                (link.number, link.state, link.deadline) = (next, LinkState::Queued, Some(self.clock + pause));
                link.retries += 1;
                self.start_offers();
            }
            (false, Purpose::Forwards) => self.disconnect(at, why),
            _ => self.drop_link(at, why),
        }
    }

    /// Closes the link at `at` and forgets it; what it served (a borrow, a lend) hears of it.
    fn drop_link(&mut self, at: usize, why: String) {
        self.disconnect(at, why.clone());
        let link = self.links.remove(at);
        match link.purpose {
            Purpose::Forwards => {}
            Purpose::Borrow => self.borrow_ended(link.number, &why),
            Purpose::Lend => self.lend_ended(link.peer, link.number),
        }
        self.start_offers();
    }

    /// Closes the connection of the link at `at`, if it has one; the link stays, expecting an
    /// offer.
    fn disconnect(&mut self, at: usize, why: String) {
        let link = &mut self.links[at];
        let (number, name, purpose) = (link.number, link_name(link), link.purpose);
        let was = std::mem::replace(&mut link.state, LinkState::Expecting);
        link.deadline = None;
        link.inbox = if purpose == Purpose::Borrow { blobs::blob_inbox() } else { Inbox::new() };
        self.log(format!("direct channel {name} closed: {why}"));
        if !matches!(was, LinkState::Expecting | LinkState::Queued) {
            self.outputs.push_back(Output::Close { link: number });
        }
        if matches!(was, LinkState::Open { .. }) && purpose == Purpose::Forwards {
            self.event(Event::Links { open: self.open_links() });
        }
    }

    /// Direct channels for forwards open now.
    pub fn open_links(&self) -> usize {
        self.links.iter().filter(|l| l.purpose == Purpose::Forwards && matches!(l.state, LinkState::Open { .. })).count()
    }

    fn control(&mut self, now: Millis, message: CoordinatorMessage) {
        match message {
            CoordinatorMessage::Welcome { contributor, heartbeat_interval_ms, .. } => {
                self.heartbeat_ms = heartbeat_interval_ms.clamp(HEARTBEAT_MS.0, HEARTBEAT_MS.1);
                self.next_heartbeat = Some(now + self.heartbeat_ms as f64);
                if self.contributor.replace(contributor).is_none() {
                    self.event(Event::Joined { contributor });
                    self.status(if self.running.is_some() { Status::Working } else { Status::Idle });
                }
                self.start_next(now);
            }
            CoordinatorMessage::Assign { job, unit, work: Work::Embedding { model, inputs }, .. } => {
                let known = self.running.as_ref().is_some_and(|r| r.unit == unit) || self.queue.iter().any(|a| a.unit == unit);
                if known {
                    self.log(format!("unit {unit} was assigned twice; the second is ignored"));
                } else if self.queue.len() >= MAX_QUEUED_UNITS {
                    self.log(format!("unit {unit} dropped: {MAX_QUEUED_UNITS} units are queued already"));
                } else {
                    self.queue.push_back(Assignment { job, unit, model, inputs });
                    self.start_next(now);
                }
            }
            CoordinatorMessage::Cancel { unit } => {
                self.queue.retain(|a| a.unit != unit);
                if let Some(running) = self.running.as_mut().filter(|r| r.unit == unit) {
                    running.cancelled = true;
                }
            }
            CoordinatorMessage::Verdict { unit, accepted } => self.event(Event::Verdict { unit, accepted }),
            CoordinatorMessage::Error { code: ErrorCode::UnsupportedVersion, message } => {
                self.refused = true;
                self.restart(format!("the coordinator refused this contributor: {message}"));
            }
            CoordinatorMessage::Error { code, message } => {
                self.log(format!("the coordinator says {code:?}: {message}"));
                // The error names no stream: every download in flight fails.
                if code == ErrorCode::BlobNotFound {
                    self.downloads_failed(&format!("the coordinator has no such blob: {message}"));
                }
            }
            // This contributor serves the coordinator no blobs (peers borrow over their own channels).
            CoordinatorMessage::BlobRequest { cid, stream, .. } => {
                let message = format!("{cid} (stream {stream}): this contributor does not serve blobs");
                self.send(&ContributorMessage::Error { code: ErrorCode::BlobNotFound, message });
            }
            CoordinatorMessage::BlobHave { .. } => {}
            CoordinatorMessage::Prefetch { blobs, lenders } => self.prefetch(blobs, lenders),
            CoordinatorMessage::Lend { peer, blobs } => self.lend(now, peer, blobs),
            CoordinatorMessage::Signal { from, to, payload } => self.signal(now, from, to, payload),
            CoordinatorMessage::Link { peer, offer } => self.link(peer, offer),
            CoordinatorMessage::Unlink { peer } => {
                while let Some(at) = self.links.iter().position(|l| l.peer == peer && l.purpose == Purpose::Forwards) {
                    self.drop_link(at, "the coordinator unlinked it".into());
                }
            }
            CoordinatorMessage::LoadSpan { shard, blocks, max_sessions, peers, .. } => {
                let range = blocks.start as usize..blocks.end as usize;
                if range.is_empty() || max_sessions == 0 {
                    let message = format!("span {shard}: blocks {}..{} for {max_sessions} sessions is no span", blocks.start, blocks.end);
                    self.send(&ContributorMessage::Error { code: ErrorCode::SpanFailed, message });
                } else if self.span_jobs >= MAX_SPAN_JOBS {
                    let message = format!("span {shard}: {MAX_SPAN_JOBS} span jobs are queued here already");
                    self.send(&ContributorMessage::Error { code: ErrorCode::SpanFailed, message });
                } else if self.policy.fetches_blobs {
                    self.span_jobs += 1;
                    self.fetch_for_load(shard, range, max_sessions as usize, peers);
                } else {
                    self.span_job(SpanJob::Load { shard, blocks: range, max_sessions: max_sessions as usize });
                }
            }
            CoordinatorMessage::Forward(forward) => match self.inbox.hidden_states(&forward.payload) {
                Ok((rows, hidden)) => self.forward_job(forward, rows, hidden, None),
                Err(reason) if forward.shadow => self.log(format!("session {} step {} (a shadow copy): {reason}", forward.session, forward.step)),
                Err(reason) => {
                    let message = format!("session {} step {}: {reason}", forward.session, forward.step);
                    self.send(&ContributorMessage::Error { code: ErrorCode::SpanFailed, message });
                }
            },
            CoordinatorMessage::EndSession { session } => self.outputs.push_back(Output::Span(SpanJob::End { session })),
            CoordinatorMessage::UnloadSpan { shard } => {
                self.cancel_load(&shard);
                self.event(Event::SpanDropped { shard: shard.clone() });
                self.outputs.push_back(Output::Span(SpanJob::Unload { shard }));
            }
        }
    }

    /// Hands a load or a forward to the glue, unless too many are outstanding already.
    fn span_job(&mut self, job: SpanJob) -> bool {
        if self.span_jobs >= MAX_SPAN_JOBS {
            let what = match &job {
                SpanJob::Forward { session, step, .. } => format!("session {session} step {step}"),
                SpanJob::Load { shard, .. } | SpanJob::Unload { shard } => format!("span {shard}"),
                SpanJob::End { session } => format!("session {session}"),
            };
            let message = format!("{what}: {MAX_SPAN_JOBS} span jobs are queued here already");
            self.send(&ContributorMessage::Error { code: ErrorCode::SpanFailed, message });
            return false;
        }
        self.span_jobs += 1;
        self.outputs.push_back(Output::Span(job));
        true
    }

    /// A span that could not be loaded (or its shard fetched): the coordinator places it
    /// elsewhere.
    fn span_failed(&mut self, shard: &str, blocks: &Range<usize>, reason: &str) {
        self.log(format!("span {}..{} ({shard}) failed to load: {reason}", blocks.start, blocks.end));
        self.event(Event::SpanDropped { shard: shard.to_string() });
        let message = format!("span {}..{} ({shard}): {reason}", blocks.start, blocks.end);
        self.send(&ContributorMessage::Error { code: ErrorCode::SpanFailed, message });
    }

    /// When the rest after the last unit is over: it kept the GPU busy `t` ms, so the GPU rests
    /// `t * (1 / budget - 1)` ms.
    fn rest_until(&self) -> Millis {
        self.last_unit.map_or(f64::NEG_INFINITY, |(finished, busy)| finished + busy * (1.0 / self.budget - 1.0))
    }

    /// GPU time spent outside units (a span step) is owed rest too: the rest still owed now,
    /// plus this time's share, as if a unit of that length had just finished.
    fn add_busy(&mut self, now: Millis, busy_ms: f64) {
        let rest_per_ms = 1.0 / self.budget - 1.0;
        let owed = (self.rest_until() - now).max(0.0);
        let carried = if rest_per_ms > 0.0 { owed / rest_per_ms } else { 0.0 };
        self.last_unit = Some((now, carried + busy_ms.max(0.0)));
    }

    fn start_next(&mut self, now: Millis) {
        if self.ended || self.contributor.is_none() || self.running.is_some() || now < self.rest_until() {
            return;
        }
        let Some(assignment) = self.queue.pop_front() else {
            return;
        };
        self.running = Some(Running { job: assignment.job, unit: assignment.unit, inputs: assignment.inputs.len(), cancelled: false });
        self.status(Status::Working);
        self.outputs.push_back(Output::Run(assignment));
    }

    /// The result as tensor frames and its `UnitResult`, after checking that it has one row
    /// of one width per input and that every frame fits the channel.
    fn result_messages(&mut self, running: &Running, rows: Vec<Vec<f32>>) -> Result<Vec<Outgoing>, String> {
        let width = rows.first().map_or(0, Vec::len);
        if rows.len() != running.inputs || rows.iter().any(|r| r.len() != width) {
            let widths: Vec<usize> = rows.iter().map(Vec::len).collect();
            return Err(format!("the model gave rows of widths {widths:?} for {} inputs", running.inputs));
        }
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        let bytes = Tensor::from_f32(vec![running.inputs as u64, width as u64], &flat).map_err(|e| e.to_string())?.encode();
        let (payload, mut messages) = self.frames(PayloadKind::Tensor, &bytes, self.max_message)?;
        messages.push(Outgoing::Text(encode_control(&ContributorMessage::UnitResult { unit: running.unit, payload })));
        Ok(messages)
    }

    /// A payload as frames on a new stream, each within `max_message`, the size of the channel
    /// it goes on.
    fn frames(&mut self, kind: PayloadKind, bytes: &[u8], max_message: usize) -> Result<(PayloadRef, Vec<Outgoing>), String> {
        let stream = self.new_stream();
        let frames = frames_on(stream, kind, bytes, max_message)?;
        Ok((PayloadRef { stream, bytes: bytes.len() as u64 }, frames))
    }

    fn new_stream(&mut self) -> u64 {
        let stream = self.next_stream;
        self.next_stream += 1;
        stream
    }

    /// The time handed in, kept for the reports that come without one.
    fn tick(&mut self, now: Millis) {
        self.clock = self.clock.max(now);
    }

    fn send(&mut self, message: &ContributorMessage) {
        self.outputs.push_back(Output::Send(Outgoing::Text(encode_control(message))));
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    fn status(&mut self, status: Status) {
        self.event(Event::Status { status, detail: None });
    }

    fn log(&mut self, line: String) {
        self.outputs.push_back(Output::Log(line));
    }

    fn restart(&mut self, reason: String) {
        self.outputs.push_back(Output::Restart(reason));
        self.ended = true;
    }
}

/// `bytes` as frames of `stream`, each within `max_message`.
fn frames_on(stream: u64, kind: PayloadKind, bytes: &[u8], max_message: usize) -> Result<Vec<Outgoing>, String> {
    let mut frames = Vec::new();
    for frame in Chunker::new(stream, kind, bytes).map_err(|e| e.to_string())? {
        if frame.len() > max_message {
            return Err(format!("a frame of {} bytes exceeds the DataChannel's maxMessageSize of {max_message}", frame.len()));
        }
        frames.push(Outgoing::Binary(frame));
    }
    Ok(frames)
}

/// "to contributor 5" for a link this side offered, "from contributor 5" for one it answers,
/// with what it is for when that is not forwards.
fn link_name(link: &Link) -> String {
    let direction = if link.offered { "to" } else { "from" };
    match link.purpose {
        Purpose::Forwards => format!("{direction} contributor {}", link.peer),
        Purpose::Borrow => format!("{direction} contributor {} (borrowing a shard)", link.peer),
        Purpose::Lend => format!("{direction} contributor {} (lending shards)", link.peer),
    }
}

fn clamp_budget(budget: f64) -> f64 {
    if budget.is_finite() { budget.clamp(0.01, 1.0) } else { 1.0 }
}

#[cfg(test)]
mod tests;
