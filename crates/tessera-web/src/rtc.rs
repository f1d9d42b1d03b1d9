//! The browser's transport to the coordinator: WebSocket signalling (one offer out, one answer
//! back) and an `RTCPeerConnection` with one ordered, reliable DataChannel. What arrives comes out
//! of a bounded queue; `send` keeps to the channel's `maxMessageSize` and waits on
//! `bufferedamountlow` while too much is buffered. No protocol logic: that is `session.rs`.

use std::cell::Cell;
use std::rc::Rc;

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt, select};
use gloo_timers::future::TimeoutFuture;
use js_sys::{ArrayBuffer, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState, RtcDataChannelType,
    RtcIceGatheringState, RtcPeerConnection, RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit, WebSocket,
};

use crate::js_detail;
use crate::session::{CHANNEL_LABEL, Outgoing, answer, offer};

/// Messages off the channel waiting for the session; a coordinator that floods past this is
/// cut off.
const INCOMING: usize = 256;
/// `send` waits while more than this is buffered, until `bufferedamountlow` (at `LOW_WATER`).
const HIGH_WATER: u32 = 1 << 20;
const LOW_WATER: u32 = 256 << 10;
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

/// One connection to the coordinator. Dropping it closes the channel and the connection.
pub struct Channel {
    pc: RtcPeerConnection,
    dc: RtcDataChannel,
    incoming: mpsc::Receiver<Received>,
    low: mpsc::Receiver<()>,
    overflowed: Rc<Cell<bool>>,
    max_message: usize,
    _handlers: Vec<Handler>,
}

impl Channel {
    /// Offers a DataChannel through the signalling WebSocket at `signalling_url` and waits
    /// until it opens. The coordinator is ICE-lite and takes no trickled candidates, so the
    /// offer goes out once gathering is complete.
    pub async fn connect(signalling_url: &str) -> Result<Channel, String> {
        let mut channel = Channel::new()?;
        let description = JsFuture::from(channel.pc.create_offer()).await.map_err(|e| format!("creating the offer: {}", js_detail(&e)))?;
        let sdp = Reflect::get(&description, &"sdp".into()).ok().and_then(|sdp| sdp.as_string()).ok_or("the offer has no SDP")?;
        let local = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
        local.set_sdp(&sdp);
        JsFuture::from(channel.pc.set_local_description(&local)).await.map_err(|e| format!("setting the offer: {}", js_detail(&e)))?;
        channel.gathered().await;
        let sdp = channel.pc.local_description().map(|d| d.sdp()).ok_or("the connection has no local description")?;
        let answer = signal(signalling_url, &sdp).await?;
        let remote = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
        remote.set_sdp(&answer);
        JsFuture::from(channel.pc.set_remote_description(&remote))
            .await
            .map_err(|e| format!("the coordinator's answer was refused: {}", js_detail(&e)))?;
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
        channel.max_message = max_message_size(&channel.pc);
        Ok(channel)
    }

