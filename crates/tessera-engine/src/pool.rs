//! A pool of GPU buffers keyed by size and usage, so steady-state loops (the decode step)
//! allocate nothing: a buffer goes back to the pool when its last tensor is dropped, and a later
//! request of the same size takes it.
//!
//! A `Batch` holds the buffers it binds until it is submitted. Without that, a buffer dropped
//! while a batch that reads it is still open (on this thread or another) could be taken again and
//! filled with `Queue::write_buffer`, which lands before the batch's commands run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Buffers are rounded up to this many bytes, so nearby sizes share buffers.
const GRANULE: u64 = 256;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created on the device since the pool was made.
    pub created: u64,
    /// Requests served by a buffer that was returned earlier.
    pub reused: u64,
    /// Bytes held by buffers that are idle in the pool.
    pub idle_bytes: u64,
}

#[derive(Default)]
struct Inner {
    free: HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>,
    stats: PoolStats,
}

#[derive(Clone)]
pub(crate) struct BufferPool {
    device: wgpu::Device,
    inner: Arc<Mutex<Inner>>,
}

impl BufferPool {
    pub(crate) fn new(device: wgpu::Device) -> BufferPool {
        BufferPool { device, inner: Arc::default() }
    }

    pub(crate) fn rounded(size: u64) -> u64 {
        size.max(4).div_ceil(GRANULE) * GRANULE
    }

    /// A buffer of at least `size` bytes with exactly `usage`.
    pub(crate) fn acquire(&self, size: u64, usage: wgpu::BufferUsages) -> PooledBuffer {
        let size = Self::rounded(size);
        let mut inner = self.lock();
        let reused = inner.free.get_mut(&(size, usage)).and_then(Vec::pop);
        let buffer = match reused {
            Some(buffer) => {
                inner.stats.reused += 1;
                inner.stats.idle_bytes -= size;
                buffer
            }
            None => {
                inner.stats.created += 1;
                drop(inner);
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tessera pooled"),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            }
        };
        PooledBuffer { buffer: Some(buffer), pool: Some(self.inner.clone()) }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Frees every idle buffer.
    pub(crate) fn trim(&self) {
        let mut inner = self.lock();
        // Idle buffers may still be read by submitted work: dropping our handles is safe (wgpu
        // keeps them alive until that work is done), destroying them would not be.
        inner.free.clear();
        inner.stats.idle_bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters half-updated: keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A buffer that returns to its pool when dropped (or is simply freed if it has none).
pub(crate) struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Option<Arc<Mutex<Inner>>>,
}

impl PooledBuffer {
    /// A buffer owned outright, such as model weights, that never goes back to a pool.
    pub(crate) fn unpooled(buffer: wgpu::Buffer) -> PooledBuffer {
        PooledBuffer { buffer: Some(buffer), pool: None }
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer is present until drop")
    }
}

impl std::fmt::Debug for PooledBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuffer").field("size", &self.buffer().size()).finish()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let (Some(buffer), Some(pool)) = (self.buffer.take(), self.pool.take()) else { return };
        let mut inner = pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.stats.idle_bytes += buffer.size();
        inner.free.entry((buffer.size(), buffer.usage())).or_default().push(buffer);
    }
}
