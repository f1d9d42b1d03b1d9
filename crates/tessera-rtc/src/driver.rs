//! The transport task: one UDP socket and the sans-IO `str0m::Rtc` of every peer on it.
//!
//! It waits on three things (a command from the application, a datagram, the earliest peer
//! timeout), feeds the one that happened to the peer it concerns, polls that peer until it
//! asks for nothing before its next timeout, and sends what it produced. A datagram goes to
//! the peer whose `Rtc::accepts` it (its source address is remembered to skip the search next
//! time); one that parses as nothing WebRTC knows, or that no peer accepts, is counted and
//! dropped. Whatever a peer does wrong closes that peer only.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use str0m::channel::ChannelId;
use str0m::net::{DatagramRecv, Protocol, Receive, Transmit};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::Config;
use crate::peer::{CloseReason, Message, Outgoing, PeerEvent, PeerId, PeerLink};

/// Commands queued from all peers' senders to the task. Each `Send` holds send credit, so the
/// bytes behind this queue are bounded by `Config::send_buffer` per peer.
pub(crate) const COMMAND_QUEUE: usize = 1024;

/// Source addresses remembered per peer (ICE may try a few before settling on one).
const MAX_ADDRS_PER_PEER: usize = 4;

/// Largest datagram read; WebRTC keeps under ~1200 bytes, so anything near this is garbage.
const RECV_BUFFER: usize = 4096;

/// Polls of a closing peer spent draining its goodbye (DTLS close_notify, SCTP shutdown).
const CLOSE_DRAIN_POLLS: usize = 64;

pub(crate) enum Command {
    Add(Box<NewPeer>),
    Send(PeerId, Outgoing),
    Close(PeerId),
}

pub(crate) struct NewPeer {
    pub id: PeerId,
    pub rtc: Rtc,
    pub link: PeerLink,
    pub slot: Option<Slot>,
}

/// What an `Endpoint` reports in `EndpointStats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub peers: AtomicUsize,
    pub garbage_datagrams: AtomicU64,
    pub unmatched_datagrams: AtomicU64,
    pub dropped_peers: AtomicU64,
}

/// One place among `Config::max_peers`, given back when the peer is gone.
pub(crate) struct Slot(pub Arc<Counters>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.peers.fetch_sub(1, Ordering::Relaxed);
    }
}

struct PeerState {
    rtc: Rtc,
    channel: Option<ChannelId>,
    link: PeerLink,
    outbox: VecDeque<Outgoing>,
    /// Until the DataChannel opens: when to give up.
    open_deadline: Option<Instant>,
    /// When `str0m` next wants `Input::Timeout`.
    timeout: Instant,
    addrs: Vec<SocketAddr>,
    _slot: Option<Slot>,
}

enum Wake {
    Command(Option<Command>),
    Datagram(std::io::Result<(usize, SocketAddr)>),
    Timer,
}

pub(crate) struct Driver {
    socket: UdpSocket,
    /// The address peers send to: our ICE candidate, the `destination` of every `Receive`.
    local: SocketAddr,
    commands: mpsc::Receiver<Command>,
    peers: HashMap<PeerId, PeerState>,
    by_addr: HashMap<SocketAddr, PeerId>,
    counters: Arc<Counters>,
    config: Config,
    transmits: Vec<Transmit>,
    /// A client's task ends with its one peer.
    exit_when_empty: bool,
}

impl Driver {
    pub fn new(
        socket: UdpSocket,
        local: SocketAddr,
        commands: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
        config: Config,
        exit_when_empty: bool,
    ) -> Driver {
        Driver {
            socket,
            local,
            commands,
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            counters,
            config,
            transmits: Vec::new(),
            exit_when_empty,
        }
    }

