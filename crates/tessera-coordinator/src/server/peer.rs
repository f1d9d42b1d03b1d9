//! One task per contributor connection: it decodes what arrives on the DataChannel (a bad
//! message gets an `Error` reply; a fatal one, or too many, closes this peer only), rebuilds
//! binary payloads with its own bounded `Reassembler` (dropped with the task, so a disconnect
//! abandons whatever was partial), and reports to the actor. A second task per peer writes:
//! control messages from the actor and the blob ranges the contributor asks for, in order.
//!
//! Span serving's messages (`SpanReady`, `Forwarded` with its tensor, `Passed`, and errors) go to the
//! serving task (`serving`), which also hears who joins and leaves; the writer sends the hidden
//! states it forwards as tensor frames.
//!
//! Signals between contributors (`ContributorMessage::Signal`, for the direct DataChannels of
//! model serving) are checked here (joined, `from` is the sender's own id, size, a per-peer
//! token bucket) and relayed by the actor, which knows who is connected.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_protocol::{
    Chunker, ContributorId, ContributorMessage, CoordinatorMessage, Decoded, ErrorCode, Incoming, Payload,
    PayloadKind, ProtocolError, Reassembler, ReassemblyLimits, SignalPayload, Tensor, decode, encode_control,
};
use tessera_rtc::{Message, Peer, PeerEvent, PeerSender};
use tokio::sync::{mpsc, oneshot};

use crate::blobs::BlobStore;
use crate::server::actor::Command;
use crate::server::serving;
use crate::server::{Counters, log};

/// Messages waiting for one peer's writer.
pub(crate) const OUTBOX: usize = 1024;
/// Signals a peer may send in a burst: a WebRTC negotiation is an offer or answer and a few
/// ICE candidates, so this covers several neighbours at once.
const RELAY_BURST: u32 = 64;
/// Signals a peer may send per second, sustained, once its burst is spent.
const RELAY_PER_SECOND: u32 = 16;
/// Largest signal relayed, in bytes of SDP or candidate text (a DataChannel-only SDP is about
/// 1 KiB; the endpoint takes offers up to the same 16 KiB).
const MAX_SIGNAL_BYTES: usize = 16 * 1024;
/// Non-fatal protocol errors a peer may make before it is closed.
const MAX_STRIKES: u32 = 3;
/// Complete result payloads waiting for their `UnitResult`.
const MAX_WAITING_PAYLOADS: usize = 8;
/// Largest result accepted: a unit's embeddings are `inputs x hidden` f32s, far less; a span's
/// hidden states for a whole 8k context of a 576-wide model are 19 MB.
const MAX_RESULT_BYTES: u64 = 32 << 20;
/// How long a closed-for-errors peer has to go before we stop waiting for its close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a peer whose channel opened may take to say hello (a contributor sends it at once).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a peer's writer sends.
pub enum Outbound {
    Control(CoordinatorMessage),
    Blob { cid: String, offset: u64, length: u64, stream: u64 },
    /// An encoded tensor, as `Tensor` frames on `stream`.
    Tensor { stream: u64, bytes: Vec<u8> },
    /// Send this error (if any), then close the channel.
    Close(Option<CoordinatorMessage>),
}

#[derive(Clone)]
pub struct Context {
    pub actor: mpsc::Sender<Command>,
    pub blobs: Arc<BlobStore>,
    pub counters: Arc<Counters>,
    pub serving: mpsc::Sender<serving::Command>,
}

/// A protocol fault: the reply, and whether the peer is closed after it.
struct Fault {
    code: ErrorCode,
    message: String,
    fatal: bool,
}

impl Fault {
    fn new(code: ErrorCode, message: impl Into<String>) -> Fault {
        Fault { code, message: message.into(), fatal: false }
    }

    fn fatal(code: ErrorCode, message: impl Into<String>) -> Fault {
        Fault { code, message: message.into(), fatal: true }
    }

