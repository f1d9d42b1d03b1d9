//! The contributor's yardstick of speed: GFLOP/s of an f32 matmul at a MiniLM layer's shape,
//! which every contributor (native or browser) reports in its `Hello`.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::Layout;
use crate::tensor::DType;

/// GFLOP/s of four `[128, 384] x [384, 384]` matmuls in one submission, the best of four runs,
/// each timed up to its readback. `now_ms` is the caller's clock in milliseconds: std's clock
/// does not exist in the browser, and the engine keeps no clock of its own.
pub async fn matmul_score(gpu: &Gpu, now_ms: &dyn Fn() -> f64) -> Result<f64> {
    let (m, k, n) = (128, 384, 384);
    let a = gpu.upload_f32(&[m, k], &vec![0.5; m * k])?;
    let b = gpu.upload_f32(&[k, n], &vec![0.25; k * n])?;
    let out = gpu.empty(&[m, n], DType::F32)?;
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let started = now_ms();
        let mut batch = gpu.batch();
        for _ in 0..4 {
            batch.matmul(&a, &b, Layout::Nn, &out)?;
        }
        batch.submit();
        gpu.read_f32(&out).await?;
        best = best.min(now_ms() - started);
    }
    // A clock coarser than the work (a browser may round to 0.1 ms or more) must not divide by zero.
    let seconds = best.max(1e-3) / 1e3;
    Ok(4.0 * 2.0 * (m * k * n) as f64 / seconds / 1e9)
}
