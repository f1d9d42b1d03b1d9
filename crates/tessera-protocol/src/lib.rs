//! Tessera's wire protocol, pure data: control messages (`control`), chunked binary frames
//! (`frame`) and tensors (`tensor`), and `decode`, the one entry point for bytes off the wire.
//!
//! This crate does no I/O and depends on neither tokio nor wgpu; it compiles for native targets
//! and for `wasm32-unknown-unknown`.

pub mod control;
pub mod error;
pub mod frame;
pub mod model;
pub mod tensor;

pub use control::{
    AdapterLimits, Blocks, Capabilities, ChannelPurpose, ContributorId, ContributorMessage, CoordinatorMessage, ErrorCode,
    Forward, JobId, MAX_LINKS, MAX_PREFETCH, Message, NextHop, PROTOCOL_VERSION, PayloadRef, PeerMessage,
    SignalPayload, Standby, UnitId, Work,
};
pub use error::ProtocolError;
pub use frame::{
    Chunk, Chunker, FRAME_VERSION, FrameHeader, HEADER_LEN, MAX_CHUNK_PAYLOAD, MAX_FRAME_LEN,
    Payload, PayloadKind, Reassembler, ReassemblyLimits, decode_frame,
};
pub use model::{Architecture, ModelManifest};
pub use tensor::{DType, Tensor};

/// Largest control message accepted in one text frame. Larger ones travel as a `Control`
/// payload in binary frames and go through `decode_control` with the reassembler's bound.
pub const MAX_TEXT_MESSAGE: usize = 64 * 1024;

/// A message as the transport delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A text message: JSON control.
    Text(&'a str),
    /// A binary message: one frame.
    Binary(&'a [u8]),
}

/// What `decode` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<'a, M> {
    Control(M),
    /// One chunk of a binary payload, for a `Reassembler`.
    Chunk(Chunk<'a>),
}

/// Decodes one transport message. Text must be a control message of type `M` no larger than
/// `MAX_TEXT_MESSAGE`; binary must be one well-formed frame.
pub fn decode<M: Message>(incoming: Incoming<'_>) -> Result<Decoded<'_, M>, ProtocolError> {
    match incoming {
        Incoming::Text(text) => {
            decode_control(text.as_bytes(), MAX_TEXT_MESSAGE).map(Decoded::Control)
        }
        Incoming::Binary(bytes) => decode_frame(bytes).map(Decoded::Chunk),
    }
}

/// Decodes a JSON control message of at most `max_len` bytes. The type tag and, where present,
/// the protocol version are checked first, so an unknown type or version gets its own error
/// rather than a field-level complaint.
pub fn decode_control<M: Message>(bytes: &[u8], max_len: usize) -> Result<M, ProtocolError> {
    if bytes.len() > max_len {
        return Err(ProtocolError::ControlTooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ProtocolError::Malformed {
            detail: "expected a JSON object".into(),
        });
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        protocol_version: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed {
        detail: e.to_string(),
    })?;
    let kind = match probe.kind {
        None => return Err(ProtocolError::MissingType),
        Some(serde_json::Value::String(kind)) => kind,
        Some(other) => {
            return Err(ProtocolError::Malformed {
                detail: format!("\"type\" must be a string, got {other}"),
            });
        }
    };
    if !M::TYPES.contains(&kind.as_str()) {
        return Err(ProtocolError::UnknownType {
            found: kind,
            expected: M::TYPES,
        });
    }
    if let Some(version) = probe.protocol_version
        && version.as_u64() != Some(u64::from(PROTOCOL_VERSION))
    {
        return Err(ProtocolError::UnsupportedVersion {
            found: version.to_string(),
            supported: PROTOCOL_VERSION,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| ProtocolError::InvalidMessage {
        kind,
        detail: e.to_string(),
    })
}

/// Encodes a control message as JSON text.
pub fn encode_control<M: Message>(message: &M) -> String {
    // Our message types hold only strings, numbers, sequences and string-keyed structs, which
    // serde_json always serializes; a failure here would be a bug in this crate.
    serde_json::to_string(message)
        .unwrap_or_else(|e| unreachable!("control messages serialize: {e}"))
}

#[cfg(test)]
mod tests;
