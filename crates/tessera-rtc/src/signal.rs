//! WebSocket signalling: `router` serves `GET /ws`, where a peer sends one
//! `{"type":"offer","sdp":…}` and gets `{"type":"answer","sdp":…}` or
//! `{"type":"error","code":…,"message":…}` back, then the socket closes. `offer_over_websocket`
//! is the contributor's half.
//!
//! Garbage (not JSON, an unknown type, a binary message, more than `MAX_SIGNAL_MESSAGE` bytes,
//! no offer within `OFFER_TIMEOUT`) gets an error reply and a close; a message over four times
//! the limit is cut off by the WebSocket layer itself.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tessera_protocol::{ErrorCode, ProtocolError, decode_control, encode_control};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::tungstenite;

use crate::{Endpoint, Peer, RtcError};

/// Largest signalling message, in bytes: the protocol's limit for one text message.
pub const MAX_SIGNAL_MESSAGE: usize = tessera_protocol::MAX_TEXT_MESSAGE;

/// Messages up to this size get a `too_large` reply; larger ones end the socket at once.
const TRANSPORT_LIMIT: usize = 4 * MAX_SIGNAL_MESSAGE;

/// How long a signalling socket may stay open without sending its offer, and how long the
/// client waits for the answer.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Signalling sockets open at once; more get `503 Service Unavailable`.
pub const MAX_SESSIONS: usize = 256;

/// The signalling messages, tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SignalMessage {
    /// A peer's SDP offer with one DataChannel (contributor to coordinator).
    Offer { sdp: String },
    /// The coordinator's SDP answer.
    Answer { sdp: String },
    /// The offer was refused; the socket closes after this.
    Error { code: ErrorCode, message: String },
}

impl tessera_protocol::Message for SignalMessage {
    const TYPES: &'static [&'static str] = &["offer", "answer", "error"];
}

#[derive(Clone)]
struct Signalling {
    endpoint: Endpoint,
    accepted: mpsc::Sender<Peer>,
    sessions: Arc<Semaphore>,
}

/// `GET /ws`: every accepted peer goes to `accepted`. When that queue is full, offers are
/// refused (`internal`, "not accepting peers") rather than queued.
pub fn router(endpoint: Endpoint, accepted: mpsc::Sender<Peer>) -> Router {
    let state = Signalling {
        endpoint,
        accepted,
        sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
    };
    Router::new().route("/ws", get(upgrade)).with_state(state)
}

async fn upgrade(State(state): State<Signalling>, upgrade: WebSocketUpgrade) -> Response {
    let Ok(permit) = Arc::clone(&state.sessions).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_SESSIONS} signalling sessions are open already"),
        )
            .into_response();
    };
    upgrade
        .max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| session(socket, state, permit))
}

enum Received {
    Text(String),
    Binary,
    Failed(String),
    Gone,
}

async fn session(mut socket: WebSocket, state: Signalling, permit: OwnedSemaphorePermit) {
    let reply = match tokio::time::timeout(OFFER_TIMEOUT, next_message(&mut socket)).await {
        Err(_) => Some(error(
            ErrorCode::Malformed,
            format!("no offer within {} s", OFFER_TIMEOUT.as_secs()),
        )),
        Ok(Received::Gone) => None,
        Ok(Received::Binary) => Some(error(
            ErrorCode::Malformed,
            "expected a text message holding a JSON offer".into(),
        )),
        Ok(Received::Failed(detail)) => Some(error(ErrorCode::Malformed, detail)),
        Ok(Received::Text(text)) => Some(answer(&state, &text).await),
    };
    // The session's work is done: its place goes to the next peer before the goodbye, so a
    // client that has read its reply can count on that place being free.
    drop(permit);
    if let Some(reply) = reply {
        let _ = socket
            .send(WsMessage::Text(encode_control(&reply).into()))
            .await;
    }
    let close = CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    };
    let _ = socket.send(WsMessage::Close(Some(close))).await;
}