    fn from_decode(e: ProtocolError) -> Fault {
        match e {
            ProtocolError::ControlTooLarge { .. } => Fault::fatal(ErrorCode::TooLarge, e.to_string()),
            ProtocolError::UnsupportedVersion { .. } => Fault::fatal(ErrorCode::UnsupportedVersion, e.to_string()),
            _ => Fault::new(ErrorCode::Malformed, e.to_string()),
        }
    }
}

struct State {
    ctx: Context,
    outbox: mpsc::Sender<Outbound>,
    sender: PeerSender,
    joined: Option<ContributorId>,
    reassembler: Reassembler,
    payloads: VecDeque<Payload>,
    relay: RelayBudget,
}

/// A token bucket: the signals this peer may still relay now. Bounds what one peer can push
/// at another (and at the actor), whatever it sends.
struct RelayBudget {
    tokens: f64,
    refilled: Instant,
}

impl RelayBudget {
    fn full(now: Instant) -> RelayBudget {
        RelayBudget { tokens: f64::from(RELAY_BURST), refilled: now }
    }

    /// Takes one signal's token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(RELAY_PER_SECOND)).min(f64::from(RELAY_BURST));
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The text a signal carries, in bytes.
fn signal_bytes(payload: &SignalPayload) -> usize {
    match payload {
        SignalPayload::Offer { sdp, .. } | SignalPayload::Answer { sdp } => sdp.len(),
        SignalPayload::Candidate { candidate, sdp_mid, .. } => candidate.len() + sdp_mid.as_ref().map_or(0, String::len),
    }
}

/// What woke a peer's task.
enum Wake {
    Event(Option<PeerEvent>),
    /// Its channel opened `HELLO_TIMEOUT` ago and it has not said hello.
    NoHello,
}

/// Runs one peer until its channel closes.
pub async fn run(mut peer: Peer, ctx: Context) {
    let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
    tokio::spawn(write(peer.sender(), outbox_rx, Arc::clone(&ctx.blobs), Arc::clone(&ctx.counters)));
    let limits = ReassemblyLimits { max_message_bytes: MAX_RESULT_BYTES, max_partial_messages: 4, max_buffered_bytes: 4 * MAX_RESULT_BYTES };
    let mut state = State {
        ctx,
        outbox,
        sender: peer.sender(),
        joined: None,
        reassembler: Reassembler::new(limits),
        payloads: VecDeque::new(),
        relay: RelayBudget::full(Instant::now()),
    };
    let mut strikes = 0;
    let mut closing = false;
    // Set when the channel opens, cleared by the hello: a silent peer must not keep its place
    // among the endpoint's `max_peers` for good.
    let mut hello_by: Option<tokio::time::Instant> = None;
    loop {
        let wake = if closing {
            match tokio::time::timeout(CLOSE_GRACE, peer.recv()).await {
                Ok(event) => Wake::Event(event),
                Err(_) => break,
            }
        } else if let Some(deadline) = hello_by {
            tokio::time::timeout_at(deadline, peer.recv()).await.map_or(Wake::NoHello, Wake::Event)
        } else {
            Wake::Event(peer.recv().await)
        };
        let fault = match wake {
            Wake::NoHello => Fault::fatal(ErrorCode::NotJoined, format!("no hello within {} s of the channel opening", HELLO_TIMEOUT.as_secs())),
            Wake::Event(None | Some(PeerEvent::Closed(_))) => break,
            Wake::Event(Some(PeerEvent::Open)) => {
                if state.joined.is_none() {
                    hello_by = Some(tokio::time::Instant::now() + HELLO_TIMEOUT);
                }
                continue;
            }
            Wake::Event(Some(PeerEvent::Connected)) => continue,
            Wake::Event(Some(PeerEvent::Message(_))) if closing => continue,
            Wake::Event(Some(PeerEvent::Message(message))) => {
                let outcome = state.on_message(message).await;
                if state.joined.is_some() {
                    hello_by = None;
                }
                let Err(fault) = outcome else { continue };
                fault
            }
        };
        Counters::add(&state.ctx.counters.protocol_errors, 1);
        strikes += 1;
        let fatal = fault.fatal || strikes >= MAX_STRIKES;
        let who = state.joined.map_or(format!("peer {}", peer.id()), |id| format!("contributor {id}"));
        log(format_args!("{who}: {}{}", fault.message, if fatal { "; closing" } else { "" }));
        let error = CoordinatorMessage::Error { code: fault.code, message: fault.message };
        if fatal {
            Counters::add(&state.ctx.counters.peers_disconnected_for_errors, 1);
            let _ = state.outbox.send(Outbound::Close(Some(error))).await;
            closing = true;
        } else if state.outbox.send(Outbound::Control(error)).await.is_err() {
            break;
        }
    }
    if let Some(id) = state.joined {
        let _ = state.ctx.actor.send(Command::Gone(id)).await;
        let _ = state.ctx.serving.send(serving::Command::Left(id)).await;
    }
}

impl State {
    /// The complete tensor payload `payload` names, decoded; `what` names it in errors.
    fn tensor(&mut self, payload: tessera_protocol::PayloadRef, what: &str) -> Result<Tensor, Fault> {
        let Some(at) = self.payloads.iter().position(|p| p.stream == payload.stream) else {
            return Err(Fault::new(ErrorCode::Malformed, format!("{what}: no complete tensor payload on stream {}", payload.stream)));
        };
        let Some(bytes) = self.payloads.remove(at) else {
            return Err(Fault::new(ErrorCode::Malformed, format!("{what}: no complete tensor payload on stream {}", payload.stream)));
        };
        if bytes.bytes.len() as u64 != payload.bytes {
            return Err(Fault::new(ErrorCode::Malformed, format!("{what}: stream {} carried {} bytes, the message says {}", payload.stream, bytes.bytes.len(), payload.bytes)));
        }
        Tensor::decode(&bytes.bytes, MAX_RESULT_BYTES as usize).map_err(|e| Fault::new(ErrorCode::Malformed, format!("{what}: {e}")))
    }

