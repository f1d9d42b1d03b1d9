//! Control messages: JSON objects tagged by `"type"`, one serde enum per direction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The control protocol version a `Hello` and a `Welcome` carry. Peers must speak the same one.
/// Version 2 added span serving (`LoadSpan`, `Forward`, `EndSession`; `SpanReady`, `Forwarded`);
/// version 3 `UnloadSpan` and `Prefetch`; version 4 direct contributor-to-contributor hops
/// (`Link`, `Unlink`, `Forward::then`, `Passed`, `PeerMessage`); version 5 shards from peers
/// (`Lend`, `LoadSpan::peers`, `PeerMessage::BlobRequest`, `SignalPayload::Offer::purpose`,
/// `BorrowFailed`).
pub const PROTOCOL_VERSION: u32 = 5;
/// The most direct channels a contributor keeps open at once; `Link`s beyond are refused.
pub const MAX_LINKS: usize = 16;
/// The most blobs a contributor takes from one `Prefetch`.
pub const MAX_PREFETCH: usize = 16;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A contributor, as numbered by the coordinator for one connection.
    ContributorId
);
id!(
    /// A job (a client request split into units).
    JobId
);
id!(
    /// A work unit; unique across jobs.
    UnitId
);

/// The adapter limits that decide which work a contributor can take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterLimits {
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
}

/// What a contributor offers, sent in its `Hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The adapter's name, as `wgpu` or WebGPU reports it.
    pub adapter: String,
    /// `vulkan`, `metal`, `dx12`, `gl` or `webgpu`.
    pub backend: String,
    pub limits: AdapterLimits,
    /// Bytes of GPU memory the contributor lets us use.
    pub memory_budget_bytes: u64,
    /// The contributor's micro-benchmark result (matmul GFLOP/s); higher is faster.
    pub benchmark_score: f64,
    /// Units it is willing to hold at once.
    pub max_concurrent_units: u32,
    /// Whether it lends the span shards it holds to other contributors (`Lend`). Native
    /// contributors do; browser tabs do not, to spare their volunteers' upload.
    #[serde(default)]
    pub lends_blobs: bool,
}

/// What a unit asks a contributor to compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    /// Sentence embeddings of already tokenized inputs; the result is an F32 tensor
    /// `[inputs.len(), hidden]` of L2-normalised rows.
    Embedding {
        /// The model's weights, by CIDv1 (raw codec, sha2-256).
        model: String,
        /// Token id sequences, one per input.
        inputs: Vec<Vec<u32>>,
    },
}

/// Where a result's bytes are: binary frames of this stream, of this total length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    pub stream: u64,
    pub bytes: u64,
}

/// A contiguous span of a model's transformer blocks, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    pub start: u32,
    pub end: u32,
}

/// One session's step through a span: the span's shard, the step's hidden states (an F32 tensor
/// `[rows, dim]` in the `Tensor` frames of `payload`, sent just before the message that carries
/// this) for positions `start..start + rows`, and the stages after this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub shard: String,
    pub session: u64,
    /// The coordinator's number for the step; every stage's answer repeats it.
    pub step: u64,
    pub start: u32,
    /// KV cache positions a session new here gets.
    pub capacity: u32,
    pub payload: PayloadRef,
    /// Where the output goes next, directly: the first of these gets it as a `PeerMessage::
    /// Forward` carrying the rest, over the channel a `Link` opened (and its standbys a shadow
    /// copy each), and the coordinator hears `Passed`. Empty (or no open channel to the first):
    /// the output goes back to the coordinator in `Forwarded`, which relays it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<NextHop>,
    /// A standby's copy of the step: run it, so that this contributor's cache of the session
    /// keeps up with the holder's and a takeover needs no recomputing, but answer nothing and
    /// pass nothing on (`then` is empty). A shadow step that cannot run (its session started
    /// before this standby did) is dropped quietly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// A stage after this one on a step's route: who holds it, the span's shard there, and the
/// standbys of that span, which get a shadow copy of the states it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    pub contributor: ContributorId,
    pub shard: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<Standby>,
}

/// A contributor standing by for a span, and the span's shard there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standby {
    pub contributor: ContributorId,
    pub shard: String,
}

/// A session-description or ICE message relayed between two contributors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SignalPayload {
    Offer {
        sdp: String,
        /// What the channel is for, so that the answering side applies the right permit.
        #[serde(default, skip_serializing_if = "ChannelPurpose::is_forwards")]
        purpose: ChannelPurpose,
    },
    Answer {
        sdp: String,
    },
    Candidate {
        candidate: String,
        sdp_mid: Option<String>,
        sdp_m_line_index: Option<u16>,
    },
}

