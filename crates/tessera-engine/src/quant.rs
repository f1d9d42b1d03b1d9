//! Quantized block formats on the CPU side: GGUF's Q4_1 and Q8_0, the repacking of Q8_0 into
//! the engine's word-aligned layout, and dequantization (for references and tests).

use half::f16;

use crate::error::{EngineError, Result};

pub const BLOCK: usize = 32;
/// GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles. The engine uses it as is.
pub const Q4_1_BYTES: usize = 20;
/// GGUF Q8_0 block: f16 scale, 32 signed bytes.
pub const Q8_0_GGUF_BYTES: usize = 34;
/// The engine's Q8_0 block: f32 scale, 32 signed bytes, so every block is word-aligned.
pub const Q8_0_BYTES: usize = 36;

fn blocks(op: &'static str, len: usize, block_bytes: usize) -> Result<usize> {
    if !len.is_multiple_of(block_bytes) {
        return Err(EngineError::shape(op, format!("{len} bytes is not a whole number of {block_bytes}-byte blocks")));
    }
    Ok(len / block_bytes)
}

/// Quantizes to GGUF Q4_1 the way ggml's reference quantizer does. `values.len()` must be a
/// multiple of 32.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(BLOCK), "Q4_1 quantizes whole blocks of 32");
    let mut out = Vec::with_capacity(values.len() / BLOCK * Q4_1_BYTES);
    for block in values.chunks_exact(BLOCK) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        for i in 0..BLOCK / 2 {
            let q = |x: f32| (((x - min) * inverse + 0.5) as u8).min(15);
            out.push(q(block[i]) | (q(block[i + BLOCK / 2]) << 4));
        }
    }
    out
}

/// Quantizes to GGUF Q8_0 (34-byte blocks) as ggml's reference quantizer does.
pub fn quantize_q8_0_gguf(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(BLOCK), "Q8_0 quantizes whole blocks of 32");
    let mut out = Vec::with_capacity(values.len() / BLOCK * Q8_0_GGUF_BYTES);
    for block in values.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * inverse).round() as i8 as u8));
    }
    out
}

/// GGUF Q8_0 (34-byte blocks) to the engine's 36-byte blocks. The f16 scale widens exactly.
pub fn repack_q8_0(gguf: &[u8]) -> Result<Vec<u8>> {
    let count = blocks("repack_q8_0", gguf.len(), Q8_0_GGUF_BYTES)?;
    let mut out = Vec::with_capacity(count * Q8_0_BYTES);
    for block in gguf.chunks_exact(Q8_0_GGUF_BYTES) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&block[2..]);
    }
    Ok(out)
}

/// Q4_1 blocks to f32.
pub fn dequantize_q4_1(bytes: &[u8]) -> Result<Vec<f32>> {
    blocks("dequantize_q4_1", bytes.len(), Q4_1_BYTES)?;
    let mut out = Vec::with_capacity(bytes.len() / Q4_1_BYTES * BLOCK);
    for block in bytes.chunks_exact(Q4_1_BYTES) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        let qs = &block[4..];
        out.extend(qs.iter().map(|q| d * f32::from(q & 0xf) + m));
        out.extend(qs.iter().map(|q| d * f32::from(q >> 4) + m));
    }
    Ok(out)
}

/// The engine's repacked Q8_0 blocks to f32.
pub fn dequantize_q8_0(bytes: &[u8]) -> Result<Vec<f32>> {
    blocks("dequantize_q8_0", bytes.len(), Q8_0_BYTES)?;
    let mut out = Vec::with_capacity(bytes.len() / Q8_0_BYTES * BLOCK);
    for block in bytes.chunks_exact(Q8_0_BYTES) {
        let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        out.extend(block[4..].iter().map(|&q| d * f32::from(q as i8)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_round_trip_is_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0).collect();
        let back = dequantize_q4_1(&quantize_q4_1(&values)).unwrap();
        for (block, back) in values.chunks(32).zip(back.chunks(32)) {
            let step = (block.iter().copied().fold(f32::MIN, f32::max) - block.iter().copied().fold(f32::MAX, f32::min)) / 15.0;
            for (x, y) in block.iter().zip(back) {
                assert!((x - y).abs() <= step * 0.5 + 1e-2, "{x} came back as {y}");
            }
        }
    }

    #[test]
    fn q8_0_repack_keeps_values() {
        let values: Vec<f32> = (0..96).map(|i| (i as f32 - 40.0) / 9.0).collect();
        let gguf = quantize_q8_0_gguf(&values);
        assert_eq!(gguf.len(), 3 * Q8_0_GGUF_BYTES);
        let back = dequantize_q8_0(&repack_q8_0(&gguf).unwrap()).unwrap();
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= 60.0 / 9.0 / 127.0, "{x} came back as {y}");
        }
    }

    #[test]
    fn partial_blocks_are_errors() {
        assert!(repack_q8_0(&[0; 35]).is_err());
        assert!(dequantize_q4_1(&[0; 21]).is_err());
        assert!(dequantize_q8_0(&[0; 35]).is_err());
    }
}
