//! The browser's WebRTC transport: an `RTCPeerConnection` with one ordered, reliable DataChannel,
//! to the coordinator (WebSocket signalling: one offer out, one answer back) or to another
//! contributor (a direct link: this side's offer or answer, whose SDP the session relays through
//! the coordinator). What arrives comes out of a bounded queue; `send` keeps to the channel's
//! `maxMessageSize` and waits on `bufferedamountlow` while too much is buffered (for a while: a
//! channel that takes nothing fails). No protocol logic: that is `tessera_contributor`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt, select};
use gloo_timers::future::TimeoutFuture;
use js_sys::{ArrayBuffer, Reflect, Uint8Array};
use tessera_contributor::Outgoing;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelInit, RtcDataChannelState, RtcDataChannelType,
    RtcIceGatheringState, RtcPeerConnection, RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit, WebSocket,
};

use crate::js_detail;
use crate::signal::{self, CHANNEL_LABEL};

/// Messages off the channel waiting for the session; a peer that floods past this is cut off.
const INCOMING: usize = 256;
/// `send` waits while more than this is buffered, until `bufferedamountlow` (at `LOW_WATER`).
const HIGH_WATER: u32 = 1 << 20;
const LOW_WATER: u32 = 256 << 10;
/// How long `send` waits for the buffer to drain below `HIGH_WATER` before it gives up.
const STALL_TIMEOUT_MS: f64 = 30_000.0;
/// What a channel that reports no `sctp.maxMessageSize` is assumed to take (RFC 8841's default).
const DEFAULT_MAX_MESSAGE: usize = 64 << 10;
const GATHER_TIMEOUT_MS: f64 = 5_000.0;
const SIGNAL_TIMEOUT_MS: u32 = 10_000;
const OPEN_TIMEOUT_MS: u32 = 15_000;
/// How long a closing channel may take to send what it holds (the `Leave`).
const DRAIN_TIMEOUT_MS: f64 = 2_000.0;

/// What the DataChannel delivered.
#[derive(Debug)]
pub enum Received {
    Open,
    Text(String),
    Binary(Vec<u8>),
    /// The channel or the connection is gone, and why.
    Closed(String),
}

type Handler = Closure<dyn FnMut(JsValue)>;

/// The functions a DataChannel's events go to.
struct ChannelHandlers {
    open: js_sys::Function,
    message: js_sys::Function,
    close: js_sys::Function,
    error: js_sys::Function,
    low: js_sys::Function,
}

/// Sets the handlers of `dc` (none: removes them), and its binary type and low-water mark.
fn attach(dc: &RtcDataChannel, handlers: Option<&ChannelHandlers>) {
    dc.set_binary_type(RtcDataChannelType::Arraybuffer);
    dc.set_buffered_amount_low_threshold(LOW_WATER);
    dc.set_onopen(handlers.map(|h| &h.open));
    dc.set_onmessage(handlers.map(|h| &h.message));
    dc.set_onclose(handlers.map(|h| &h.close));
    dc.set_onerror(handlers.map(|h| &h.error));
    dc.set_onbufferedamountlow(handlers.map(|h| &h.low));
}

/// One connection and its DataChannel: to the coordinator, or a direct one to another
/// contributor. Dropping it closes the channel and the connection.
pub struct Channel {
    pc: RtcPeerConnection,
    /// The DataChannel: made with the connection by the offering side, announced by the peer
    /// (`ondatachannel`) to the answering one.
    dc: Rc<RefCell<Option<RtcDataChannel>>>,
    /// Who is at the other end, for messages: "the coordinator", "contributor 7".
    peer: Rc<str>,
    incoming: mpsc::Receiver<Received>,
    low: mpsc::Receiver<()>,
    overflowed: Rc<Cell<bool>>,
    max_message: usize,
    _handlers: Vec<Handler>,
}

impl Channel {
    /// Offers a DataChannel through the signalling WebSocket at `signalling_url` and waits
    /// until it opens.
    pub async fn connect(signalling_url: &str) -> Result<Channel, String> {
        let (mut channel, offer) = Channel::offer("the coordinator").await?;
        let answer = signal(signalling_url, &offer).await?;
        channel.accept(&answer).await?;
        let mut timeout = TimeoutFuture::new(OPEN_TIMEOUT_MS).fuse();
        loop {
            select! {
                received = channel.incoming.next() => match received {
                    Some(Received::Open) => break,
                    Some(Received::Closed(reason)) => return Err(reason),
                    Some(_) => {}
                    None => return Err("the DataChannel's handlers are gone".into()),
                },
                _ = timeout => return Err(format!("the DataChannel did not open within {} s", OPEN_TIMEOUT_MS / 1000)),
            }
        }
        channel.opened();
        Ok(channel)
    }