    /// Runs until every handle on the task (the endpoint, every peer) is gone, or, for a
    /// client, until its peer is closed.
    pub async fn run(mut self) {
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let deadline = tokio::time::Instant::from_std(self.next_deadline());
            let wake = tokio::select! {
                command = self.commands.recv() => Wake::Command(command),
                received = self.socket.recv_from(&mut buf) => Wake::Datagram(received),
                () = tokio::time::sleep_until(deadline) => Wake::Timer,
            };
            match wake {
                Wake::Command(None) => break,
                Wake::Command(Some(command)) => self.on_command(command),
                Wake::Datagram(Ok((len, source))) => {
                    if let Some(bytes) = buf.get(..len) {
                        self.on_datagram(bytes, source);
                    }
                }
                // Linux reports ICMP errors for earlier sends on an unconnected socket as
                // errors here; they concern one destination, never the socket.
                Wake::Datagram(Err(error)) => tracing::debug!("UDP receive: {error}"),
                Wake::Timer => self.on_timer(),
            }
            self.send_transmits().await;
            if self.exit_when_empty && self.peers.is_empty() {
                break;
            }
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.remove(id, CloseReason::Stopped);
        }
        self.send_transmits().await;
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.peers
            .values()
            .map(|p| p.open_deadline.map_or(p.timeout, |d| d.min(p.timeout)))
            .fold(far, Instant::min)
    }

    fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Add(new) => {
                let NewPeer {
                    id,
                    rtc,
                    link,
                    slot,
                } = *new;
                let peer = PeerState {
                    rtc,
                    channel: None,
                    link,
                    outbox: VecDeque::new(),
                    open_deadline: Some(now + self.config.connect_timeout),
                    timeout: now,
                    addrs: Vec::new(),
                    _slot: slot,
                };
                self.peers.insert(id, peer);
                self.tick(id, now);
            }
            Command::Send(id, outgoing) => {
                // A peer that is gone drops the message, and with it the credit.
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.outbox.push_back(outgoing);
                    self.drive(id);
                }
            }
            Command::Close(id) => self.remove(id, CloseReason::Local),
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], source: SocketAddr) {
        let now = Instant::now();
        let Ok(contents) = DatagramRecv::try_from(bytes) else {
            self.counters
                .garbage_datagrams
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        let known = self
            .by_addr
            .get(&source)
            .copied()
            .filter(|id| self.peers.get(id).is_some_and(|p| p.rtc.accepts(&input)));
        let found = known.or_else(|| {
            self.peers
                .iter()
                .find(|(_, p)| p.rtc.accepts(&input))
                .map(|(id, _)| *id)
        });
        let Some((id, peer)) = found.and_then(|id| Some(id).zip(self.peers.get_mut(&id))) else {
            self.counters
                .unmatched_datagrams
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !peer.addrs.contains(&source) && peer.addrs.len() < MAX_ADDRS_PER_PEER {
            peer.addrs.push(source);
            self.by_addr.insert(source, id);
        }
        match peer.rtc.handle_input(input) {
            Ok(()) => self.drive(id),
            Err(error) => self.remove(id, CloseReason::Protocol(error.to_string())),
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.timeout <= now || p.open_deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.tick(id, now);
        }
    }

    /// Moves a peer's clock to `now`, then drives it.
    fn tick(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.open_deadline.is_some_and(|d| d <= now) {
            return self.remove(id, CloseReason::ConnectTimeout);
        }
        match peer.rtc.handle_input(Input::Timeout(now)) {
            Ok(()) => self.drive(id),
            Err(error) => self.remove(id, CloseReason::Protocol(error.to_string())),
        }
    }

    /// Writes what the peer has queued and polls it until its next timeout.
    fn drive(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if let Some(reason) = peer.drive(&self.config, &mut self.transmits) {
            self.remove(id, reason);
        }
    }

    fn remove(&mut self, id: PeerId, reason: CloseReason) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        for addr in &peer.addrs {
            if self.by_addr.get(addr) == Some(&id) {
                self.by_addr.remove(addr);
            }
        }
        match reason {
            CloseReason::Local | CloseReason::Remote | CloseReason::Stopped => {
                tracing::debug!(peer = %id, "peer {reason}")
            }
            _ => {
                self.counters.dropped_peers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %id, "dropping peer: {reason}");
            }
        }
        // Say goodbye where the peer is still one we talk to.
        let polite = matches!(
            reason,
            CloseReason::Local | CloseReason::Stopped | CloseReason::Overflow { .. }
        );
        if polite && peer.rtc.is_alive() && peer.rtc.close().is_ok() {
            for _ in 0..CLOSE_DRAIN_POLLS {
                match peer.rtc.poll_output() {
                    Ok(Output::Transmit(transmit)) => self.transmits.push(transmit),
                    Ok(Output::Event(_)) => {}
                    Ok(Output::Timeout(_)) | Err(_) => break,
                }
            }
        }
        peer.rtc.disconnect();
        peer.link.credit.close();
        // If the queue is full, the application sees the end of the stream instead.
        let _ = peer.link.events.try_send(PeerEvent::Closed(reason));
    }

    async fn send_transmits(&mut self) {
        let mut transmits = std::mem::take(&mut self.transmits);
        for transmit in transmits.drain(..) {
            if let Err(error) = self
                .socket
                .send_to(&transmit.contents, transmit.destination)
                .await
            {
                tracing::debug!("UDP send to {}: {error}", transmit.destination);
            }
        }
        // Keep the allocation.
        self.transmits = transmits;
    }
}

