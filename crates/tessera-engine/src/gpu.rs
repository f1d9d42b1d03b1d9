//! The GPU context: finding an adapter (kept apart from the work, so tests and embedders can hand
//! in their own device), uploads, readback and the limits every op checks against.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{EngineError, Result};
use crate::pool::{BufferPool, PoolStats, PooledBuffer};
use crate::shaders::PipelineCache;
use crate::tensor::{DType, Shape, Tensor};

/// What a contributor reports about its adapter.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

/// Work sent to the device since the `Gpu` was made: what benchmarks count per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuCounters {
    /// Queue submissions: batches and readbacks.
    pub submits: u64,
    /// Kernels dispatched by submitted batches.
    pub dispatches: u64,
    /// Buffer-to-buffer copies recorded by submitted batches (KV-cache appends).
    pub copies: u64,
    /// Tensors copied back to the CPU.
    pub readbacks: u64,
    /// Bytes of weights uploaded, which live outside the pool.
    pub weight_bytes: u64,
}

#[derive(Default)]
struct Counters {
    submits: AtomicU64,
    dispatches: AtomicU64,
    copies: AtomicU64,
    readbacks: AtomicU64,
    weight_bytes: AtomicU64,
}

/// A device and queue with the engine's pipeline cache and buffer pool.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: AdapterSummary,
    pipelines: PipelineCache,
    pool: BufferPool,
    errors: Arc<Mutex<Vec<String>>>,
    counters: Counters,
}

