//! A safetensors reader: the JSON header (names, dtypes, shapes, byte ranges), checked against the
//! file's length, and tensors read one at a time from any `Read + Seek`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use serde::Deserialize;

use crate::error::ModelError;

/// Headers larger than this are corrupt (real ones are a few kilobytes).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range relative to the end of the header.
    pub data_offsets: [u64; 2],
}

#[derive(Clone, Debug)]
pub struct SafeTensors {
    pub tensors: BTreeMap<String, TensorEntry>,
    data_start: u64,
}

impl SafeTensors {
    pub fn read<R: Read + Seek>(file: &str, source: &mut R) -> Result<SafeTensors, ModelError> {
        let invalid = |problem: String| ModelError::invalid(file, problem);
        let io = |e: std::io::Error| invalid(format!("reading the header: {e}"));
        let len = source.seek(SeekFrom::End(0)).map_err(io)?;
        source.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut size = [0u8; 8];
        source.read_exact(&mut size).map_err(|_| invalid(format!("truncated: {len} bytes is too short for a safetensors file")))?;
        let header_len = u64::from_le_bytes(size);
        if header_len > MAX_HEADER || header_len > len - 8 {
            return Err(invalid(format!("truncated or corrupt: the header claims {header_len} bytes, the file has {len}")));
        }
        let mut header = vec![0; header_len as usize];
        source.read_exact(&mut header).map_err(io)?;
        let mut raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("the header is not valid JSON: {e}")))?;
        raw.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, value) in raw {
            let entry: TensorEntry = serde_json::from_value(value).map_err(|e| invalid(format!("tensor {name}: {e}")))?;
            let [start, end] = entry.data_offsets;
            let elements = entry.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let width = match entry.dtype.as_str() {
                "F32" | "I32" | "U32" => 4,
                "F16" | "BF16" | "I16" => 2,
                "I64" | "F64" => 8,
                "I8" | "U8" | "BOOL" => 1,
                other => return Err(invalid(format!("tensor {name} has unknown dtype {other}"))),
            };
            let expected = elements.and_then(|e| e.checked_mul(width)).map(|b| b as u64);
            if start > end || expected != Some(end - start) {
                return Err(invalid(format!("tensor {name}: bytes {start}..{end} do not hold {:?} of {}", entry.shape, entry.dtype)));
            }
            if data_start + end > len {
                return Err(invalid(format!("truncated: tensor {name} ends at byte {}, the file has {len}", data_start + end)));
            }
            tensors.insert(name, entry);
        }
        Ok(SafeTensors { tensors, data_start })
    }

    /// An f32 tensor's values, checking its shape.
    pub fn read_f32<R: Read + Seek>(&self, file: &str, source: &mut R, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::invalid(file, format!("tensor {name} is missing")))?;
        if entry.dtype != "F32" || entry.shape != shape {
            return Err(ModelError::invalid(file, format!("tensor {name} is {} {:?}, expected F32 {shape:?}", entry.dtype, entry.shape)));
        }
        let io = |e: std::io::Error| ModelError::invalid(file, format!("reading tensor {name}: {e}"));
        source.seek(SeekFrom::Start(self.data_start + entry.data_offsets[0])).map_err(io)?;
        let mut bytes = vec![0u8; (entry.data_offsets[1] - entry.data_offsets[0]) as usize];
        source.read_exact(&mut bytes).map_err(io)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