    async fn serve(&self, command: serving::Command) -> Result<(), Fault> {
        self.ctx.serving.send(command).await.map_err(|_| Fault::fatal(ErrorCode::Internal, "the coordinator is shutting down"))
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Fault> {
        match message {
            Message::Text(text) => match decode::<ContributorMessage>(Incoming::Text(&text)).map_err(Fault::from_decode)? {
                Decoded::Control(message) => self.on_control(message).await,
                Decoded::Chunk(_) => Err(Fault::new(ErrorCode::Malformed, "a text message must be a control message")),
            },
            Message::Binary(bytes) => {
                let Decoded::Chunk(chunk) = decode::<ContributorMessage>(Incoming::Binary(&bytes))
                    .map_err(|e| Fault::fatal(ErrorCode::Malformed, e.to_string()))?
                else {
                    return Err(Fault::new(ErrorCode::Malformed, "a binary message must be a frame"));
                };
                if self.joined.is_none() {
                    return Err(Fault::new(ErrorCode::NotJoined, "send hello before anything else"));
                }
                let payload = self.reassembler.push(chunk).map_err(|e| {
                    let code = match e {
                        ProtocolError::MessageTooLarge { .. }
                        | ProtocolError::BufferedBytesExceeded { .. }
                        | ProtocolError::TooManyPartialMessages { .. } => ErrorCode::TooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    Fault::fatal(code, e.to_string())
                })?;
                if let Some(payload) = payload {
                    if payload.kind != PayloadKind::Tensor {
                        return Err(Fault::new(ErrorCode::Malformed, format!("stream {}: a contributor sends only Tensor payloads, got {:?}", payload.stream, payload.kind)));
                    }
                    if self.payloads.len() >= MAX_WAITING_PAYLOADS {
                        return Err(Fault::fatal(ErrorCode::TooLarge, format!("{MAX_WAITING_PAYLOADS} payloads already wait for their unit_result")));
                    }
                    self.payloads.push_back(payload);
                }
                Ok(())
            }
        }
    }

    async fn on_control(&mut self, message: ContributorMessage) -> Result<(), Fault> {
        let id = match (self.joined, &message) {
            (None, ContributorMessage::Hello { .. }) => None,
            (None, _) => return Err(Fault::new(ErrorCode::NotJoined, "send hello before anything else")),
            (Some(id), _) => Some(id),
        };
        let actor = self.ctx.actor.clone();
        let tell = |command| {
            let actor = actor.clone();
            async move { actor.send(command).await.map_err(|_| Fault::fatal(ErrorCode::Internal, "the coordinator is shutting down")) }
        };
        match message {
            ContributorMessage::Hello { capabilities, .. } => {
                if let Some(id) = id {
                    return Err(Fault::new(ErrorCode::Malformed, format!("already joined as contributor {id}")));
                }
                let (reply, answer) = oneshot::channel();
                tell(Command::Join { capabilities: capabilities.clone(), outbox: self.outbox.clone(), close: self.sender.clone(), reply }).await?;
                let (id, heartbeat_interval_ms) = answer.await.map_err(|_| Fault::fatal(ErrorCode::Internal, "the coordinator refused to add this contributor"))?;
                self.joined = Some(id);
                self.serve(serving::Command::Joined { id, capabilities, outbox: self.outbox.clone() }).await?;
                let welcome = CoordinatorMessage::Welcome { protocol_version: tessera_protocol::PROTOCOL_VERSION, contributor: id, heartbeat_interval_ms };
                self.outbox.send(Outbound::Control(welcome)).await.map_err(|_| Fault::fatal(ErrorCode::Internal, "closed"))
            }
            ContributorMessage::Heartbeat => match id {
                Some(id) => tell(Command::Heartbeat(id)).await,
                None => Ok(()),
            },
            ContributorMessage::BorrowFailed { lender, cid, corrupt, message } => match id {
                Some(from) => self.serve(serving::Command::BorrowFailed { from, lender, cid, corrupt, message }).await,
                None => Ok(()),
            },
            ContributorMessage::BlobHave { cids } => match id {
                Some(from) => {
                    tell(Command::Heartbeat(from)).await?;
                    self.serve(serving::Command::BlobHave { from, cids }).await
                }
                None => Ok(()),
            },
            ContributorMessage::Leave => {
                if let Some(id) = self.joined.take() {
                    tell(Command::Gone(id)).await?;
                }
                let _ = self.outbox.send(Outbound::Close(None)).await;
                Ok(())
            }
            ContributorMessage::UnitResult { unit, payload } => {
                let result = self.tensor(payload, &format!("unit {unit}"))?;
                match id {
                    Some(from) => tell(Command::Report { from, unit, result }).await,
                    None => Ok(()),
                }
            }
            ContributorMessage::Forwarded { session, step, payload, ms } => {
                let hidden = self.tensor(payload, &format!("session {session} step {step}"))?;
                match id {
                    Some(from) => self.serve(serving::Command::Forwarded { from, session, step, hidden, ms }).await,
                    None => Ok(()),
                }
            }
            ContributorMessage::Passed { session, step, to, ms } => match id {
                Some(from) => self.serve(serving::Command::Passed { from, session, step, to, ms }).await,
                None => Ok(()),
            },
            ContributorMessage::SpanReady { shard, fetched_from } => match id {
                Some(from) => self.serve(serving::Command::SpanReady { from, shard, fetched_from }).await,
                None => Ok(()),
            },
            ContributorMessage::BlobRequest { cid, offset, length, stream } => {
                if let Some(id) = id {
                    tell(Command::Heartbeat(id)).await?;
                }
                self.outbox.send(Outbound::Blob { cid, offset, length, stream }).await.map_err(|_| Fault::fatal(ErrorCode::Internal, "closed"))
            }
            ContributorMessage::Signal { from, to, payload } => {
                // `id` is set: a peer that has not joined was refused above.
                let Some(id) = id else { return Ok(()) };
                if from != id {
                    return Err(Fault::new(ErrorCode::Malformed, format!("a signal from contributor {from}: you are contributor {id}, and `from` must be your own id")));
                }
                if to == id {
                    return Err(Fault::new(ErrorCode::Malformed, format!("a signal to contributor {to}: that is you")));
                }
                let bytes = signal_bytes(&payload);
                if bytes > MAX_SIGNAL_BYTES {
                    return Err(Fault::new(ErrorCode::TooLarge, format!("a signal of {bytes} bytes to contributor {to}: at most {MAX_SIGNAL_BYTES} are relayed")));
                }
                if !self.relay.take(Instant::now()) {
                    return Err(Fault::new(
                        ErrorCode::TooLarge,
                        format!("too many signals: a burst of {RELAY_BURST}, then {RELAY_PER_SECOND} a second; the one to contributor {to} was dropped"),
                    ));
                }
                tell(Command::Relay { from, to, payload }).await
            }
            ContributorMessage::Error { code, message } => {
                let who = id.map_or_else(String::new, |id| id.to_string());
                log(format_args!("contributor {who} reports an error ({code:?}): {message}"));
                match (code, id) {
                    (ErrorCode::SpanFailed, Some(from)) => self.serve(serving::Command::SpanFailed { from, message }).await,
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Writes one peer's messages in order; ends when its queue closes, a send fails, or on `Close`.
async fn write(sender: PeerSender, mut outbox: mpsc::Receiver<Outbound>, blobs: Arc<BlobStore>, counters: Arc<Counters>) {
    let text = |m: &CoordinatorMessage| Message::Text(encode_control(m));
    while let Some(out) = outbox.recv().await {
        let sent = match out {
            Outbound::Control(message) => sender.send(text(&message)).await,
            Outbound::Close(error) => {
                if let Some(error) = error {
                    let _ = sender.send(text(&error)).await;
                }
                break;
            }
            Outbound::Tensor { stream, bytes } => send_frames(&sender, stream, PayloadKind::Tensor, &bytes).await,
            Outbound::Blob { cid, offset, length, stream } => {
                let blobs = Arc::clone(&blobs);
                let read = tokio::task::spawn_blocking(move || blobs.request(&cid, offset, length)).await;
                match read {
                    Ok(Ok(bytes)) => send_blob(&sender, stream, &bytes, &counters).await,
                    Ok(Err((code, message))) => sender.send(text(&CoordinatorMessage::Error { code, message })).await,
                    Err(e) => sender.send(text(&CoordinatorMessage::Error { code: ErrorCode::Internal, message: format!("reading the blob failed: {e}") })).await,
                }
            }
        };
        if sent.is_err() {
            break;
        }
    }
    sender.close().await;
}

async fn send_frames(sender: &PeerSender, stream: u64, kind: PayloadKind, bytes: &[u8]) -> Result<(), tessera_rtc::RtcError> {
    let frames = match Chunker::new(stream, kind, bytes) {
        Ok(frames) => frames,
        Err(e) => {
            let error = CoordinatorMessage::Error { code: ErrorCode::TooLarge, message: e.to_string() };
            return sender.send(Message::Text(encode_control(&error))).await;
        }
    };
    for frame in frames {
        sender.send(Message::Binary(frame)).await?;
    }
    Ok(())
}

async fn send_blob(sender: &PeerSender, stream: u64, bytes: &[u8], counters: &Counters) -> Result<(), tessera_rtc::RtcError> {
    send_frames(sender, stream, PayloadKind::Blob, bytes).await?;
    Counters::add(&counters.blob_bytes_sent, bytes.len() as u64);
    Ok(())
}