    /// A connection offering a DataChannel to `peer`, and its offer's SDP.
    pub async fn offer(peer: &str) -> Result<(Channel, String), String> {
        let channel = Channel::new(peer, true)?;
        let sdp = channel.describe(None).await?;
        Ok((channel, sdp))
    }

    /// A connection answering `peer`'s offer `sdp`, and its answer's SDP; the DataChannel comes
    /// when the peer announces it.
    pub async fn answer(peer: &str, sdp: &str) -> Result<(Channel, String), String> {
        let channel = Channel::new(peer, false)?;
        let sdp = channel.describe(Some(sdp)).await?;
        Ok((channel, sdp))
    }

    /// Applies the peer's answer `sdp` to this side's offer. The future holds the connection,
    /// not the channel.
    pub fn accept(&self, sdp: &str) -> impl Future<Output = Result<(), String>> + 'static {
        let (pc, peer) = (self.pc.clone(), self.peer.clone());
        let remote = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
        remote.set_sdp(sdp);
        async move {
            JsFuture::from(pc.set_remote_description(&remote)).await.map_err(|e| format!("{peer}'s answer was refused: {}", js_detail(&e)))?;
            Ok(())
        }
    }

    /// The channel opened: reads the largest message it takes (`max_message`), and returns it.
    pub fn opened(&mut self) -> usize {
        self.max_message = max_message_size(&self.pc);
        self.max_message
    }

    /// The connection, with every handler in place, and its DataChannel if this side `offers`.
    fn new(peer: &str, offers: bool) -> Result<Channel, String> {
        let peer: Rc<str> = peer.into();
        // No ICE servers: each side's own addresses are its only candidates.
        let pc = RtcPeerConnection::new_with_configuration(&RtcConfiguration::new())
            .map_err(|e| format!("creating an RTCPeerConnection: {}", js_detail(&e)))?;

        let (sender, incoming) = mpsc::channel(INCOMING);
        let (mut low_sender, low) = mpsc::channel(1);
        let overflowed = Rc::new(Cell::new(false));
        let push = {
            let overflowed = overflowed.clone();
            move |sender: &mut mpsc::Sender<Received>, received: Received| {
                if sender.try_send(received).is_err() {
                    overflowed.set(true);
                }
            }
        };
        let on_open = Handler::new({
            let (mut sender, push) = (sender.clone(), push.clone());
            move |_: JsValue| push(&mut sender, Received::Open)
        });
        let on_message = Handler::new({
            let (mut sender, push, peer) = (sender.clone(), push.clone(), peer.clone());
            move |event: JsValue| {
                let data = event.unchecked_into::<MessageEvent>().data();
                let received = if let Some(text) = data.as_string() {
                    Received::Text(text)
                } else if let Some(buffer) = data.dyn_ref::<ArrayBuffer>() {
                    Received::Binary(Uint8Array::new(buffer).to_vec())
                } else {
                    Received::Closed(format!("{peer} sent a message that is neither text nor binary"))
                };
                push(&mut sender, received);
            }
        });
        let on_close = Handler::new({
            let (mut sender, push, mut low_sender, peer) = (sender.clone(), push.clone(), low_sender.clone(), peer.clone());
            move |_: JsValue| {
                push(&mut sender, Received::Closed(format!("{peer} closed the DataChannel")));
                let _ = low_sender.try_send(());
            }
        });
        let on_error = Handler::new({
            let (mut sender, push) = (sender.clone(), push.clone());
            move |event: JsValue| {
                let error = Reflect::get(&event, &"error".into()).unwrap_or(JsValue::UNDEFINED);
                push(&mut sender, Received::Closed(format!("the DataChannel failed: {}", js_detail(&error))));
            }
        });
        let on_low = Handler::new(move |_: JsValue| {
            let _ = low_sender.try_send(());
        });
        let on_state = Handler::new({
            let (mut sender, pc, push, peer) = (sender.clone(), pc.clone(), push.clone(), peer.clone());
            move |_: JsValue| {
                let state = match pc.connection_state() {
                    RtcPeerConnectionState::Failed => "failed",
                    RtcPeerConnectionState::Closed => "closed",
                    _ => return,
                };
                push(&mut sender, Received::Closed(format!("the connection to {peer} {state}")));
            }
        });
        let function = |handler: &Handler| handler.as_ref().unchecked_ref::<js_sys::Function>().clone();
        let handlers = ChannelHandlers {
            open: function(&on_open),
            message: function(&on_message),
            close: function(&on_close),
            error: function(&on_error),
            low: function(&on_low),
        };
        pc.set_onconnectionstatechange(Some(&function(&on_state)));
        let dc = Rc::new(RefCell::new(None));
        let mut all = vec![on_open, on_message, on_close, on_error, on_low, on_state];
        if offers {
            let init = RtcDataChannelInit::new();
            init.set_ordered(true);
            let channel = pc.create_data_channel_with_data_channel_dict(CHANNEL_LABEL, &init);
            attach(&channel, Some(&handlers));
            *dc.borrow_mut() = Some(channel);
        } else {
            // The one channel the offer announces; any other is closed.
            let on_channel = Handler::new({
                let (dc, mut sender) = (dc.clone(), sender);
                move |event: JsValue| {
                    let channel = event.unchecked_into::<RtcDataChannelEvent>().channel();
                    if dc.borrow().is_some() || channel.label() != CHANNEL_LABEL {
                        channel.close();
                        return;
                    }
                    attach(&channel, Some(&handlers));
                    if channel.ready_state() == RtcDataChannelState::Open {
                        push(&mut sender, Received::Open);
                    }
                    *dc.borrow_mut() = Some(channel);
                }
            });
            pc.set_ondatachannel(Some(&function(&on_channel)));
            all.push(on_channel);
        }
        Ok(Channel { pc, dc, peer, incoming, low, overflowed, max_message: DEFAULT_MAX_MESSAGE, _handlers: all })
    }

    /// This side's offer, or its answer to the peer's offer `remote`, set as the local
    /// description; its SDP once ICE gathering is complete. Neither the coordinator (ICE-lite)
    /// nor a contributor's `Signal` takes trickled candidates.
    async fn describe(&self, remote: Option<&str>) -> Result<String, String> {
        let peer = &self.peer;
        if let Some(offer) = remote {
            let description = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
            description.set_sdp(offer);
            JsFuture::from(self.pc.set_remote_description(&description)).await.map_err(|e| format!("{peer}'s offer was refused: {}", js_detail(&e)))?;
        }
        let (kind, what, made) = match remote {
            None => (RtcSdpType::Offer, "offer", self.pc.create_offer()),
            Some(_) => (RtcSdpType::Answer, "answer", self.pc.create_answer()),
        };
        let description = JsFuture::from(made).await.map_err(|e| format!("creating the {what}: {}", js_detail(&e)))?;
        let sdp = Reflect::get(&description, &"sdp".into()).ok().and_then(|sdp| sdp.as_string()).ok_or_else(|| format!("the {what} has no SDP"))?;
        let local = RtcSessionDescriptionInit::new(kind);
        local.set_sdp(&sdp);
        JsFuture::from(self.pc.set_local_description(&local)).await.map_err(|e| format!("setting the {what}: {}", js_detail(&e)))?;
        self.gathered().await;
        self.pc.local_description().map(|d| d.sdp()).ok_or_else(|| "the connection has no local description".into())
    }

    /// Waits until ICE gathering is complete, or gives up after a while and offers what it has.
    async fn gathered(&self) {
        let started = js_sys::Date::now();
        while self.pc.ice_gathering_state() != RtcIceGatheringState::Complete && js_sys::Date::now() - started < GATHER_TIMEOUT_MS {
            TimeoutFuture::new(20).await;
        }
    }

    /// The largest message the channel takes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The next message; `Closed` once the channel is gone or the peer sent more than the
    /// queue holds.
    pub async fn recv(&mut self) -> Received {
        if self.overflowed.get() {
            return Received::Closed(format!("{} sent more than {INCOMING} messages faster than they could be handled", self.peer));
        }
        self.incoming.next().await.unwrap_or_else(|| Received::Closed("the DataChannel's handlers are gone".into()))
    }

    /// Sends one message, after waiting for the buffer to drain below the high-water mark.
    pub async fn send(&mut self, message: Outgoing) -> Result<(), String> {
        if message.len() > self.max_message {
            return Err(format!("a message of {} bytes exceeds the DataChannel's maxMessageSize of {}", message.len(), self.max_message));
        }
        let dc = self.dc.borrow().clone().ok_or_else(|| format!("{} has not announced a DataChannel", self.peer))?;
        let started = js_sys::Date::now();
        while dc.buffered_amount() > HIGH_WATER {
            if dc.ready_state() != RtcDataChannelState::Open {
                return Err("the DataChannel closed".into());
            }
            if js_sys::Date::now() - started > STALL_TIMEOUT_MS {
                return Err(format!("{} took nothing for {} s", self.peer, STALL_TIMEOUT_MS / 1000.0));
            }
            // `bufferedamountlow` (or a close) wakes us; the timer covers an event that fired
            // before we listened.
            select! {
                _ = self.low.next() => {}
                _ = TimeoutFuture::new(1_000).fuse() => {}
            }
        }
        let sent = match &message {
            Outgoing::Text(text) => dc.send_with_str(text),
            Outgoing::Binary(bytes) => dc.send_with_u8_array(bytes),
        };
        sent.map_err(|e| format!("sending on the DataChannel: {}", js_detail(&e)))
    }

    /// Closes the channel once what it holds is sent (or after a grace period).
    pub async fn close_after_sending(self) {
        let Some(dc) = self.dc.borrow().clone() else { return };
        let started = js_sys::Date::now();
        while dc.buffered_amount() > 0 && dc.ready_state() == RtcDataChannelState::Open && js_sys::Date::now() - started < DRAIN_TIMEOUT_MS {
            TimeoutFuture::new(20).await;
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Handlers go first: a closure must never run after it is freed.
        self.pc.set_ondatachannel(None);
        self.pc.set_onconnectionstatechange(None);
        if let Some(dc) = self.dc.borrow_mut().take() {
            attach(&dc, None);
            dc.close();
        }
        self.pc.close();
    }
}

