//! `RtcError`: what can go wrong setting up or using a peer.

use std::net::SocketAddr;

use crate::peer::PeerId;

#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("binding UDP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot advertise {0} as an ICE candidate: bind to a specific address")]
    Candidate(SocketAddr),
    #[error("the crypto provider could not generate a DTLS certificate")]
    Certificate,
    #[error("SDP offer of {len} bytes exceeds the limit of {max} bytes")]
    OfferTooLarge { len: usize, max: usize },
    #[error("invalid SDP offer: {0}")]
    InvalidOffer(String),
    #[error("invalid SDP answer: {0}")]
    InvalidAnswer(String),
    #[error("SDP negotiation failed: {0}")]
    Negotiation(String),
    #[error("endpoint is full: {max} peers already")]
    Full { max: usize },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("empty messages cannot be sent: str0m 0.24 would send an empty SCTP DATA chunk")]
    EmptyMessage,
    #[error("peer {0} is closed")]
    Closed(PeerId),
    #[error("peer {peer} closed before its DataChannel opened: {reason}")]
    NotOpened {
        peer: PeerId,
        reason: crate::peer::CloseReason,
    },
    #[error("the transport task has stopped")]
    Stopped,
    #[error("signalling failed: {0}")]
    Signalling(String),
}
