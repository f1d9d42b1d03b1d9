//! Binary frames: a fixed 32-byte header plus at most 64 KiB of payload. `Chunker` splits a
//! payload into frames; `Reassembler` rebuilds payloads from frames arriving in any order, with
//! every size bounded before anything is allocated.
//!
//! Header layout (little-endian):
//!
//! | bytes  | field                                        |
//! |--------|----------------------------------------------|
//! | 0..4   | magic `b"TSRA"`                              |
//! | 4..6   | frame version (`FRAME_VERSION`)              |
//! | 6      | payload kind (`PayloadKind`)                 |
//! | 7      | reserved, must be 0                          |
//! | 8..16  | stream id (one id per payload per sender)    |
//! | 16..20 | chunk index                                  |
//! | 20..24 | chunk count                                  |
//! | 24..32 | total payload length in bytes                |
//!
//! Every chunk but the last carries exactly `MAX_CHUNK_PAYLOAD` bytes, so the count and each
//! chunk's length follow from the total, and one frame can be checked on its own.

use std::collections::HashMap;

use crate::error::ProtocolError;

pub const MAGIC: [u8; 4] = *b"TSRA";
pub const FRAME_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
/// Largest payload one frame carries (64 KiB).
pub const MAX_CHUNK_PAYLOAD: usize = 64 * 1024;
/// Largest frame on the wire.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_CHUNK_PAYLOAD;

/// What a reassembled payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadKind {
    /// An encoded `Tensor` (a unit's result, or activations between peers).
    Tensor = 0,
    /// A range of a content-addressed blob.
    Blob = 1,
    /// A control message too large for one text frame, as JSON.
    Control = 2,
}

impl PayloadKind {
    fn from_code(code: u8) -> Result<Self, ProtocolError> {
        Ok(match code {
            0 => PayloadKind::Tensor,
            1 => PayloadKind::Blob,
            2 => PayloadKind::Control,
            other => return Err(ProtocolError::UnknownPayloadKind(other)),
        })
    }
}

/// A frame's header, as decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: PayloadKind,
    pub stream: u64,
    pub index: u32,
    pub count: u32,
    pub total: u64,
}

/// One decoded frame: its header and a view of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

/// How many chunks a payload of `total` bytes takes (at least one, even when empty).
pub fn chunk_count(total: u64) -> u64 {
    total.div_ceil(MAX_CHUNK_PAYLOAD as u64).max(1)
}

/// How many bytes chunk `index` of a `total`-byte payload carries.
fn chunk_len(total: u64, index: u32) -> u64 {
    let start = u64::from(index) * MAX_CHUNK_PAYLOAD as u64;
    total.saturating_sub(start).min(MAX_CHUNK_PAYLOAD as u64)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Decodes one frame and checks it against itself: header fields, the chunk count implied by
/// the total, and this chunk's payload length.
pub fn decode_frame(bytes: &[u8]) -> Result<Chunk<'_>, ProtocolError> {
    if bytes.len() < HEADER_LEN {
        return Err(ProtocolError::TruncatedHeader {
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FRAME_VERSION {
        return Err(ProtocolError::UnsupportedFrameVersion {
            found: version,
            supported: FRAME_VERSION,
        });
    }
    let kind = PayloadKind::from_code(bytes[6])?;
    if bytes[7] != 0 {
        return Err(ProtocolError::ReservedNonZero(bytes[7]));
    }
    let header = FrameHeader {
        kind,
        stream: u64_at(bytes, 8),
        index: u32_at(bytes, 16),
        count: u32_at(bytes, 20),
        total: u64_at(bytes, 24),
    };
    let payload = &bytes[HEADER_LEN..];
    let stream = header.stream;
    if payload.len() > MAX_CHUNK_PAYLOAD {
        return Err(ProtocolError::ChunkTooLarge {
            stream,
            len: payload.len(),
            max: MAX_CHUNK_PAYLOAD,
        });
    }
    let expected = chunk_count(header.total);
    if u64::from(header.count) != expected {
        return Err(ProtocolError::ChunkCountMismatch {
            stream,
            total: header.total,
            count: header.count,
            expected,
        });
    }
    if header.index >= header.count {
        return Err(ProtocolError::ChunkIndexOutOfRange {
            stream,
            index: header.index,
            count: header.count,
        });
    }
    let expected_len = chunk_len(header.total, header.index);
    if payload.len() as u64 != expected_len {
        return Err(ProtocolError::ChunkLengthMismatch {
            stream,
            index: header.index,
            len: payload.len(),
            expected: expected_len,
        });
    }
    Ok(Chunk { header, payload })
}

/// Splits one payload into frames, in order. Each item is one complete frame.
#[derive(Debug, Clone)]
pub struct Chunker<'a> {
    kind: PayloadKind,
    stream: u64,
    payload: &'a [u8],
    count: u32,
    next: u32,
}

impl<'a> Chunker<'a> {
    pub fn new(stream: u64, kind: PayloadKind, payload: &'a [u8]) -> Result<Self, ProtocolError> {
        let count = u32::try_from(chunk_count(payload.len() as u64)).map_err(|_| {
            ProtocolError::PayloadTooLarge {
                len: payload.len() as u64,
            }
        })?;
        Ok(Chunker {
            kind,
            stream,
            payload,
            count,
            next: 0,
        })
    }

    /// Number of frames this payload takes.
    pub fn count(&self) -> u32 {
        self.count
    }
}

impl Iterator for Chunker<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.next >= self.count {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let start = index as usize * MAX_CHUNK_PAYLOAD;
        let end = (start + MAX_CHUNK_PAYLOAD).min(self.payload.len());
        let body = &self.payload[start.min(end)..end];
        let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&FRAME_VERSION.to_le_bytes());
        frame.push(self.kind as u8);
        frame.push(0);
        frame.extend_from_slice(&self.stream.to_le_bytes());
        frame.extend_from_slice(&index.to_le_bytes());
        frame.extend_from_slice(&self.count.to_le_bytes());
        frame.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(body);
        Some(frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.count - self.next) as usize;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Chunker<'_> {}

/// Bounds on what a `Reassembler` holds for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Largest payload accepted, checked on its first chunk before allocating.
    pub max_message_bytes: u64,
    /// Most payloads partly received at once.
    pub max_partial_messages: usize,
    /// Most bytes allocated for partly received payloads at once.
    pub max_buffered_bytes: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_message_bytes: 16 << 20,
            max_partial_messages: 8,
            max_buffered_bytes: 64 << 20,
        }
    }
}

