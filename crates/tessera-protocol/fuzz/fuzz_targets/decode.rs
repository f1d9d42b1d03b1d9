//! Fuzz target: any bytes through `decode` (as text and as a binary frame), a bounded
//! `Reassembler` and `Tensor::decode` must give a value or an error, never a panic.
//! Run with `cargo fuzz run decode` from `crates/tessera-protocol`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_protocol::{
    ContributorMessage, CoordinatorMessage, Decoded, Incoming, Reassembler, ReassemblyLimits,
    Tensor, decode,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode::<ContributorMessage>(Incoming::Text(text));
        let _ = decode::<CoordinatorMessage>(Incoming::Text(text));
    }
    let limits = ReassemblyLimits {
        max_message_bytes: 1 << 20,
        max_partial_messages: 4,
        max_buffered_bytes: 4 << 20,
    };
    let mut reassembler = Reassembler::new(limits);
    // Several frames per input: split on a separator so chunks of one stream can meet.
    for frame in data.split(|&b| b == 0xA5) {
        if let Ok(Decoded::Chunk(chunk)) = decode::<ContributorMessage>(Incoming::Binary(frame))
            && let Ok(Some(payload)) = reassembler.push(chunk)
        {
            let _ = Tensor::decode(&payload.bytes, 1 << 20);
        }
    }
    let _ = Tensor::decode(data, 1 << 20);
});
