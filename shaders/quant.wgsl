// Quantized weight blocks, 32 weights each, read as u32 words.
//
// Q4_1 is GGUF's own layout (20 bytes, already word-aligned): word 0 holds the f16 scale `d`
// (low half) and f16 minimum `m` (high half); words 1..5 hold 16 bytes of nibbles. Byte i's
// low nibble is weight i and its high nibble weight 16 + i; weight = d * q + m.
//
// Q8_0 is repacked at load from GGUF's 34-byte blocks into 36 bytes: word 0 is the scale `d`
// as f32, words 1..9 hold the 32 signed bytes; weight = d * q.

const Q4_1_WORDS: u32 = 5u;
const Q8_0_WORDS: u32 = 9u;

// Values of the `FORMAT` override constant in the families that read blocks.
const FORMAT_Q4_1: u32 = 0u;
const FORMAT_Q8_0: u32 = 1u;

// The four weights in the low nibbles of a word: weights 4j..4j+4 of the block for word j.
fn nibbles_low(q: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(0xfu));
}

// The four weights in the high nibbles of a word: weights 16+4j..16+4j+4 for word j.
fn nibbles_high(q: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u)) & vec4<u32>(0xfu));
}

// The four signed bytes of a word, low byte first.
fn signed_bytes(q: u32) -> vec4<f32> {
    let s = bitcast<i32>(q);
    return vec4<f32>(
        f32(extractBits(s, 0u, 8u)),
        f32(extractBits(s, 8u, 8u)),
        f32(extractBits(s, 16u, 8u)),
        f32(extractBits(s, 24u, 8u)),
    );
}
