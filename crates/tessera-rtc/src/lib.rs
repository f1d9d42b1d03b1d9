//! Tessera's WebRTC transport: one reliable, ordered DataChannel per peer, over `str0m`.
//!
//! - `Endpoint` (the coordinator's side): ICE-lite on one UDP socket for every peer. It answers
//!   SDP offers (`Endpoint::accept_offer`) and demultiplexes datagrams to the peers' sans-IO
//!   `str0m::Rtc` instances in one tokio task (`driver.rs`).
//! - `connect` (a native contributor's side): a full-ICE peer that makes the offer with one
//!   DataChannel, hands it to a caller-supplied signalling function and applies the answer.
//! - `signal`: the WebSocket signalling endpoint (`signal::router`, `GET /ws`) that turns
//!   `{"type":"offer","sdp":…}` into `{"type":"answer","sdp":…}`, and its client
//!   (`signal::offer_over_websocket`).
//!
//! Both sides hand the application a `Peer`: events (`PeerEvent`) to await and a send API with
//! backpressure. Every queue is bounded; a peer that overflows one, speaks garbage or never
//! connects is closed, and no other peer notices.

mod bench;
mod client;
mod driver;
mod endpoint;
mod error;
mod peer;
pub mod signal;

pub use bench::{RoundTrip, bench_round_trip};
pub use client::connect;
pub use endpoint::{Endpoint, EndpointStats};
pub use error::RtcError;
pub use peer::{CloseReason, Message, Peer, PeerEvent, PeerId, PeerSender};

use std::time::Duration;

/// The label of the one DataChannel a Tessera peer opens.
pub const CHANNEL_LABEL: &str = "tessera";

/// Largest message `str0m` 0.24 can ever accept for sending: its send buffer across all streams
/// is fixed at 128 KiB, and a message must fit in it whole.
pub const STR0M_SEND_BUFFER: usize = 128 * 1024;

/// Limits and timeouts, the same for both sides.
#[derive(Debug, Clone)]
pub struct Config {
    /// A peer whose DataChannel is not open this long after its offer is closed.
    pub connect_timeout: Duration,
    /// Peers (connecting or connected) an `Endpoint` holds at once; more offers are refused.
    pub max_peers: usize,
    /// Largest message sent or accepted for sending, in bytes (at most `STR0M_SEND_BUFFER`).
    pub max_message: usize,
    /// Bytes a peer's sends may queue above `str0m`'s own 128 KiB buffer before `send` waits.
    pub send_buffer: usize,
    /// Bytes of received messages a peer may have waiting for the application; a peer that
    /// sends faster than the application reads is closed (`CloseReason::Overflow`).
    pub receive_buffer: usize,
    /// Events a peer may have waiting for the application (same policy).
    pub event_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            max_peers: 1024,
            max_message: STR0M_SEND_BUFFER,
            send_buffer: 1024 * 1024,
            receive_buffer: 8 * 1024 * 1024,
            event_queue: 1024,
        }
    }
}

impl Config {
    fn check(&self) -> Result<(), RtcError> {
        let problem = if self.max_message == 0 || self.max_message > STR0M_SEND_BUFFER {
            Some(format!(
                "max_message is {}, must be in 1..={STR0M_SEND_BUFFER}",
                self.max_message
            ))
        } else if self.send_buffer < self.max_message {
            Some(format!(
                "send_buffer ({}) is smaller than max_message ({})",
                self.send_buffer, self.max_message
            ))
        } else if self.receive_buffer == 0 || self.event_queue == 0 || self.max_peers == 0 {
            Some("receive_buffer, event_queue and max_peers must be non-zero".into())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(RtcError::Config(problem)),
            None => Ok(()),
        }
    }
}