    /// The connection and its channel, with every handler in place.
    fn new() -> Result<Channel, String> {
        // No ICE servers: the coordinator's own address is its only candidate.
        let pc = RtcPeerConnection::new_with_configuration(&RtcConfiguration::new())
            .map_err(|e| format!("creating an RTCPeerConnection: {}", js_detail(&e)))?;
        let init = RtcDataChannelInit::new();
        init.set_ordered(true);
        let dc = pc.create_data_channel_with_data_channel_dict(CHANNEL_LABEL, &init);
        dc.set_binary_type(RtcDataChannelType::Arraybuffer);
        dc.set_buffered_amount_low_threshold(LOW_WATER);

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
            let (mut sender, push) = (sender.clone(), push.clone());
            move |event: JsValue| {
                let data = event.unchecked_into::<MessageEvent>().data();
                let received = if let Some(text) = data.as_string() {
                    Received::Text(text)
                } else if let Some(buffer) = data.dyn_ref::<ArrayBuffer>() {
                    Received::Binary(Uint8Array::new(buffer).to_vec())
                } else {
                    Received::Closed("the coordinator sent a message that is neither text nor binary".into())
                };
                push(&mut sender, received);
            }
        });
        let on_close = Handler::new({
            let (mut sender, push, mut low_sender) = (sender.clone(), push.clone(), low_sender.clone());
            move |_: JsValue| {
                push(&mut sender, Received::Closed("the coordinator closed the DataChannel".into()));
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
            let (mut sender, pc) = (sender, pc.clone());
            move |_: JsValue| {
                let state = match pc.connection_state() {
                    RtcPeerConnectionState::Failed => "failed",
                    RtcPeerConnectionState::Closed => "closed",
                    _ => return,
                };
                push(&mut sender, Received::Closed(format!("the connection to the coordinator {state}")));
            }
        });
        let function = |handler: &Handler| Some(handler.as_ref().unchecked_ref::<js_sys::Function>().clone());
        dc.set_onopen(function(&on_open).as_ref());
        dc.set_onmessage(function(&on_message).as_ref());
        dc.set_onclose(function(&on_close).as_ref());
        dc.set_onerror(function(&on_error).as_ref());
        dc.set_onbufferedamountlow(function(&on_low).as_ref());
        pc.set_onconnectionstatechange(function(&on_state).as_ref());
        Ok(Channel {
            pc,
            dc,
            incoming,
            low,
            overflowed,
            max_message: DEFAULT_MAX_MESSAGE,
            _handlers: vec![on_open, on_message, on_close, on_error, on_low, on_state],
        })
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

    /// The next message; `Closed` once the channel is gone or the coordinator sent more than
    /// the queue holds.
    pub async fn recv(&mut self) -> Received {
        if self.overflowed.get() {
            return Received::Closed(format!("the coordinator sent more than {INCOMING} messages faster than they could be handled"));
        }
        self.incoming.next().await.unwrap_or_else(|| Received::Closed("the DataChannel's handlers are gone".into()))
    }

    /// Sends one message, after waiting for the buffer to drain below the high-water mark.
    pub async fn send(&mut self, message: Outgoing) -> Result<(), String> {
        if message.len() > self.max_message {
            return Err(format!("a message of {} bytes exceeds the DataChannel's maxMessageSize of {}", message.len(), self.max_message));
        }
        while self.dc.buffered_amount() > HIGH_WATER {
            if self.dc.ready_state() != RtcDataChannelState::Open {
                return Err("the DataChannel closed".into());
            }
            // `bufferedamountlow` (or a close) wakes us; the timer covers an event that fired
            // before we listened.
            select! {
                _ = self.low.next() => {}
                _ = TimeoutFuture::new(1_000).fuse() => {}
            }
        }
        let sent = match &message {
            Outgoing::Text(text) => self.dc.send_with_str(text),
            Outgoing::Binary(bytes) => self.dc.send_with_u8_array(bytes),
        };
        sent.map_err(|e| format!("sending on the DataChannel: {}", js_detail(&e)))
    }

    /// Closes the channel once what it holds is sent (or after a grace period).
    pub async fn close_after_sending(self) {
        let started = js_sys::Date::now();
        while self.dc.buffered_amount() > 0 && self.dc.ready_state() == RtcDataChannelState::Open && js_sys::Date::now() - started < DRAIN_TIMEOUT_MS {
            TimeoutFuture::new(20).await;
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Handlers go first: a closure must never run after it is freed.
        self.dc.set_onopen(None);
        self.dc.set_onmessage(None);
        self.dc.set_onclose(None);
        self.dc.set_onerror(None);
        self.dc.set_onbufferedamountlow(None);
        self.pc.set_onconnectionstatechange(None);
        self.dc.close();
        self.pc.close();
    }
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
        let (socket, offer, mut sender) = (socket.clone(), offer(sdp), sender.clone());
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
    answer(&reply?)
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
