//! Tensors: a shape, an element type and a GPU buffer (usually borrowed from the pool).

use std::fmt;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::pool::PooledBuffer;

/// Element types. Quantized types store 32-element blocks along the last dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    U32,
    /// GGUF Q4_1: per 32 weights an f16 scale and minimum plus 16 bytes of nibbles (20 bytes).
    Q4_1,
    /// GGUF Q8_0, repacked to an f32 scale plus 32 signed bytes (36 bytes) so blocks are word-aligned.
    Q8_0,
}

impl DType {
    /// Bytes taken by `elements` values (a multiple of the block size for quantized types).
    pub fn bytes(self, elements: usize) -> usize {
        match self {
            DType::F32 | DType::U32 => elements * 4,
            DType::Q4_1 => elements / 32 * 20,
            DType::Q8_0 => elements / 32 * 36,
        }
    }

    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 1,
            DType::Q4_1 | DType::Q8_0 => 32,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

/// Up to four dimensions, row-major. `Copy`, so shapes cost no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; 4],
    rank: u8,
}

impl Shape {
    pub const MAX_RANK: usize = 4;

    /// Panics if `dims` has more than [`Shape::MAX_RANK`] entries; use [`Shape::try_new`] for input.
    pub fn new(dims: &[usize]) -> Shape {
        Shape::try_new(dims).expect("shape rank")
    }

    pub fn try_new(dims: &[usize]) -> Result<Shape> {
        if dims.is_empty() || dims.len() > Self::MAX_RANK {
            return Err(EngineError::shape("shape", format!("rank {} is not between 1 and 4", dims.len())));
        }
        let mut all = [1; 4];
        all[..dims.len()].copy_from_slice(dims);
        Ok(Shape { dims: all, rank: dims.len() as u8 })
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank as usize]
    }

    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    pub fn elements(&self) -> usize {
        self.dims().iter().product()
    }

    /// The last dimension, the one that is contiguous in memory.
    pub fn last(&self) -> usize {
        self.dims[self.rank as usize - 1]
    }

    /// Everything but the last dimension, flattened: the number of rows.
    pub fn rows(&self) -> usize {
        self.elements() / self.last()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tensor on the GPU. Views ([`Tensor::view`]) share its buffer; dropping the last one returns
/// the buffer to the pool it came from.
#[derive(Debug)]
pub struct Tensor {
    buffer: Arc<PooledBuffer>,
    shape: Shape,
    dtype: DType,
}

impl Tensor {
    // On wasm, wgpu's handles are neither Send nor Sync (the browser's GPU is single-threaded);
    // natively they are both, and `Arc` is what lets tensors cross threads there.
    #[allow(clippy::arc_with_non_send_sync)]
    pub(crate) fn new(buffer: PooledBuffer, shape: Shape, dtype: DType) -> Tensor {
        Tensor { buffer: Arc::new(buffer), shape, dtype }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Bytes of data (the buffer may be larger: the pool rounds sizes up).
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.shape.elements()) as u64
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.buffer()
    }

    /// A handle that keeps the buffer out of the pool while it lives.
    pub(crate) fn keep_alive(&self) -> Arc<PooledBuffer> {
        self.buffer.clone()
    }

    /// The same data with another shape of the same element count (no copy).
    pub fn view(&self, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::try_new(dims)?;
        if shape.elements() != self.shape.elements() || shape.last() % self.dtype.block_size() != 0 {
            return Err(EngineError::shape("view", format!("cannot view {} as {shape}", self.shape)));
        }
        Ok(Tensor { buffer: self.buffer.clone(), shape, dtype: self.dtype })
    }

    pub(crate) fn same_buffer(&self, other: &Tensor) -> bool {
        self.buffer() == other.buffer()
    }
}