/// The next message off any of `channels`, with its key; never, while there are none.
pub async fn recv_any<K: Copy>(channels: &mut HashMap<K, Channel>) -> (K, Received) {
    if channels.is_empty() {
        return futures::future::pending().await;
    }
    let receiving = channels.iter_mut().map(|(&key, channel)| Box::pin(async move { (key, channel.recv().await) }));
    futures::future::select_all(receiving).await.0
}

/// `pc.sctp.maxMessageSize` (web-sys has no binding for `RTCSctpTransport`).
fn max_message_size(pc: &RtcPeerConnection) -> usize {
    let size = Reflect::get(pc, &"sctp".into())
        .ok()
        .filter(|sctp| sctp.is_object())
        .and_then(|sctp| Reflect::get(&sctp, &"maxMessageSize".into()).ok())
        .and_then(|size| size.as_f64());
    match size {
        // Infinity (no limit) saturates.
        Some(size) if size >= 1.0 => size as usize,
        _ => DEFAULT_MAX_MESSAGE,
    }
}

/// Sends the offer over a WebSocket to `url` and returns the answer's SDP.
async fn signal(url: &str, sdp: &str) -> Result<String, String> {
    let socket = WebSocket::new(url).map_err(|e| format!("opening the signalling WebSocket {url}: {}", js_detail(&e)))?;
    let (sender, mut replies) = mpsc::channel::<Result<String, String>>(2);
    let on_open = Closure::<dyn FnMut(JsValue)>::new({
        let (socket, offer, mut sender) = (socket.clone(), signal::offer(sdp), sender.clone());
        move |_| {
            if let Err(e) = socket.send_with_str(&offer) {
                let _ = sender.try_send(Err(format!("sending the offer: {}", js_detail(&e))));
            }
        }
    });
    let on_message = Closure::<dyn FnMut(JsValue)>::new({
        let mut sender = sender.clone();
        move |event: JsValue| {
            let data = event.unchecked_into::<MessageEvent>().data();
            let reply = data.as_string().ok_or_else(|| "the signalling answer is not text".to_string());
            let _ = sender.try_send(reply);
        }
    });
    let on_error = Closure::<dyn FnMut(JsValue)>::new({
        let (mut sender, url) = (sender.clone(), url.to_string());
        move |_| {
            let _ = sender.try_send(Err(format!("the signalling WebSocket {url} failed")));
        }
    });
    let on_close = Closure::<dyn FnMut(JsValue)>::new({
        let mut sender = sender;
        move |event: JsValue| {
            let code = Reflect::get(&event, &"code".into()).ok().and_then(|c| c.as_f64()).unwrap_or(0.0);
            let _ = sender.try_send(Err(format!("the signalling WebSocket closed (code {code}) before an answer")));
        }
    });
    socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    socket.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    // Declared after the closures, so dropped before them, even when this future is dropped
    // half-way (a pause while connecting).
    let _socket = Signalling(socket);
    let reply = select! {
        reply = replies.next() => reply.unwrap_or_else(|| Err("the signalling WebSocket's handlers are gone".into())),
        _ = TimeoutFuture::new(SIGNAL_TIMEOUT_MS).fuse() => Err(format!("no signalling answer within {} s", SIGNAL_TIMEOUT_MS / 1000)),
    };
    signal::answer(&reply?)
}

/// The signalling socket: its handlers are removed and it is closed when this is dropped.
struct Signalling(WebSocket);

impl Drop for Signalling {
    fn drop(&mut self) {
        let socket = &self.0;
        socket.set_onopen(None);
        socket.set_onmessage(None);
        socket.set_onerror(None);
        socket.set_onclose(None);
        let _ = socket.close();
    }
}
