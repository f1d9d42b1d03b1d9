//! `Tensor`: the wire form of a tensor (dtype, dims, little-endian bytes), validated on the way in.

use crate::error::ProtocolError;

/// Largest rank a wire tensor may have.
pub const MAX_RANK: usize = 8;

/// Element types a tensor can carry on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    U32 = 3,
    I32 = 4,
    U8 = 5,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// The dtype with this wire code.
    pub fn from_code(code: u8) -> Result<Self, ProtocolError> {
        Ok(match code {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::U32,
            4 => DType::I32,
            5 => DType::U8,
            other => return Err(ProtocolError::UnknownDType(other)),
        })
    }
}

/// A tensor as it crosses the wire: `dims` in row-major order and `data` in little-endian bytes.
/// A `Tensor` always satisfies `product(dims) * dtype.size() == data.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    dtype: DType,
    dims: Vec<u64>,
    data: Vec<u8>,
}

/// Encoded layout: dtype code (1 byte), rank (1 byte), two zero bytes, then `rank` dims as
/// little-endian u64, then the data.
const FIXED: usize = 4;

impl Tensor {
    /// A tensor from its parts; fails unless the dims describe exactly `data.len()` bytes.
    pub fn new(dtype: DType, dims: Vec<u64>, data: Vec<u8>) -> Result<Self, ProtocolError> {
        if dims.len() > MAX_RANK {
            return Err(ProtocolError::TensorRank {
                rank: dims.len(),
                max: MAX_RANK,
            });
        }
        let dims = check_len(dtype, dims, data.len())?;
        Ok(Tensor { dtype, dims, data })
    }

    /// An f32 tensor from values.
    pub fn from_f32(dims: Vec<u64>, values: &[f32]) -> Result<Self, ProtocolError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(DType::F32, dims, data)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// The little-endian element bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The elements as f32, or `None` if the dtype is not F32.
    pub fn f32_values(&self) -> Option<impl ExactSizeIterator<Item = f32> + '_> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        })
    }

    /// Bytes of the encoded form.
    pub fn encoded_len(&self) -> usize {
        FIXED + 8 * self.dims.len() + self.data.len()
    }

    /// The encoded form, sent as a `PayloadKind::Tensor` message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(self.dtype as u8);
        // Rank is at most MAX_RANK (checked in `new`), so it fits in a byte.
        out.push(self.dims.len() as u8);
        out.extend_from_slice(&[0, 0]);
        for d in &self.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out
    }

    /// Decodes the encoded form, rejecting anything longer than `max_len` bytes before copying.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Self, ProtocolError> {
        if bytes.len() > max_len {
            return Err(ProtocolError::TensorTooLarge {
                len: bytes.len(),
                max: max_len,
            });
        }
        if bytes.len() < FIXED {
            return Err(ProtocolError::TensorTruncated {
                len: bytes.len(),
                need: FIXED,
            });
        }
        let dtype = DType::from_code(bytes[0])?;
        let rank = usize::from(bytes[1]);
        if rank > MAX_RANK {
            return Err(ProtocolError::TensorRank {
                rank,
                max: MAX_RANK,
            });
        }
        let need = FIXED + 8 * rank;
        if bytes.len() < need {
            return Err(ProtocolError::TensorTruncated {
                len: bytes.len(),
                need,
            });
        }
        let dims: Vec<u64> = bytes[FIXED..need]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        let data = &bytes[need..];
        // Validate before copying the data.
        let dims = check_len(dtype, dims, data.len())?;
        Ok(Tensor {
            dtype,
            dims,
            data: data.to_vec(),
        })
    }
}

/// Gives `dims` back if they describe exactly `len` bytes of `dtype`.
fn check_len(dtype: DType, dims: Vec<u64>, len: usize) -> Result<Vec<u64>, ProtocolError> {
    let expected = byte_len(dtype, &dims)?;
    if expected != len as u64 {
        return Err(ProtocolError::TensorLengthMismatch {
            dims,
            dtype,
            expected,
            found: len,
        });
    }
    Ok(dims)
}

/// `product(dims) * dtype.size()`, overflow-checked.
fn byte_len(dtype: DType, dims: &[u64]) -> Result<u64, ProtocolError> {
    dims.iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ProtocolError::TensorSizeOverflow {
            dims: dims.to_vec(),
            dtype,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = Tensor::from_f32(vec![2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-7, f32::MAX]).unwrap();
        let bytes = t.encode();
        assert_eq!(bytes.len(), t.encoded_len());
        let back = Tensor::decode(&bytes, 1 << 20).unwrap();
        assert_eq!(back, t);
        let values: Vec<f32> = back.f32_values().unwrap().collect();
        assert_eq!(values, [1.0, -2.0, 3.5, 0.0, 1e-7, f32::MAX]);
    }

    fn encoded(dtype: u8, dims: &[u64], data_len: usize) -> Vec<u8> {
        let mut b = vec![dtype, dims.len() as u8, 0, 0];
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.resize(b.len() + data_len, 7);
        b
    }

    fn check(bytes: &[u8], expected: &str) {
        let err = Tensor::decode(bytes, 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn rejects_bad_tensors() {
        check(
            &encoded(0, &[u64::MAX, 2], 0),
            "tensor dims [18446744073709551615, 2] of F32 overflow a 64-bit byte count",
        );
        check(
            &encoded(0, &[1 << 62, 1 << 2], 0),
            "tensor dims [4611686018427387904, 4] of F32 overflow a 64-bit byte count",
        );
        check(
            &encoded(0, &[2, 3], 20),
            "tensor dims [2, 3] of F32 need 24 bytes, got 20",
        );
        check(&encoded(9, &[1], 4), "tensor has unknown dtype code 9");
        check(
            &encoded(0, &[1; 9], 4),
            "tensor has rank 9, the maximum is 8",
        );
        check(&[0, 2, 0, 0, 1], "tensor header needs 20 bytes, got 5");
        check(&[0], "tensor header needs 4 bytes, got 1");
        let big = encoded(5, &[100], 100);
        assert_eq!(
            Tensor::decode(&big, 50).unwrap_err().to_string(),
            "tensor of 112 bytes exceeds the limit of 50 bytes"
        );
        assert!(Tensor::new(DType::U8, vec![3], vec![1, 2]).is_err());
        // A scalar (rank 0) holds one element.
        assert!(Tensor::new(DType::U32, vec![], vec![1, 2, 3, 4]).is_ok());
    }
}