impl PeerState {
    fn drive(&mut self, config: &Config, transmits: &mut Vec<Transmit>) -> Option<CloseReason> {
        if self.link.events.is_closed() {
            return Some(CloseReason::Local);
        }
        if let Some(reason) = self.flush() {
            return Some(reason);
        }
        loop {
            if !self.rtc.is_alive() {
                return Some(CloseReason::Remote);
            }
            match self.rtc.poll_output() {
                Ok(Output::Timeout(at)) => {
                    self.timeout = at;
                    return None;
                }
                Ok(Output::Transmit(transmit)) => transmits.push(transmit),
                Ok(Output::Event(event)) => {
                    if let Some(reason) = self.on_event(event, config) {
                        return Some(reason);
                    }
                }
                Err(error) => return Some(CloseReason::Protocol(error.to_string())),
            }
        }
    }

    fn on_event(&mut self, event: Event, config: &Config) -> Option<CloseReason> {
        match event {
            Event::Connected => self.emit(PeerEvent::Connected),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                Some(CloseReason::IceDisconnected)
            }
            Event::ChannelOpen(id, _label) => {
                if self.channel.is_some() {
                    return Some(CloseReason::Protocol("a second DataChannel".into()));
                }
                self.channel = Some(id);
                self.open_deadline = None;
                if let Some(mut channel) = self.rtc.channel(id) {
                    channel.set_buffered_amount_low_threshold(crate::STR0M_SEND_BUFFER / 2);
                }
                self.emit(PeerEvent::Open).or_else(|| self.flush())
            }
            Event::ChannelData(data) => {
                if Some(data.id) != self.channel {
                    return Some(CloseReason::Protocol(
                        "data on a channel that is not open".into(),
                    ));
                }
                let message = if data.binary {
                    Message::Binary(data.data)
                } else {
                    match String::from_utf8(data.data) {
                        Ok(text) => Message::Text(text),
                        Err(_) => {
                            return Some(CloseReason::Protocol(
                                "a text message that is not UTF-8".into(),
                            ));
                        }
                    }
                };
                let queued =
                    self.link.queued.fetch_add(message.len(), Ordering::Relaxed) + message.len();
                if queued > config.receive_buffer {
                    return Some(CloseReason::Overflow {
                        what: "receive buffer",
                    });
                }
                self.emit(PeerEvent::Message(message))
            }
            Event::ChannelBufferedAmountLow(_) => self.flush(),
            Event::ChannelClose(id) if Some(id) == self.channel => Some(CloseReason::Remote),
            Event::Closed => Some(CloseReason::Remote),
            _ => None,
        }
    }

    fn emit(&mut self, event: PeerEvent) -> Option<CloseReason> {
        match self.link.events.try_send(event) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(CloseReason::Overflow {
                what: "event queue",
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(CloseReason::Local),
        }
    }

    /// Hands queued messages to `str0m` while its send buffer takes them. What does not fit
    /// waits for the buffer to drain (`ChannelBufferedAmountLow`, or any later drive).
    fn flush(&mut self) -> Option<CloseReason> {
        let id = self.channel?;
        while let Some(next) = self.outbox.front() {
            let mut channel = self.rtc.channel(id)?;
            match channel.write(next.binary, &next.data) {
                Ok(true) => {
                    // Dropping it returns its credit to the sender.
                    self.outbox.pop_front();
                }
                Ok(false) => return None,
                Err(error) => return Some(CloseReason::Protocol(format!("write: {error}"))),
            }
        }
        None
    }
}