/// What a direct channel between two contributors carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelPurpose {
    /// `Forward`s from the offering (upstream) side, as a `Link` set up.
    #[default]
    Forwards,
    /// Blob ranges the offering side fetches from the answering one, as a `Lend` allowed.
    Blobs,
}

impl ChannelPurpose {
    pub fn is_forwards(&self) -> bool {
        *self == ChannelPurpose::Forwards
    }
}

/// Why a peer rejected something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    UnsupportedVersion,
    Malformed,
    TooLarge,
    NotJoined,
    UnknownUnit,
    UnknownPeer,
    BlobNotFound,
    /// A span could not be loaded or run here (or this contributor serves no spans): the
    /// coordinator places it elsewhere.
    SpanFailed,
    Internal,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

/// Messages a contributor sends (to the coordinator, or to a peer over a direct channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContributorMessage {
    /// The first message on a connection: the version spoken and what the contributor offers.
    Hello {
        protocol_version: u32,
        capabilities: Capabilities,
    },
    /// Still alive; sent every `heartbeat_interval_ms` of the `Welcome`.
    Heartbeat,
    /// Leaving now; the coordinator reissues whatever the contributor holds.
    Leave,
    /// A unit's result; the bytes follow as binary frames of kind `Tensor`.
    UnitResult { unit: UnitId, payload: PayloadRef },
    /// Asks for bytes `[offset, offset + length)` of a blob, sent back as `Blob` frames on `stream`.
    BlobRequest {
        cid: String,
        offset: u64,
        length: u64,
        stream: u64,
    },
    /// Announces blobs this contributor holds and verified.
    BlobHave { cids: Vec<String> },
    /// Relays a WebRTC signal to contributor `to`; `from` must be the sender's own id.
    Signal {
        from: ContributorId,
        to: ContributorId,
        payload: SignalPayload,
    },
    /// The span shard `shard` of a `LoadSpan` is loaded and ready for `Forward`. `fetched_from`:
    /// the peer of `LoadSpan::peers` whose copy was used (none: the shard came from the
    /// coordinator or the local cache); for the coordinator's figures.
    SpanReady {
        shard: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fetched_from: Option<ContributorId>,
    },
    /// The hidden states that `Forward { session, step }` produced: an F32 tensor `[rows, dim]`
    /// in the `Tensor` frames of `payload`, sent before this message. `ms`: how long the step
    /// took here from its arrival, as this contributor measured (for the coordinator's figures
    /// only: it decides nothing).
    Forwarded {
        session: u64,
        step: u64,
        payload: PayloadRef,
        #[serde(default)]
        ms: f64,
    },
    /// The output of `Forward { session, step }` went straight to contributor `to`, the first
    /// of its `then`, over their direct channel (no states follow: the coordinator only times
    /// the hop and starts the next one's clock).
    Passed {
        session: u64,
        step: u64,
        to: ContributorId,
        #[serde(default)]
        ms: f64,
    },
    /// Fetching blob `cid` from `lender` (named in a `LoadSpan` or `Prefetch`) failed; `corrupt`:
    /// what it sent does not match the CID, which a lender that holds the blob verified cannot
    /// send by accident (the coordinator names it as a lender no more).
    BorrowFailed { lender: ContributorId, cid: String, corrupt: bool, message: String },
    /// Something the contributor received was rejected.
    Error { code: ErrorCode, message: String },
}

