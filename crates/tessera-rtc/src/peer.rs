//! The application's handle on one peer: its events (`Peer::recv`) and its send API
//! (`PeerSender::send`, which waits while the peer's send buffer is full).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::RtcError;
use crate::driver::Command;

/// A peer, numbered by the transport task that owns it (unique per `Endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One DataChannel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
}

impl Message {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        match self {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What happened to a peer, in order. `Closed` is always the last event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// ICE and DTLS are up.
    Connected,
    /// The DataChannel is open: messages flow both ways from now on.
    Open,
    /// A message from the peer.
    Message(Message),
    /// The peer is gone; nothing more will arrive and sends fail.
    Closed(CloseReason),
}

/// Why a peer was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side closed it (`Peer::close`, or the `Peer` was dropped).
    Local,
    /// The remote side closed the DataChannel, the SCTP association or DTLS.
    Remote,
    /// The DataChannel did not open within `Config::connect_timeout`.
    ConnectTimeout,
    /// ICE lost the peer (no consent checks arrived for too long).
    IceDisconnected,
    /// The peer sent more than the application took: `what` says which bound it hit.
    Overflow { what: &'static str },
    /// The peer broke the protocol (bad DTLS/SCTP, a second channel, invalid UTF-8 text).
    Protocol(String),
    /// The transport task stopped.
    Stopped,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local => f.write_str("closed locally"),
            CloseReason::Remote => f.write_str("closed by the remote peer"),
            CloseReason::ConnectTimeout => f.write_str("DataChannel did not open in time"),
            CloseReason::IceDisconnected => f.write_str("ICE disconnected"),
            CloseReason::Overflow { what } => write!(f, "overflowed its {what}"),
            CloseReason::Protocol(detail) => write!(f, "protocol error: {detail}"),
            CloseReason::Stopped => f.write_str("transport stopped"),
        }
    }
}

/// A message waiting to be written, holding its share of the peer's send credit until
/// `str0m` accepts it.
pub(crate) struct Outgoing {
    pub binary: bool,
    pub data: Vec<u8>,
    pub _credit: OwnedSemaphorePermit,
}

/// Sends to one peer; cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerSender {
    id: PeerId,
    commands: mpsc::Sender<Command>,
    credit: Arc<Semaphore>,
    max_message: usize,
}

impl PeerSender {
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// Queues `message`, waiting while the peer already has `Config::send_buffer` bytes queued.
    /// Messages are delivered reliably and in order; `Ok` means queued, not yet delivered.
    /// Empty messages are refused (`RtcError::EmptyMessage`).
    pub async fn send(&self, message: Message) -> Result<(), RtcError> {
        let len = message.len();
        if len == 0 {
            return Err(RtcError::EmptyMessage);
        }
        if len > self.max_message {
            return Err(RtcError::MessageTooLarge {
                len,
                max: self.max_message,
            });
        }
        // `len <= max_message <= STR0M_SEND_BUFFER`, which fits in a u32.
        let permits = u32::try_from(len).map_err(|_| RtcError::MessageTooLarge {
            len,
            max: self.max_message,
        })?;
        let credit = Arc::clone(&self.credit)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| RtcError::Closed(self.id))?;
        let (binary, data) = match message {
            Message::Text(text) => (false, text.into_bytes()),
            Message::Binary(bytes) => (true, bytes),
        };
        let outgoing = Outgoing {
            binary,
            data,
            _credit: credit,
        };
        self.commands
            .send(Command::Send(self.id, outgoing))
            .await
            .map_err(|_| RtcError::Stopped)
    }

    /// Closes the peer (gracefully: the remote side is told).
    pub async fn close(&self) {
        // A stopped task has closed every peer already.
        let _ = self.commands.send(Command::Close(self.id)).await;
    }
}

/// One peer: its events and its sender. Dropping it closes the peer.
#[derive(Debug)]
pub struct Peer {
    sender: PeerSender,
    events: mpsc::Receiver<PeerEvent>,
    /// Bytes of `Message` events queued in `events`, for `Config::receive_buffer`.
    queued: Arc<AtomicUsize>,
}

/// The transport task's end of a `Peer`.
pub(crate) struct PeerLink {
    pub events: mpsc::Sender<PeerEvent>,
    pub queued: Arc<AtomicUsize>,
    pub credit: Arc<Semaphore>,
}

pub(crate) fn pair(
    id: PeerId,
    commands: mpsc::Sender<Command>,
    config: &crate::Config,
) -> (Peer, PeerLink) {
    let (events_tx, events_rx) = mpsc::channel(config.event_queue);
    let queued = Arc::new(AtomicUsize::new(0));
    let credit = Arc::new(Semaphore::new(config.send_buffer));
    let peer = Peer {
        sender: PeerSender {
            id,
            commands,
            credit: Arc::clone(&credit),
            max_message: config.max_message,
        },
        events: events_rx,
        queued: Arc::clone(&queued),
    };
    let link = PeerLink {
        events: events_tx,
        queued,
        credit,
    };
    (peer, link)
}

impl Peer {
    pub fn id(&self) -> PeerId {
        self.sender.id
    }

    /// A sender for this peer, for another task.
    pub fn sender(&self) -> PeerSender {
        self.sender.clone()
    }

    /// The next event; `None` after `Closed`.
    pub async fn recv(&mut self) -> Option<PeerEvent> {
        let event = self.events.recv().await?;
        if let PeerEvent::Message(message) = &event {
            self.queued.fetch_sub(message.len(), Ordering::Relaxed);
        }
        Some(event)
    }

    /// Waits for the DataChannel to open. Any message arriving first is an error: a peer may
    /// not send before the channel it sends on is open.
    pub async fn opened(&mut self) -> Result<(), RtcError> {
        loop {
            match self.recv().await {
                Some(PeerEvent::Connected) => {}
                Some(PeerEvent::Open) => return Ok(()),
                Some(PeerEvent::Closed(reason)) => {
                    return Err(RtcError::NotOpened {
                        peer: self.id(),
                        reason,
                    });
                }
                Some(PeerEvent::Message(_)) | None => return Err(RtcError::Closed(self.id())),
            }
        }
    }

    /// As `PeerSender::send`.
    pub async fn send(&self, message: Message) -> Result<(), RtcError> {
        self.sender.send(message).await
    }

    /// As `PeerSender::close`.
    pub async fn close(&self) {
        self.sender.close().await
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Best effort: if the queue is full, the task notices the dropped receiver instead.
        let _ = self
            .sender
            .commands
            .try_send(Command::Close(self.sender.id));
    }
}
