//! Direct channels' transport: a task per link the session asks for makes its connection (an
//! offer on a socket of its own through `tessera_rtc::connect`, or an answer on this
//! connection's `Endpoint`), then carries what the session sends on it, in order, and hands
//! back what arrives. Which links exist, what goes over them and when they close is the
//! session's business; a link's task stops when the session closes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_contributor::{Millis, Outgoing, Session};
use tessera_protocol::{ContributorId, Incoming};
use tessera_rtc::{Endpoint, Message, Peer, PeerEvent};
use tokio::sync::{mpsc, oneshot};

use super::{Done, message_of};

/// How long `tessera_rtc` lets a channel take to open; the session's own deadlines are shorter.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches of messages waiting to go out on one link; more are refused (a shadow copy is then
/// dropped, and a pass goes through the coordinator).
const OUTGOING_QUEUE: usize = 64;

/// What happened on a link, for the session.
pub(super) enum LinkEvent {
    /// This side's offer or answer, gathering complete, or why there is none.
    Described(Result<String, String>),
    Open,
    Message(Message),
    Closed(String),
    /// A step's output went out (or not).
    Passed {
        session: u64,
        step: u64,
        result: Result<(), String>,
    },
}

/// Messages for a link's task to send, in order; `pass` names the step whose output they are.
struct Outbound {
    messages: Vec<Outgoing>,
    pass: Option<(u64, u64)>,
}

/// A link's task and what reaches it; dropping it stops the task, which closes the channel.
struct Handle {
    outgoing: mpsc::Sender<Outbound>,
    /// Where the peer's answer goes, for an offer.
    accept: Option<oneshot::Sender<String>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The links of one connection, by the session's numbers.
pub(super) struct Links {
    /// Where offers bind their sockets: the address the coordinator's channel uses.
    bind: SocketAddr,
    /// Answers the offers of other contributors (none without direct channels).
    endpoint: Option<Endpoint>,
    done: mpsc::Sender<Done>,
    links: HashMap<u64, Handle>,
}

enum Setup {
    Offer { bind: SocketAddr, answer: oneshot::Receiver<String> },
    Answer { endpoint: Endpoint, sdp: String },
}

impl Links {
    pub(super) fn new(bind: SocketAddr, endpoint: Option<Endpoint>, done: mpsc::Sender<Done>) -> Links {
        Links { bind, endpoint, done, links: HashMap::new() }
    }

    /// `Output::Offer`: offer `peer` a channel.
    pub(super) fn offer(&mut self, link: u64, peer: ContributorId) {
        let (accept, answer) = oneshot::channel();
        self.start(link, peer, Setup::Offer { bind: self.bind, answer }, Some(accept));
    }

    /// `Output::Answer`: answer `peer`'s offer.
    pub(super) fn answer(&mut self, link: u64, peer: ContributorId, sdp: String) {
        match self.endpoint.clone() {
            Some(endpoint) => self.start(link, peer, Setup::Answer { endpoint, sdp }, None),
            None => drop(self.done.try_send(Done::Link(link, LinkEvent::Described(Err("this connection answers no channels".into()))))),
        }
    }

    fn start(&mut self, link: u64, peer: ContributorId, setup: Setup, accept: Option<oneshot::Sender<String>>) {
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let task = tokio::spawn(serve(link, peer, setup, self.done.clone(), queue)).abort_handle();
        self.links.insert(link, Handle { outgoing, accept, task });
    }

    /// `Output::Accept`: the peer's answer to our offer.
    pub(super) fn accept(&mut self, link: u64, sdp: String) {
        if let Some(accept) = self.links.get_mut(&link).and_then(|h| h.accept.take()) {
            let _ = accept.send(sdp);
        }
    }

    /// `Output::Close`.
    pub(super) fn close(&mut self, link: u64) {
        self.links.remove(&link);
    }

