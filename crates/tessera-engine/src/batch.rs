//! Recording kernels into one command buffer. Ops (in `ops.rs`) validate, then call
//! [`Batch::dispatch`]; [`Batch::submit`] writes every dispatch's parameters and submits once.

use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::pool::PooledBuffer;
use crate::shaders::Kernel;
use crate::tensor::Tensor;

/// Each dispatch's parameters take one slot of a shared uniform buffer. 256 bytes is the
/// largest `min_uniform_buffer_offset_alignment` WebGPU allows, so every slot is aligned.
const PARAMS_SLOT: u64 = 256;
const SLOTS_PER_BUFFER: u64 = 64;

/// Workgroups per dispatch dimension that every WebGPU adapter supports.
const MAX_WORKGROUPS_PER_DIMENSION: u32 = 65_535;

/// A sequence of kernels recorded for one submission.
pub struct Batch<'g> {
    gpu: &'g Gpu,
    encoder: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    /// Parameter buffers and the bytes to write into each at submit.
    params: Vec<(PooledBuffer, Vec<u8>)>,
    /// Every tensor buffer recorded so far, kept out of the pool until the batch is submitted
    /// (see `pool.rs`).
    bound: Vec<Arc<PooledBuffer>>,
    /// Temporaries handed out by [`Batch::scratch`].
    scratch: Vec<(&'static str, Tensor)>,
    dispatches: u32,
    copies: u32,
}

impl Gpu {
    /// Starts recording kernels.
    pub fn batch(&self) -> Batch<'_> {
        let encoder = self.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("tessera batch") });
        Batch { gpu: self, encoder, pass: None, params: Vec::new(), bound: Vec::new(), scratch: Vec::new(), dispatches: 0, copies: 0 }
    }
}

impl<'g> Batch<'g> {
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// A temporary for an op that needs one: the same tensor each time this batch is asked for
    /// `name` with these dims (F32). Kernels run in recording order, so an op may reuse its
    /// temporaries across calls, as a model's blocks do; an op must give each of its
    /// temporaries its own name, and not keep them past its return.
    pub(crate) fn scratch(&mut self, name: &'static str, dims: &[usize]) -> Result<Tensor> {
        if let Some((_, t)) = self.scratch.iter().find(|(n, t)| *n == name && t.dims() == dims) {
            return t.view(dims);
        }
        let t = self.gpu.empty(dims, crate::tensor::DType::F32)?;
        let handle = t.view(dims)?;
        self.scratch.push((name, t));
        Ok(handle)
    }

    /// Kernels recorded so far.
    pub fn dispatches(&self) -> u32 {
        self.dispatches
    }

    /// Records `kernel` on a grid of workgroups (see [`linear_grid`]). `tensors` follow
    /// `kernel.bindings()`.
    pub(crate) fn dispatch<P: bytemuck::Pod>(&mut self, kernel: Kernel, params: &P, tensors: &[&Tensor], grid: (u32, u32)) {
        self.dispatch_layers(kernel, params, tensors, grid, 1);
    }