async fn next_message(socket: &mut WebSocket) -> Received {
    loop {
        match socket.recv().await {
            None | Some(Ok(WsMessage::Close(_))) => return Received::Gone,
            Some(Ok(WsMessage::Text(text))) => return Received::Text(text.to_string()),
            Some(Ok(WsMessage::Binary(_))) => return Received::Binary,
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            Some(Err(e)) => return Received::Failed(format!("websocket: {e}")),
        }
    }
}

async fn answer(state: &Signalling, text: &str) -> SignalMessage {
    let sdp = match decode_control::<SignalMessage>(text.as_bytes(), MAX_SIGNAL_MESSAGE) {
        Ok(SignalMessage::Offer { sdp }) => sdp,
        Ok(_) => return error(ErrorCode::Malformed, "expected an offer".into()),
        Err(e) => {
            let code = match e {
                ProtocolError::ControlTooLarge { .. } => ErrorCode::TooLarge,
                _ => ErrorCode::Malformed,
            };
            return error(code, e.to_string());
        }
    };
    let Ok(handoff) = state.accepted.clone().try_reserve_owned() else {
        return error(
            ErrorCode::Internal,
            "the coordinator is not accepting peers now".into(),
        );
    };
    match state.endpoint.accept_offer(&sdp).await {
        Ok((sdp, peer)) => {
            handoff.send(peer);
            SignalMessage::Answer { sdp }
        }
        Err(e) => {
            let code = match e {
                RtcError::OfferTooLarge { .. } => ErrorCode::TooLarge,
                RtcError::InvalidOffer(_) | RtcError::Negotiation(_) => ErrorCode::Malformed,
                _ => ErrorCode::Internal,
            };
            error(code, e.to_string())
        }
    }
}

fn error(code: ErrorCode, message: String) -> SignalMessage {
    SignalMessage::Error { code, message }
}

/// Sends `offer` to the signalling endpoint at `url` (`ws://host:port/ws`) and returns the
/// answer's SDP; an error reply comes back as `RtcError::Signalling` with its code and message.
/// Usable as `connect`'s signalling function: `|offer| offer_over_websocket(url, offer)`.
pub async fn offer_over_websocket(url: &str, offer: String) -> Result<String, RtcError> {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(TRANSPORT_LIMIT))
        .max_frame_size(Some(TRANSPORT_LIMIT));
    let signalling = async {
        let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|e| RtcError::Signalling(format!("connecting to {url}: {e}")))?;
        let offer = encode_control(&SignalMessage::Offer { sdp: offer });
        socket
            .send(tungstenite::Message::text(offer))
            .await
            .map_err(|e| RtcError::Signalling(format!("sending the offer to {url}: {e}")))?;
        let reply = loop {
            match socket.next().await {
                Some(Ok(tungstenite::Message::Text(text))) => break text,
                Some(Ok(tungstenite::Message::Binary(_))) => {
                    return Err(RtcError::Signalling(format!(
                        "{url} replied with a binary message"
                    )));
                }
                Some(Ok(tungstenite::Message::Close(_))) | None => {
                    return Err(RtcError::Signalling(format!(
                        "{url} closed without answering"
                    )));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(RtcError::Signalling(format!("{url}: {e}"))),
            }
        };
        let _ = socket.close(None).await;
        match decode_control::<SignalMessage>(reply.as_bytes(), MAX_SIGNAL_MESSAGE) {
            Ok(SignalMessage::Answer { sdp }) => Ok(sdp),
            Ok(SignalMessage::Error { code, message }) => Err(RtcError::Signalling(format!(
                "{url} refused the offer ({code:?}): {message}"
            ))),
            Ok(SignalMessage::Offer { .. }) => {
                Err(RtcError::Signalling(format!("{url} replied with an offer")))
            }
            Err(e) => Err(RtcError::Signalling(format!("{url} replied: {e}"))),
        }
    };
    tokio::time::timeout(OFFER_TIMEOUT, signalling)
        .await
        .map_err(|_| {
            RtcError::Signalling(format!(
                "{url} did not answer within {} s",
                OFFER_TIMEOUT.as_secs()
            ))
        })?
}