/// Messages the coordinator sends to a contributor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorMessage {
    /// The answer to a `Hello`: the contributor's id and how often to send heartbeats.
    Welcome {
        protocol_version: u32,
        contributor: ContributorId,
        heartbeat_interval_ms: u64,
    },
    /// Compute this unit and send its `UnitResult` within `deadline_ms` milliseconds.
    Assign {
        job: JobId,
        unit: UnitId,
        deadline_ms: u64,
        work: Work,
    },
    /// Stop working on this unit; its result is no longer needed.
    Cancel { unit: UnitId },
    /// The unit this contributor reported on is decided (committed): `accepted` is whether its
    /// result was among those accepted. Sent once per reported result; a volunteer's page counts
    /// these.
    Verdict { unit: UnitId, accepted: bool },
    /// Asks for a blob range, as `ContributorMessage::BlobRequest`.
    BlobRequest {
        cid: String,
        offset: u64,
        length: u64,
        stream: u64,
    },
    /// Announces blobs the coordinator serves.
    BlobHave { cids: Vec<String> },
    /// A WebRTC signal from contributor `from`, relayed.
    Signal {
        from: ContributorId,
        to: ContributorId,
        payload: SignalPayload,
    },
    /// Load `blocks` of `model` from the span shard `shard` (a blob: fetch it with `BlobRequest`
    /// and check it against its CID), keep KV caches for up to `max_sessions` sessions, and
    /// answer `SpanReady` (or an `Error` with `SpanFailed`). `peers` hold the shard and were
    /// told to lend it to this contributor (`Lend`): it may fetch it from them instead, over a
    /// direct channel it offers (`ChannelPurpose::Blobs`), trying the coordinator last.
    LoadSpan {
        model: String,
        shard: String,
        blocks: Blocks,
        max_sessions: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        peers: Vec<ContributorId>,
    },
    /// Run span `forward.shard` over the step's hidden states and pass the output on (`Forward::
    /// then`) or answer `Forwarded`. A session new here gets a KV cache of `capacity` positions;
    /// positions it holds from `start` on are computed again (a replay).
    Forward(Forward),
    /// `session` is over: free its KV caches.
    EndSession { session: u64 },
    /// Span `shard` is no longer placed here (a re-plan moved it): drop its weights and its
    /// sessions' KV caches. Nothing is answered; an unknown shard is not an error.
    UnloadSpan { shard: String },
    /// Fetch these blobs (span shards this contributor may be asked to take over) into the local
    /// cache now, checked against their CIDs, so that taking over needs no download. Nothing is
    /// loaded or answered; a contributor may ignore it (a browser tab does, to spare its
    /// volunteer's bandwidth), and takes at most `MAX_PREFETCH` of them. `lenders`: for some
    /// blobs, the peers told to lend them to this contributor (`Lend`), to try before the
    /// coordinator, as `LoadSpan::peers`.
    Prefetch {
        blobs: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        lenders: BTreeMap<String, Vec<ContributorId>>,
    },
    /// Open a direct DataChannel with contributor `peer`, which holds the span before or after
    /// one held here (or stands by for the span after it). With `offer`, this side sends the SDP offer (a `Signal` to `peer`) and is
    /// upstream: `Forward`s whose `then` names `peer` go to it. Without, this side answers an
    /// offer from `peer` (and from no contributor it was not told of) and runs the `Forward`s
    /// `peer` sends as it runs the coordinator's. Either side may fail to connect; hops then go
    /// through the coordinator.
    Link { peer: ContributorId, offer: bool },
    /// Close the direct channel with `peer`, and take no more `Forward`s from it.
    Unlink { peer: ContributorId },
    /// Contributor `peer` was told to fetch `blobs` (shards held here) from this contributor:
    /// answer its offer of a `ChannelPurpose::Blobs` channel and serve its `PeerMessage::
    /// BlobRequest`s for these blobs only, until it closes the channel. A contributor that does
    /// not lend (`Capabilities::lends_blobs`) ignores it.
    Lend { peer: ContributorId, blobs: Vec<String> },
    /// Something the contributor sent was rejected; after a fatal one the connection closes.
    Error { code: ErrorCode, message: String },
}

/// Messages one contributor sends another over the direct channel a `Link` opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMessage {
    /// The output of the upstream stage, for the span this contributor holds: run as the
    /// coordinator's `Forward` is run.
    Forward(Forward),
    /// Asks a lending peer for bytes `[offset, offset + length)` of a blob (`length` 0: to its
    /// end), sent back as `Blob` frames on `stream`.
    BlobRequest { cid: String, offset: u64, length: u64, stream: u64 },
    /// A request was refused (e.g. `BlobNotFound`); the fetcher tries elsewhere.
    Error { code: ErrorCode, message: String },
}

/// A control message type: the `"type"` tags it knows, for precise errors.
pub trait Message: serde::de::DeserializeOwned + Serialize {
    const TYPES: &'static [&'static str];
}

impl Message for ContributorMessage {
    const TYPES: &'static [&'static str] = &[
        "hello",
        "heartbeat",
        "leave",
        "unit_result",
        "blob_request",
        "blob_have",
        "signal",
        "span_ready",
        "forwarded",
        "passed",
        "borrow_failed",
        "error",
    ];
}

impl Message for CoordinatorMessage {
    const TYPES: &'static [&'static str] = &[
        "welcome",
        "assign",
        "cancel",
        "verdict",
        "blob_request",
        "blob_have",
        "signal",
        "load_span",
        "forward",
        "end_session",
        "unload_span",
        "prefetch",
        "link",
        "unlink",
        "lend",
        "error",
    ];
}

impl Message for PeerMessage {
    const TYPES: &'static [&'static str] = &["forward", "blob_request", "error"];
}
