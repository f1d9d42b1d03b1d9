//! Tessera's compute engine: WGSL kernels on `wgpu`, the same code natively and in the browser.
//!
//! - [`Gpu`] wraps a caller's `wgpu::Device` and `Queue` ([`Gpu::request`] finds one) together
//!   with the pipeline cache and the buffer pool.
//! - [`Tensor`] is a shape, a dtype and a pooled GPU buffer.
//! - [`Batch`] records kernels; `Batch::submit` sends them in one queue submission.
//!   The ops (`Batch::matmul`, `Batch::linear`, `Batch::attention`, ...) check shapes and dtypes
//!   and return [`EngineError`] rather than letting a GPU validation error through.
//! - [`reference`] holds a CPU version of every kernel, [`checks`] compares the two.
//! - [`score::matmul_score`] is the speed a contributor reports.
//! - [`shard`] cuts a model into the span shards contributors download; [`stage`] runs a span
//!   (with a KV cache per session) or the embedding and head, hidden states in and out.

mod batch;
pub mod bert;
pub mod cache;
pub mod checks;
pub mod cid;
mod error;
mod fused;
pub mod gguf;
mod gpu;
pub mod generate;
pub mod llama;
mod ops;
mod pool;
pub mod quant;
pub mod safetensors;
pub mod reference;
mod rng;
pub mod score;
pub mod shard;
pub mod stage;
pub mod shaders;
mod tensor;
#[cfg(not(target_arch = "wasm32"))]
pub mod tokenizer;

pub use batch::Batch;
pub use error::{EngineError, ModelError, Result};
pub use gpu::{AdapterSummary, Gpu, GpuCounters};
pub use ops::{AttentionParams, Layout};
pub use pool::PoolStats;
pub use rng::Rng;
pub use tensor::{DType, Shape, Tensor};
