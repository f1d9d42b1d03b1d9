//! A GGUF (v2 and v3) reader: the metadata, the tensor table and where each tensor's bytes are.
//! Reads from any `Read + Seek` (the caller opens the file, so the engine does no file I/O), checks
//! every count and offset against the file's length before allocating, and reads tensors one at a
//! time so a model never needs two full copies in memory. [`Gguf::write_subset`] writes a GGUF v3
//! file of some of a file's tensors (how span shards are made, in `shard.rs`).

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// No real tensor has more dimensions; GGML's own limit.
const MAX_DIMS: u32 = 4;
/// Strings longer than this (a key, a token, a chat template) mean a corrupt header.
const MAX_STRING: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct GgufError {
    pub file: String,
    pub problem: String,
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any unsigned or non-negative integer, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(values) => Some(values),
            _ => None,
        }
    }
}

/// GGML tensor types this reader knows the size of. Others are rejected by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl TensorType {
    fn from_id(id: u32) -> Option<TensorType> {
        Some(match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            8 => TensorType::Q8_0,
            30 => TensorType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id, as the file stores it.
    fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q4_1 => 3,
            TensorType::Q8_0 => 8,
            TensorType::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::BF16 => (1, 2),
            TensorType::Q4_0 => (32, 18),
            TensorType::Q4_1 => (32, 20),
            TensorType::Q8_0 => (32, 34),
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Absolute position of the first byte in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl Gguf {
    /// Parses the header of `source`, named `file` in errors.
    pub fn read<R: Read + Seek>(file: &str, source: &mut R) -> Result<Gguf, GgufError> {
        let fail = |problem: String| GgufError { file: file.to_string(), problem };
        let len = source.seek(SeekFrom::End(0)).map_err(|e| fail(format!("cannot seek: {e}")))?;
        source.seek(SeekFrom::Start(0)).map_err(|e| fail(format!("cannot seek: {e}")))?;
        let mut r = Reader { inner: source, position: 0, len };
        let header = parse(&mut r).map_err(fail)?;
        Ok(header)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's raw bytes.
    pub fn read_tensor<R: Read + Seek>(&self, file: &str, source: &mut R, tensor: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let fail = |e: io::Error| GgufError { file: file.to_string(), problem: format!("reading tensor {}: {e}", tensor.name) };
        source.seek(SeekFrom::Start(tensor.offset)).map_err(fail)?;
        let mut bytes = vec![0; tensor.bytes as usize];
        source.read_exact(&mut bytes).map_err(fail)?;
        Ok(bytes)
    }

    /// Writes a GGUF v3 file to `out` with `metadata` and the tensors `keep` selects, in this
    /// file's order, their bytes copied one at a time from `source` (this file, named `file` in
    /// errors). Returns the bytes written. Empty metadata arrays are written as string arrays
    /// (their element type is not kept).
    pub fn write_subset<R: Read + Seek, W: Write>(
        &self,
        file: &str,
        source: &mut R,
        metadata: &BTreeMap<String, Value>,
        keep: impl Fn(&TensorInfo) -> bool,
        out: &mut W,
    ) -> Result<u64, GgufError> {
        let fail = |e: io::Error| GgufError { file: file.to_string(), problem: format!("writing a subset: {e}") };
        let tensors: Vec<&TensorInfo> = self.tensors.iter().filter(|t| keep(t)).collect();
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).filter(|a| a.is_power_of_two()).unwrap_or(DEFAULT_ALIGNMENT);
        let mut header = Vec::new();
        header.extend(MAGIC);
        header.extend(3u32.to_le_bytes());
        header.extend((tensors.len() as u64).to_le_bytes());
        header.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend(value_type(value).to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for tensor in &tensors {
            put_string(&mut header, &tensor.name);
            header.extend((tensor.dims.len() as u32).to_le_bytes());
            for dim in &tensor.dims {
                header.extend(dim.to_le_bytes());
            }
            header.extend(tensor.ty.id().to_le_bytes());
            header.extend(offset.to_le_bytes());
            offset = (offset + tensor.bytes).next_multiple_of(alignment);
        }
        header.resize(header.len().next_multiple_of(alignment as usize), 0);
        out.write_all(&header).map_err(fail)?;
        let mut written = header.len() as u64;
        for tensor in tensors {
            let mut bytes = self.read_tensor(file, source, tensor)?;
            bytes.resize(bytes.len().next_multiple_of(alignment as usize), 0);
            out.write_all(&bytes).map_err(fail)?;
            written += bytes.len() as u64;
        }
        Ok(written)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The GGUF value type id of `value` (the inverse of `Reader::value`).
fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(v) => put_string(out, v),
        Value::Array(items) => {
            out.extend(items.first().map_or(8, value_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
}

struct Reader<'a, R> {
    inner: &'a mut R,
    position: u64,
    len: u64,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, String> {
        if n > self.len - self.position {
            return Err(format!("truncated: {what} needs {n} bytes at offset {}, the file has {}", self.position, self.len));
        }
        let mut buf = vec![0; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| format!("reading {what} at offset {}: {e}", self.position))?;
        self.position += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.bytes(N as u64, what)?;
        Ok(bytes.try_into().expect("read exactly N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(format!("{what} claims {len} bytes, more than any header string"));
        }
        String::from_utf8(self.bytes(len, what)?).map_err(|_| format!("{what} at offset {} is not UTF-8", self.position))
    }

    /// Checks that `count` items of at least `min_bytes` each can fit in what is left.
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), String> {
        if count.saturating_mul(min_bytes) > self.len - self.position {
            return Err(format!("{what} claims {count} entries, more than the file can hold"));
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(format!("{what} is a bool with byte {other}")),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(format!("{what} nests arrays, which GGUF does not use"));
                }
                let item = self.u32(what)?;
                let count = self.u64(what)?;
                self.check_count(count, 1, what)?;
                let mut values = Vec::with_capacity(count.min(1 << 20) as usize);
                for _ in 0..count {
                    values.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

fn parse<R: Read + Seek>(r: &mut Reader<'_, R>) -> Result<Gguf, String> {
    let magic: [u8; 4] = r.array("the magic number")?;
    if &magic != MAGIC {
        return Err(format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")"));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 and 3 are)"));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each metadata entry takes at least a key length and a type; each tensor entry more.
    r.check_count(kv_count, 12, "the metadata table")?;
    r.check_count(tensor_count, 24, "the tensor table")?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r.u32(&format!("the type of {key}"))?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment is {v:?}, not a power of two")),
        },
    };

    let mut infos = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&format!("the rank of {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"));
        }
        let dims = (0..n_dims).map(|_| r.u64(&format!("the shape of {name}"))).collect::<Result<Vec<_>, _>>()?;
        let type_id = r.u32(&format!("the type of {name}"))?;
        let ty = TensorType::from_id(type_id).ok_or_else(|| format!("tensor {name} has GGML type {type_id}, which is not supported"))?;
        let offset = r.u64(&format!("the offset of {name}"))?;
        infos.push((name, dims, ty, offset));
    }

    let data_start = r.position.next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, ty, offset) in infos {
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("tensor {name}'s shape {dims:?} overflows"))?;
        let (block, block_bytes) = ty.block();
        if dims[0] % block != 0 {
            return Err(format!("tensor {name} ({ty:?}) has rows of {} elements, not whole blocks of {block}", dims[0]));
        }
        let bytes = elements / block * block_bytes;
        if offset % alignment != 0 {
            return Err(format!("tensor {name} starts at data offset {offset}, not a multiple of the alignment {alignment}"));
        }
        let start = data_start.checked_add(offset).ok_or_else(|| format!("tensor {name}'s offset overflows"))?;
        match start.checked_add(bytes) {
            Some(end) if end <= r.len => {}
            _ => {
                return Err(format!(
                    "truncated: tensor {name} ({bytes} bytes at offset {start}) runs past the end of the file ({} bytes)",
                    r.len
                ));
            }
        }
        tensors.push(TensorInfo { name, dims, ty, offset: start, bytes });
    }
    Ok(Gguf { version, metadata, tensors })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// Builds a small GGUF v3 file: one string, one u32, one string array, and two tensors.
    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend(2u64.to_le_bytes()); // tensors
        out.extend(3u64.to_le_bytes()); // metadata
        string(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        string(&mut out, "llama");
        string(&mut out, "llama.block_count");
        out.extend(4u32.to_le_bytes());
        out.extend(30u32.to_le_bytes());
        string(&mut out, "tokenizer.ggml.tokens");
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        string(&mut out, "<s>");
        string(&mut out, "hi");
        // Tensor table: a [2, 32] Q4_1 tensor at 0 and a [4] f32 tensor at 64.
        string(&mut out, "blk.0.w");
        out.extend(2u32.to_le_bytes());
        out.extend(32u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        string(&mut out, "norm");
        out.extend(1u32.to_le_bytes());
        out.extend(4u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(64u64.to_le_bytes());
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend((0..40).map(|i| i as u8));
        out.resize(out.len() + 24, 0);
        out.extend([1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    fn read(bytes: &[u8]) -> Result<Gguf, GgufError> {
        Gguf::read("test.gguf", &mut Cursor::new(bytes))
    }

    #[test]
    fn reads_metadata_tensors_and_data() {
        let bytes = sample();
        let gguf = read(&bytes).unwrap();
        assert_eq!(gguf.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(gguf.get("llama.block_count").and_then(Value::as_u64), Some(30));
        assert_eq!(gguf.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len), Some(2));
        let w = gguf.tensor("blk.0.w").unwrap();
        assert_eq!((w.dims.as_slice(), w.ty, w.bytes), (&[32, 2][..], TensorType::Q4_1, 40));
        let data = gguf.read_tensor("test.gguf", &mut Cursor::new(&bytes), w).unwrap();
        assert_eq!(data, (0..40).map(|i| i as u8).collect::<Vec<_>>());
        let norm = gguf.tensor("norm").unwrap();
        let data = gguf.read_tensor("test.gguf", &mut Cursor::new(&bytes), norm).unwrap();
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&data), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn a_written_subset_reads_back_with_its_metadata_and_bytes() {
        let bytes = sample();
        let gguf = read(&bytes).unwrap();
        let mut metadata = gguf.metadata.clone();
        metadata.insert("test.values".into(), Value::Array(vec![Value::I16(-3), Value::I16(7)]));
        metadata.insert("test.flag".into(), Value::Bool(true));
        metadata.insert("test.big".into(), Value::F64(1.5e300));
        let mut out = Vec::new();
        let written = gguf.write_subset("test.gguf", &mut Cursor::new(&bytes), &metadata, |t| t.name == "norm", &mut out).unwrap();
        assert_eq!(written, out.len() as u64);
        let subset = read(&out).unwrap();
        assert_eq!(subset.metadata, metadata);
        assert_eq!(subset.tensors.len(), 1);
        let norm = subset.tensor("norm").unwrap();
        let data = subset.read_tensor("subset.gguf", &mut Cursor::new(&out), norm).unwrap();
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&data), [1.0, 2.0, 3.0, 4.0]);
        // Both tensors: each keeps its bytes, the second at an aligned offset.
        let mut both = Vec::new();
        gguf.write_subset("test.gguf", &mut Cursor::new(&bytes), &gguf.metadata, |_| true, &mut both).unwrap();
        let copy = read(&both).unwrap();
        for (a, b) in gguf.tensors.iter().zip(&copy.tensors) {
            assert_eq!((&a.name, &a.dims, a.ty, a.bytes), (&b.name, &b.dims, b.ty, b.bytes));
            assert_eq!(b.offset % DEFAULT_ALIGNMENT, 0);
            let (x, y) = (gguf.read_tensor("a", &mut Cursor::new(&bytes), a).unwrap(), copy.read_tensor("b", &mut Cursor::new(&both), b).unwrap());
            assert_eq!(x, y);
        }
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_file() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let error = read(&bytes[..len]).expect_err("a truncated file must not parse");
            assert!(error.to_string().starts_with("test.gguf: "), "{error}");
        }
    }

    /// Each corruption of the sample (offset, new bytes) and what the error must say.
    #[test]
    fn corrupt_headers_are_errors_that_say_what_is_wrong() {
        let bytes = sample();
        let find = |needle: &[u8]| bytes.windows(needle.len()).position(|w| w == needle).unwrap();
        let tensor_type_at = find(b"blk.0.w") + 7 + 4 + 16;
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, b"GGML".to_vec(), "not a GGUF file"),
            (4, 7u32.to_le_bytes().to_vec(), "version 7"),
            (8, u64::MAX.to_le_bytes().to_vec(), "tensor table claims"),
            (16, (1u64 << 40).to_le_bytes().to_vec(), "metadata table claims"),
            (find(b"general.architecture") + 20, 99u32.to_le_bytes().to_vec(), "unknown value type 99"),
            (find(b"general.architecture") + 24, u64::MAX.to_le_bytes().to_vec(), "more than any header string"),
            (tensor_type_at, 14u32.to_le_bytes().to_vec(), "GGML type 14, which is not supported"),
            (tensor_type_at + 4, 4096u64.to_le_bytes().to_vec(), "runs past the end"),
            (tensor_type_at + 4, 3u64.to_le_bytes().to_vec(), "not a multiple of the alignment"),
            (find(b"blk.0.w") + 7, 9u32.to_le_bytes().to_vec(), "9 dimensions"),
            (find(b"blk.0.w") + 11, 33u64.to_le_bytes().to_vec(), "not whole blocks of 32"),
        ];
        for (offset, patch, expected) in cases {
            let mut corrupt = bytes.clone();
            corrupt[offset..offset + patch.len()].copy_from_slice(&patch);
            let error = read(&corrupt).expect_err(expected).to_string();
            assert!(error.contains(expected), "patching offset {offset}: {error:?} does not say {expected:?}");
        }
    }
}