    /// [`Batch::dispatch`] with `layers` copies of the grid along z: kernels that take one row
    /// of their input per layer (the matvec family over a few rows).
    pub(crate) fn dispatch_layers<P: bytemuck::Pod>(&mut self, kernel: Kernel, params: &P, tensors: &[&Tensor], grid: (u32, u32), layers: u32) {
        debug_assert!((1..=MAX_WORKGROUPS_PER_DIMENSION).contains(&layers));
        let bindings = kernel.bindings();
        debug_assert_eq!(bindings.len(), tensors.len(), "{kernel:?} binds {} tensors", bindings.len());
        let compiled = self.gpu.pipelines().get(kernel);
        let (buffer, offset) = self.params_slot(bytemuck::bytes_of(params));

        let mut entries = Vec::with_capacity(tensors.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &buffer,
                offset,
                size: wgpu::BufferSize::new(PARAMS_SLOT),
            }),
        });
        self.bound.extend(tensors.iter().map(|t| t.keep_alive()));
        for (&(binding, _), tensor) in bindings.iter().zip(tensors) {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: tensor.buffer(),
                    offset: 0,
                    size: wgpu::BufferSize::new(tensor.bytes().next_multiple_of(4)),
                }),
            });
        }
        let bind_group = self.gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry_point()),
            layout: &compiled.layout,
            entries: &entries,
        });

        let (x, y) = grid;
        debug_assert!(x <= MAX_WORKGROUPS_PER_DIMENSION && y <= MAX_WORKGROUPS_PER_DIMENSION);
        let pass = self.pass.get_or_insert_with(|| {
            self.encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("tessera"), timestamp_writes: None })
                .forget_lifetime()
        });
        pass.set_pipeline(&compiled.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, layers);
        self.dispatches += 1;
    }

    /// Copies `elements` values from `source` (starting at element `source_offset`) into `target`
    /// (at element `target_offset`): KV-cache appends, picking a row out of a batch.
    pub fn copy(&mut self, source: &Tensor, source_offset: usize, target: &Tensor, target_offset: usize, elements: usize) -> Result<()> {
        let op = "copy";
        if source.dtype() != target.dtype() || source.dtype().is_quantized() {
            return Err(EngineError::shape(op, format!("cannot copy {:?} into {:?}", source.dtype(), target.dtype())));
        }
        let fits = |offset: usize, tensor: &Tensor| offset.checked_add(elements).is_some_and(|end| end <= tensor.shape().elements());
        if elements == 0 || !fits(source_offset, source) || !fits(target_offset, target) || source.same_buffer(target) {
            return Err(EngineError::shape(
                op,
                format!(
                    "{elements} elements from {source_offset} of {} to {target_offset} of {} (distinct tensors, in bounds)",
                    source.shape(),
                    target.shape()
                ),
            ));
        }
        self.pass = None;
        self.bound.extend([source.keep_alive(), target.keep_alive()]);
        let bytes = source.dtype().bytes(1) as u64;
        self.encoder.copy_buffer_to_buffer(
            source.buffer(),
            source_offset as u64 * bytes,
            target.buffer(),
            target_offset as u64 * bytes,
            elements as u64 * bytes,
        );
        self.copies += 1;
        Ok(())
    }

    /// Returns a params buffer and the offset of a fresh slot holding `bytes`.
    fn params_slot(&mut self, bytes: &[u8]) -> (wgpu::Buffer, u64) {
        debug_assert!(bytes.len() as u64 <= PARAMS_SLOT);
        let full = self.params.last().is_none_or(|(_, data)| data.len() as u64 >= PARAMS_SLOT * SLOTS_PER_BUFFER);
        if full {
            let buffer = self.gpu.pool().acquire(
                PARAMS_SLOT * SLOTS_PER_BUFFER,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            );
            self.params.push((buffer, Vec::with_capacity((PARAMS_SLOT * SLOTS_PER_BUFFER) as usize)));
        }
        let (buffer, data) = self.params.last_mut().expect("a params buffer was just ensured");
        let offset = data.len() as u64;
        data.extend_from_slice(bytes);
        data.resize((offset + PARAMS_SLOT) as usize, 0);
        (buffer.buffer().clone(), offset)
    }

    /// Sends everything recorded, and a copy of `tensor` back to the CPU, as one queue
    /// submission, and returns `tensor`'s contents once the work is done: a decode step's one
    /// submission.
    pub async fn submit_and_read(mut self, tensor: &Tensor) -> Result<Vec<u8>> {
        self.pass = None;
        self.bound.push(tensor.keep_alive());
        let gpu = self.gpu;
        let staging = gpu.record_readback(&mut self.encoder, tensor);
        self.submit();
        gpu.finish_readback(staging, tensor).await
    }

    /// Sends everything recorded as one queue submission. The buffers it used return to the
    /// pool (if nothing else holds them) only after this.
    pub fn submit(mut self) -> wgpu::SubmissionIndex {
        self.pass = None;
        for (buffer, data) in &self.params {
            self.gpu.queue().write_buffer(buffer.buffer(), 0, data);
        }
        self.gpu.count_batch(self.dispatches, self.copies);
        self.gpu.submit(self.encoder.finish())
    }
}

/// Lays `workgroups` out as a grid whose dimensions stay within the limit: 2D when one dimension
/// would exceed it. Kernels recover the linear index with `linear_workgroup` and skip the extras.
pub(crate) fn linear_grid(workgroups: u32) -> (u32, u32) {
    if workgroups <= MAX_WORKGROUPS_PER_DIMENSION {
        (workgroups, 1)
    } else {
        (MAX_WORKGROUPS_PER_DIMENSION, workgroups.div_ceil(MAX_WORKGROUPS_PER_DIMENSION))
    }
}