const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    /// Finds the default adapter and opens a device with all of its limits.
    pub async fn request() -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        // Timestamps let benchmarks (and peers such as burn) time kernels on the GPU.
        let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SHADER_F16;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("tessera"),
                required_features: adapter.features() & wanted,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::RequestDevice { adapter: info.name.clone(), reason: e.to_string() })?;
        Ok(Gpu::from_device(device, queue, &info))
    }

    /// Wraps a device the caller opened. Uncaptured device errors are recorded (see
    /// [`Gpu::take_device_errors`]) instead of wgpu's default, which panics.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: &wgpu::AdapterInfo) -> Gpu {
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(error.to_string());
        }));
        Gpu {
            pipelines: PipelineCache::new(device.clone()),
            pool: BufferPool::new(device.clone()),
            adapter: AdapterSummary {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            },
            device,
            queue,
            errors,
            counters: Counters::default(),
        }
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Submissions, dispatches, copies and readbacks so far; the difference between two readings
    /// is what the work in between cost.
    pub fn counters(&self) -> GpuCounters {
        let c = &self.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        GpuCounters {
            submits: read(&c.submits),
            dispatches: read(&c.dispatches),
            copies: read(&c.copies),
            readbacks: read(&c.readbacks),
            weight_bytes: read(&c.weight_bytes),
        }
    }

    /// Counts a batch's kernels and copies as it is submitted.
    pub(crate) fn count_batch(&self, dispatches: u32, copies: u32) {
        self.counters.dispatches.fetch_add(u64::from(dispatches), Ordering::Relaxed);
        self.counters.copies.fetch_add(u64::from(copies), Ordering::Relaxed);
    }

    /// Frees the pool's idle buffers.
    pub fn trim_pool(&self) {
        self.pool.trim();
    }

    /// Device errors that reached no error scope since the last call. The ops validate their
    /// inputs, so anything here is an engine bug or a lost device.
    pub fn take_device_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.errors.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn pipelines(&self) -> &PipelineCache {
        &self.pipelines
    }

    pub(crate) fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Checks that a buffer of `bytes` can be created and bound as storage on this device.
    pub fn check_size(&self, op: &'static str, bytes: u64) -> Result<()> {
        let limits = self.device.limits();
        if bytes > limits.max_buffer_size {
            return Err(EngineError::TooLarge { op, bytes, limit: limits.max_buffer_size, which: "max_buffer_size" });
        }
        let binding = limits.max_storage_buffer_binding_size;
        if bytes > binding {
            return Err(EngineError::TooLarge { op, bytes, limit: binding, which: "max_storage_buffer_binding_size" });
        }
        Ok(())
    }

    fn shape_for(op: &'static str, dims: &[usize], dtype: DType) -> Result<Shape> {
        let shape = Shape::try_new(dims)?;
        if shape.elements() == 0 {
            return Err(EngineError::shape(op, format!("shape {shape} has no elements")));
        }
        if shape.last() % dtype.block_size() != 0 {
            return Err(EngineError::shape(
                op,
                format!("{dtype:?} needs the last dimension to be a multiple of {}, got shape {shape}", dtype.block_size()),
            ));
        }
        Ok(shape)
    }

    /// An uninitialised tensor from the pool.
    pub fn empty(&self, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let shape = Self::shape_for("empty", dims, dtype)?;
        let bytes = dtype.bytes(shape.elements()) as u64;
        self.check_size("empty", bytes)?;
        Ok(Tensor::new(self.pool.acquire(bytes, TENSOR_USAGE), shape, dtype))
    }

    /// The shape of `dims` after checking that `data` is exactly its bytes in `dtype`'s layout.
    fn shape_of_data(op: &'static str, dims: &[usize], dtype: DType, data: &[u8]) -> Result<Shape> {
        let shape = Self::shape_for(op, dims, dtype)?;
        let expected = dtype.bytes(shape.elements());
        if data.len() != expected {
            return Err(EngineError::shape(op, format!("{dtype:?} tensor of shape {shape} takes {expected} bytes, got {}", data.len())));
        }
        Ok(shape)
    }

    /// A tensor holding `data`, which must be exactly the bytes of `dims` in `dtype`'s layout
    /// (for Q8_0, the repacked layout of [`crate::quant::repack_q8_0`]).
    pub fn upload(&self, dims: &[usize], dtype: DType, data: &[u8]) -> Result<Tensor> {
        Self::shape_of_data("upload", dims, dtype, data)?;
        let tensor = self.empty(dims, dtype)?;
        self.queue.write_buffer(tensor.buffer(), 0, data);
        Ok(tensor)
    }

    /// Like [`Gpu::upload`], but the buffer has exactly the data's size and never returns to the
    /// pool: for weights, which live as long as the model.
    pub fn upload_weights(&self, dims: &[usize], dtype: DType, data: &[u8]) -> Result<Tensor> {
        let shape = Self::shape_of_data("upload_weights", dims, dtype, data)?;
        self.check_size("upload_weights", data.len() as u64)?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tessera weights"),
            size: (data.len() as u64).next_multiple_of(4),
            usage: TENSOR_USAGE,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, data);
        self.counters.weight_bytes.fetch_add(buffer.size(), Ordering::Relaxed);
        Ok(Tensor::new(PooledBuffer::unpooled(buffer), shape, dtype))
    }

    pub fn upload_f32(&self, dims: &[usize], data: &[f32]) -> Result<Tensor> {
        self.upload(dims, DType::F32, bytemuck::cast_slice(data))
    }

    pub fn upload_u32(&self, dims: &[usize], data: &[u32]) -> Result<Tensor> {
        self.upload(dims, DType::U32, bytemuck::cast_slice(data))
    }

    /// Overwrites a tensor's contents, e.g. with NaN to poison an output before a test.
    pub fn write(&self, tensor: &Tensor, data: &[u8]) -> Result<()> {
        if data.len() as u64 != tensor.bytes() {
            return Err(EngineError::shape(
                "write",
                format!("tensor of shape {} holds {} bytes, got {}", tensor.shape(), tensor.bytes(), data.len()),
            ));
        }
        self.queue.write_buffer(tensor.buffer(), 0, data);
        Ok(())
    }

    pub(crate) fn submit(&self, commands: wgpu::CommandBuffer) -> wgpu::SubmissionIndex {
        self.counters.submits.fetch_add(1, Ordering::Relaxed);
        self.queue.submit([commands])
    }

    /// Copies a tensor back to the CPU as raw bytes.
    pub async fn read_bytes(&self, tensor: &Tensor) -> Result<Vec<u8>> {
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        let staging = self.record_readback(&mut encoder, tensor);
        self.submit(encoder.finish());
        self.finish_readback(staging, tensor).await
    }

    /// Records a copy of `tensor` into a mappable buffer, for [`Gpu::finish_readback`] once the
    /// commands are submitted.
    pub(crate) fn record_readback(&self, encoder: &mut wgpu::CommandEncoder, tensor: &Tensor) -> PooledBuffer {
        let bytes = tensor.bytes().next_multiple_of(4);
        let staging = self.pool.acquire(bytes, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        encoder.copy_buffer_to_buffer(tensor.buffer(), 0, staging.buffer(), 0, bytes);
        self.counters.readbacks.fetch_add(1, Ordering::Relaxed);
        staging
    }

    /// Maps a staging buffer filled by [`Gpu::record_readback`] and returns `tensor`'s bytes.
    pub(crate) async fn finish_readback(&self, staging: PooledBuffer, tensor: &Tensor) -> Result<Vec<u8>> {
        let bytes = tensor.bytes().next_multiple_of(4);
        let failed = |reason: String| EngineError::Readback { shape: tensor.shape(), reason };
        let (sender, receiver) = futures::channel::oneshot::channel();
        staging.buffer().map_async(wgpu::MapMode::Read, 0..bytes, move |result| {
            // The receiver only goes away if the caller gave up waiting.
            let _ = sender.send(result);
        });
        // Native backends need polling to make progress; the browser calls back by itself.
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| failed(e.to_string()))?;
        receiver
            .await
            .map_err(|_| failed("the device was lost before the map completed".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let data = {
            let view = staging.buffer().get_mapped_range(0..bytes).map_err(|e| failed(e.to_string()))?;
            view[..tensor.bytes() as usize].to_vec()
        };
        staging.buffer().unmap();
        Ok(data)
    }

    pub async fn read_f32(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        if tensor.dtype() != DType::F32 {
            return Err(EngineError::DType { op: "read_f32", what: "tensor", got: tensor.dtype(), expected: "F32" });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(tensor).await?))
    }

    /// Waits until all submitted work has finished (natively; a no-op in the browser, where
    /// awaiting a readback is the way to wait).
    pub fn wait_idle(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| EngineError::Device(e.to_string()))?;
        Ok(())
    }
}