    /// `Output::Pass` (with `pass`) or `Output::SendOn`: queues the messages for the link.
    pub(super) fn send(&mut self, link: u64, messages: Vec<Outgoing>, pass: Option<(u64, u64)>) -> Result<(), String> {
        let handle = self.links.get(&link).ok_or("the channel is gone")?;
        handle.outgoing.try_send(Outbound { messages, pass }).map_err(|_| format!("{OUTGOING_QUEUE} sends wait for the channel already"))
    }

    /// Hands the session what happened on `link`.
    pub(super) fn report(&mut self, session: &mut Session, now: Millis, link: u64, event: LinkEvent) {
        match event {
            LinkEvent::Described(result) => session.described(now, link, result),
            LinkEvent::Open => session.link_open(now, link, tessera_rtc::STR0M_SEND_BUFFER),
            LinkEvent::Message(Message::Text(text)) => session.link_message(now, link, Incoming::Text(&text)),
            LinkEvent::Message(Message::Binary(bytes)) => session.link_message(now, link, Incoming::Binary(&bytes)),
            LinkEvent::Closed(reason) => {
                self.links.remove(&link);
                session.link_closed(now, link, reason);
            }
            LinkEvent::Passed { session: id, step, result } => session.passed(now, link, id, step, result),
        }
    }
}

/// A link's task: the connection, then its messages both ways until it closes.
async fn serve(link: u64, peer: ContributorId, setup: Setup, done: mpsc::Sender<Done>, mut outgoing: mpsc::Receiver<Outbound>) {
    let report = |event| {
        let done = done.clone();
        async move { done.send(Done::Link(link, event)).await.is_ok() }
    };
    let described = Arc::new(AtomicBool::new(false));
    let connected = match setup {
        Setup::Offer { bind, answer } => {
            let (sent, done) = (described.clone(), done.clone());
            let signal = |sdp: String| async move {
                sent.store(true, Ordering::Relaxed);
                let _ = done.send(Done::Link(link, LinkEvent::Described(Ok(sdp)))).await;
                answer.await.map_err(|_| "the offer was withdrawn".to_string())
            };
            let config = tessera_rtc::Config { connect_timeout: CONNECT_TIMEOUT, ..Default::default() };
            tessera_rtc::connect(bind, config, signal).await.map_err(|e| e.to_string())
        }
        Setup::Answer { endpoint, sdp } => match endpoint.accept_offer(&sdp).await {
            Ok((answer, channel)) => {
                described.store(true, Ordering::Relaxed);
                report(LinkEvent::Described(Ok(answer))).await;
                Ok(channel)
            }
            Err(e) => Err(e.to_string()),
        },
    };
    let mut channel: Peer = match connected {
        Ok(channel) => channel,
        Err(why) if described.load(Ordering::Relaxed) => {
            report(LinkEvent::Closed(why)).await;
            return;
        }
        Err(why) => {
            report(LinkEvent::Described(Err(why))).await;
            return;
        }
    };
    if let Err(e) = channel.opened().await {
        {
            report(LinkEvent::Closed(e.to_string())).await;
            return;
        };
    }
    if !report(LinkEvent::Open).await {
        return;
    }
    loop {
        tokio::select! {
            event = channel.recv() => match event {
                Some(PeerEvent::Message(message)) => {
                    if !report(LinkEvent::Message(message)).await {
                        return;
                    }
                }
                Some(PeerEvent::Connected | PeerEvent::Open) => {}
                Some(PeerEvent::Closed(reason)) => {
            report(LinkEvent::Closed(format!("contributor {peer} closed it: {reason}"))).await;
            return;
        },
                None => {
            report(LinkEvent::Closed("the transport stopped".into())).await;
            return;
        },
            },
            batch = outgoing.recv() => {
                let Some(Outbound { messages, pass }) = batch else { return };
                let mut result = Ok(());
                for message in messages {
                    if let Err(e) = channel.send(message_of(message)).await {
                        result = Err(e.to_string());
                        break;
                    }
                }
                match (pass, result) {
                    (Some((session, step)), result) => drop(report(LinkEvent::Passed { session, step, result }).await),
                    (None, Ok(())) => {}
                    (None, Err(why)) => {
            report(LinkEvent::Closed(why)).await;
            return;
        },
                }
            }
        }
    }
}