/// A payload rebuilt from its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub stream: u64,
    pub kind: PayloadKind,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
struct Partial {
    kind: PayloadKind,
    total: u64,
    count: u32,
    received: u32,
    seen: Vec<u64>,
    bytes: Vec<u8>,
}

/// Rebuilds payloads from frames of one peer, in any order. An error leaves the other streams
/// untouched and drops the offending stream's partial payload; the caller normally disconnects.
#[derive(Debug, Default)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<u64, Partial>,
    buffered: u64,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            partial: HashMap::new(),
            buffered: 0,
        }
    }

    /// Payloads partly received.
    pub fn partial_messages(&self) -> usize {
        self.partial.len()
    }

    /// Bytes allocated for partly received payloads.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered
    }

    /// Forgets a partly received payload (its sender went away, or it timed out).
    pub fn abandon(&mut self, stream: u64) {
        if let Some(p) = self.partial.remove(&stream) {
            self.buffered -= p.total;
        }
    }

    /// Adds one frame; returns the payload once its last chunk arrives.
    pub fn push(&mut self, chunk: Chunk<'_>) -> Result<Option<Payload>, ProtocolError> {
        let h = chunk.header;
        if h.total > self.limits.max_message_bytes {
            self.abandon(h.stream);
            return Err(ProtocolError::MessageTooLarge {
                stream: h.stream,
                total: h.total,
                max: self.limits.max_message_bytes,
            });
        }
        if h.count == 1 && !self.partial.contains_key(&h.stream) {
            return Ok(Some(Payload {
                stream: h.stream,
                kind: h.kind,
                bytes: chunk.payload.to_vec(),
            }));
        }
        if !self.partial.contains_key(&h.stream) {
            self.start(h)?;
        }
        let result = self.fill(chunk);
        if result.is_err() {
            self.abandon(h.stream);
        }
        result
    }

    fn start(&mut self, h: FrameHeader) -> Result<(), ProtocolError> {
        if self.partial.len() >= self.limits.max_partial_messages {
            return Err(ProtocolError::TooManyPartialMessages {
                stream: h.stream,
                max: self.limits.max_partial_messages,
            });
        }
        let would_be = self.buffered.saturating_add(h.total);
        if would_be > self.limits.max_buffered_bytes {
            return Err(ProtocolError::BufferedBytesExceeded {
                stream: h.stream,
                total: h.total,
                would_be,
                max: self.limits.max_buffered_bytes,
            });
        }
        // Both bounds hold, so `total` fits in memory we agreed to spend.
        let len = usize::try_from(h.total).map_err(|_| ProtocolError::MessageTooLarge {
            stream: h.stream,
            total: h.total,
            max: self.limits.max_message_bytes,
        })?;
        self.buffered = would_be;
        self.partial.insert(
            h.stream,
            Partial {
                kind: h.kind,
                total: h.total,
                count: h.count,
                received: 0,
                seen: vec![0; (h.count as usize).div_ceil(64)],
                bytes: vec![0; len],
            },
        );
        Ok(())
    }

    fn fill(&mut self, chunk: Chunk<'_>) -> Result<Option<Payload>, ProtocolError> {
        let h = chunk.header;
        let Some(p) = self.partial.get_mut(&h.stream) else {
            return Ok(None);
        };
        let inconsistent = |detail: String| ProtocolError::InconsistentChunk {
            stream: h.stream,
            index: h.index,
            detail,
        };
        if p.kind != h.kind {
            return Err(inconsistent(format!(
                "kind {:?}, earlier {:?}",
                h.kind, p.kind
            )));
        }
        if p.total != h.total {
            return Err(inconsistent(format!(
                "total {} bytes, earlier {}",
                h.total, p.total
            )));
        }
        // `decode_frame` derived count from total, so equal totals mean equal counts, and the
        // index is below the count.
        let (word, bit) = (h.index as usize / 64, 1u64 << (h.index % 64));
        if p.seen[word] & bit != 0 {
            return Err(ProtocolError::DuplicateChunk {
                stream: h.stream,
                index: h.index,
            });
        }
        p.seen[word] |= bit;
        p.received += 1;
        let start = h.index as usize * MAX_CHUNK_PAYLOAD;
        p.bytes[start..start + chunk.payload.len()].copy_from_slice(chunk.payload);
        if p.received < p.count {
            return Ok(None);
        }
        let done = self.partial.remove(&h.stream);
        Ok(done.map(|p| {
            self.buffered -= p.total;
            Payload {
                stream: h.stream,
                kind: p.kind,
                bytes: p.bytes,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(stream: u64, len: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let frames = Chunker::new(stream, PayloadKind::Blob, &payload)
            .unwrap()
            .collect();
        (payload, frames)
    }

    fn push(r: &mut Reassembler, frame: &[u8]) -> Result<Option<Payload>, ProtocolError> {
        r.push(decode_frame(frame)?)
    }

    #[test]
    fn round_trips_in_any_order() {
        for len in [
            0,
            1,
            MAX_CHUNK_PAYLOAD - 1,
            MAX_CHUNK_PAYLOAD,
            MAX_CHUNK_PAYLOAD + 1,
            3 * MAX_CHUNK_PAYLOAD + 17,
        ] {
            let (payload, mut frames) = frames(7, len);
            assert_eq!(frames.len() as u64, chunk_count(len as u64));
            assert!(frames.iter().all(|f| f.len() <= MAX_FRAME_LEN));
            frames.reverse();
            let mut r = Reassembler::default();
            let n = frames.len();
            for (i, f) in frames.iter().enumerate() {
                let out = push(&mut r, f).unwrap();
                if i + 1 < n {
                    assert!(out.is_none());
                } else {
                    let out = out.unwrap();
                    assert_eq!((out.stream, out.kind), (7, PayloadKind::Blob));
                    assert_eq!(out.bytes, payload, "len {len}");
                }
            }
            assert_eq!((r.partial_messages(), r.buffered_bytes()), (0, 0));
        }
    }

    #[test]
    fn interleaved_streams() {
        let (pa, fa) = frames(1, 2 * MAX_CHUNK_PAYLOAD + 5);
        let (pb, fb) = frames(2, MAX_CHUNK_PAYLOAD + 9);
        let mut r = Reassembler::default();
        assert!(push(&mut r, &fa[2]).unwrap().is_none());
        assert!(push(&mut r, &fb[1]).unwrap().is_none());
        assert!(push(&mut r, &fa[0]).unwrap().is_none());
        assert_eq!(push(&mut r, &fb[0]).unwrap().unwrap().bytes, pb);
        assert_eq!(push(&mut r, &fa[1]).unwrap().unwrap().bytes, pa);
    }

    fn check(frame: &[u8], expected: &str) {
        let err = push(&mut Reassembler::default(), frame).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }

    fn header(kind: u8, stream: u64, index: u32, count: u32, total: u64) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&FRAME_VERSION.to_le_bytes());
        f.extend_from_slice(&[kind, 0]);
        f.extend_from_slice(&stream.to_le_bytes());
        f.extend_from_slice(&index.to_le_bytes());
        f.extend_from_slice(&count.to_le_bytes());
        f.extend_from_slice(&total.to_le_bytes());
        f
    }

    #[test]
    fn rejects_bad_frames() {
        check(
            &[1, 2, 3],
            "binary frame of 3 bytes is shorter than the 32-byte header",
        );
        let mut bad_magic = header(0, 1, 0, 1, 0);
        bad_magic[0] = b'X';
        check(
            &bad_magic,
            "binary frame has magic [58, 53, 52, 41], expected [54, 53, 52, 41]",
        );
        let mut bad_version = header(0, 1, 0, 1, 0);
        bad_version[4] = 9;
        check(
            &bad_version,
            "binary frame version 9 is not supported: this peer speaks version 1",
        );
        check(
            &header(7, 1, 0, 1, 0),
            "binary frame has unknown payload kind 7",
        );
        let mut reserved = header(0, 1, 0, 1, 0);
        reserved[7] = 1;
        check(
            &reserved,
            "binary frame has reserved byte set to 0x01, expected 0",
        );
        check(
            &header(0, 5, 0, 2, 10),
            "stream 5: 10 bytes need 1 chunks, frame says 2",
        );
        check(
            &header(0, 5, 0, 0, 0),
            "stream 5: 0 bytes need 1 chunks, frame says 0",
        );
        check(
            &header(0, 5, 3, 2, MAX_CHUNK_PAYLOAD as u64 + 1),
            "stream 5: chunk index 3 is out of range for 2 chunks",
        );
        let mut short = header(0, 5, 0, 1, 10);
        short.extend_from_slice(&[0; 4]);
        check(&short, "stream 5: chunk 0 carries 4 bytes, expected 10");
        let mut long = header(0, 5, 0, 1, 10);
        long.resize(HEADER_LEN + MAX_CHUNK_PAYLOAD + 1, 0);
        check(
            &long,
            "stream 5: chunk payload of 65537 bytes exceeds the limit of 65536 bytes",
        );
        // A total whose chunk count does not fit the u32 field can never be consistent.
        check(
            &header(0, 5, 0, u32::MAX, u64::MAX),
            "stream 5: 18446744073709551615 bytes need 281474976710656 chunks, frame says 4294967295",
        );
    }

    #[test]
    fn bounds_sizes_before_allocating() {
        let limits = ReassemblyLimits {
            max_message_bytes: 200_000,
            max_partial_messages: 2,
            max_buffered_bytes: 300_000,
        };
        let mut r = Reassembler::new(limits);
        // Oversized: rejected from the header of its first chunk.
        let mut huge = header(1, 9, 0, 16_384, 1 << 30);
        huge.resize(HEADER_LEN + MAX_CHUNK_PAYLOAD, 0);
        assert_eq!(
            push(&mut r, &huge).unwrap_err().to_string(),
            "stream 9: message of 1073741824 bytes exceeds the limit of 200000 bytes"
        );
        let (_, a) = frames(1, 150_000);
        let (_, b) = frames(2, 150_000);
        let (_, c) = frames(3, 10);
        let (_, d) = frames(4, 150_000);
        push(&mut r, &a[0]).unwrap();
        push(&mut r, &b[0]).unwrap();
        // A single-chunk payload needs no buffer, so it passes even at the limit.
        assert!(push(&mut r, &c[0]).unwrap().is_some());
        assert_eq!(
            push(&mut r, &d[0]).unwrap_err().to_string(),
            "stream 4: already 2 partial messages in flight"
        );
        r.abandon(2);
        let mut r2 = Reassembler::new(ReassemblyLimits {
            max_partial_messages: 8,
            ..limits
        });
        push(&mut r2, &a[0]).unwrap();
        push(&mut r2, &b[0]).unwrap();
        assert_eq!(
            push(&mut r2, &d[0]).unwrap_err().to_string(),
            "stream 4: 150000 more bytes would bring buffered partial messages to 450000 bytes, over the limit of 300000"
        );
    }

    #[test]
    fn duplicate_and_inconsistent_chunks_are_errors() {
        let (_, f) = frames(1, 3 * MAX_CHUNK_PAYLOAD);
        let mut r = Reassembler::default();
        push(&mut r, &f[1]).unwrap();
        assert_eq!(
            push(&mut r, &f[1]).unwrap_err().to_string(),
            "stream 1: chunk 1 received twice"
        );
        // The offending stream was dropped, with its buffer.
        assert_eq!((r.partial_messages(), r.buffered_bytes()), (0, 0));

        push(&mut r, &f[0]).unwrap();
        let (_, other_total) = frames(1, 3 * MAX_CHUNK_PAYLOAD - 1);
        assert_eq!(
            push(&mut r, &other_total[1]).unwrap_err().to_string(),
            "stream 1: chunk 1 disagrees with earlier chunks: total 196607 bytes, earlier 196608"
        );
        push(&mut r, &f[0]).unwrap();
        let mut other_kind = f[2].clone();
        other_kind[6] = PayloadKind::Tensor as u8;
        assert_eq!(
            push(&mut r, &other_kind).unwrap_err().to_string(),
            "stream 1: chunk 2 disagrees with earlier chunks: kind Tensor, earlier Blob"
        );
    }
}
