//! `ProtocolError`: everything that can be wrong with bytes that came off the wire.

use crate::frame::PayloadKind;
use crate::tensor::DType;

/// What was wrong with a message, a frame or a tensor. Every variant carries the values that
/// matter, so the message sent back to the peer (and logged) says exactly what was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("control message of {len} bytes exceeds the limit of {max} bytes")]
    ControlTooLarge { len: usize, max: usize },
    #[error("malformed control message: {detail}")]
    Malformed { detail: String },
    #[error("control message has no \"type\" field")]
    MissingType,
    #[error("unknown message type {found:?}; expected one of {expected:?}")]
    UnknownType {
        found: String,
        expected: &'static [&'static str],
    },
    #[error("protocol version {found} is not supported: this peer speaks version {supported}")]
    UnsupportedVersion { found: String, supported: u32 },
    #[error("invalid {kind:?} message: {detail}")]
    InvalidMessage { kind: String, detail: String },

    #[error("binary frame of {len} bytes is shorter than the {need}-byte header")]
    TruncatedHeader { len: usize, need: usize },
    #[error("binary frame has magic {found:02x?}, expected {expected:02x?}")]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("binary frame version {found} is not supported: this peer speaks version {supported}")]
    UnsupportedFrameVersion { found: u16, supported: u16 },
    #[error("binary frame has unknown payload kind {0}")]
    UnknownPayloadKind(u8),
    #[error("binary frame has reserved byte set to {0:#04x}, expected 0")]
    ReservedNonZero(u8),
    #[error("stream {stream}: chunk payload of {len} bytes exceeds the limit of {max} bytes")]
    ChunkTooLarge { stream: u64, len: usize, max: usize },
    #[error("stream {stream}: chunk index {index} is out of range for {count} chunks")]
    ChunkIndexOutOfRange { stream: u64, index: u32, count: u32 },
    #[error("stream {stream}: {total} bytes need {expected} chunks, frame says {count}")]
    ChunkCountMismatch {
        stream: u64,
        total: u64,
        count: u32,
        expected: u64,
    },
    #[error("stream {stream}: chunk {index} carries {len} bytes, expected {expected}")]
    ChunkLengthMismatch {
        stream: u64,
        index: u32,
        len: usize,
        expected: u64,
    },
    #[error("stream {stream}: message of {total} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { stream: u64, total: u64, max: u64 },
    #[error("stream {stream}: already {max} partial messages in flight")]
    TooManyPartialMessages { stream: u64, max: usize },
    #[error(
        "stream {stream}: {total} more bytes would bring buffered partial messages to {would_be} bytes, over the limit of {max}"
    )]
    BufferedBytesExceeded {
        stream: u64,
        total: u64,
        would_be: u64,
        max: u64,
    },
    #[error("stream {stream}: chunk {index} received twice")]
    DuplicateChunk { stream: u64, index: u32 },
    #[error("stream {stream}: chunk {index} disagrees with earlier chunks: {detail}")]
    InconsistentChunk {
        stream: u64,
        index: u32,
        detail: String,
    },
    #[error("payload of {len} bytes cannot be split into at most {max} chunks", max = u32::MAX)]
    PayloadTooLarge { len: u64 },
    #[error("expected a {expected:?} payload, got {found:?}")]
    WrongPayloadKind {
        expected: PayloadKind,
        found: PayloadKind,
    },

    #[error("tensor has unknown dtype code {0}")]
    UnknownDType(u8),
    #[error("tensor has rank {rank}, the maximum is {max}")]
    TensorRank { rank: usize, max: usize },
    #[error("tensor header needs {need} bytes, got {len}")]
    TensorTruncated { len: usize, need: usize },
    #[error("tensor dims {dims:?} of {dtype:?} overflow a 64-bit byte count")]
    TensorSizeOverflow { dims: Vec<u64>, dtype: DType },
    #[error("tensor dims {dims:?} of {dtype:?} need {expected} bytes, got {found}")]
    TensorLengthMismatch {
        dims: Vec<u64>,
        dtype: DType,
        expected: u64,
        found: usize,
    },
    #[error("tensor of {len} bytes exceeds the limit of {max} bytes")]
    TensorTooLarge { len: usize, max: usize },
}
