//! The burn peer for `tessera bench kernels`: burn 0.22.1's wgpu backend running f32 matmuls on
//! tessera's wgpu device where it can, timed by the same `seconds_per_iteration` as ours.
//!
//! Sharing the device: burn registers an existing device through `WgpuSetup` (instance, adapter,
//! device, queue, backend) and `Device::wgpu_options().setup(..).init()`. [`Gpu`] hands out its
//! `Device` and `Queue` but not the `Instance` or `Adapter` it opened them from, so this module
//! opens a second instance, made as `Gpu::request` makes its own, and picks the adapter whose
//! `AdapterInfo` equals the device's. cubecl only asks that adapter questions (info, limits,
//! features), but it takes its shader capabilities from the *adapter's* features: on lavapipe it
//! sees `SHADER_INT64` and emits `u64` in WGSL, which a device opened without that feature
//! rejects. So tessera's device and queue are handed to burn only when they have every feature in
//! [`CUBECL_READS`] that the adapter offers; otherwise burn gets a second device on the same
//! adapter, opened with tessera's limits and features plus those (a note on stderr says so).
//! Registering a device also replaces its uncaptured-error handler with cubecl's, which panics.
//!
//! Autotuning: burn 0.22.1 picks its matmul strategy at compile time. With the `autotune` cargo
//! feature (on in burn's default build, and in the `burn` line of this crate's Cargo.toml) every
//! float matmul goes through cubecl's autotuner; without it, through one fixed kernel.
//! cubecl 0.11.3's runtime settings (`CUBECL_AUTOTUNE_LEVEL`, `[autotune] level` in `cubecl.toml`)
//! only choose how hard it tunes (minimal, balanced, extensive, full), never whether, and the
//! fixed-strategy entry point (`burn_cubecl::kernel::matmul::matmul` with `MatmulStrategy::Cube`)
//! is not re-exported by `burn`. So one binary measures only one of the two figures; the other is
//! reported as NaN, which the JSON report writes as `null` and the ratio skips.

use std::sync::Mutex;

use anyhow::{Context, anyhow, ensure};
use burn::tensor::wgpu::{WgpuSetup, wgpu};
use burn::tensor::{DType, Device, Tensor, TensorData};
use tessera_engine::Gpu;
use tessera_engine::Rng;

use super::seconds_per_iteration;

/// Whether this build's burn tunes its matmuls: must match the `autotune` feature on the `burn`
/// dependency in Cargo.toml (burn offers no way to ask at runtime).
const AUTOTUNE_BUILT: bool = true;

/// Seconds per f32 matmul [m, k] x [k, n] by burn on `gpu`'s device, with burn's autotuner on or
/// off; NaN when this build cannot run burn that way (see the module docs).
pub fn matmul_seconds(gpu: &Gpu, m: usize, k: usize, n: usize, autotune: bool) -> anyhow::Result<f64> {
    if autotune != AUTOTUNE_BUILT {
        return Ok(f64::NAN);
    }
    let device = burn_device(gpu)?;
    let mut rng = Rng::new(0xb042_0000 ^ ((m as u64) << 32) ^ ((k as u64) << 16) ^ n as u64);
    let a_host = rng.vec(m * k, -1.0, 1.0);
    let b_host = rng.vec(k * n, -1.0, 1.0);
    let a = Tensor::<2>::from_data(TensorData::new(a_host.clone(), [m, k]), (&device, DType::F32));
    let b = Tensor::<2>::from_data(TensorData::new(b_host.clone(), [k, n]), (&device, DType::F32));

    // Once, untimed (this also runs the autotuner for the shape): burn's product is right, so
    // what is timed below is a real matmul on this device.
    let c = a.clone().matmul(b.clone()).try_into_data().map_err(|e| anyhow!("reading burn's product: {e}"))?;
    let c = c.as_slice::<f32>().map_err(|e| anyhow!("burn's product is not f32: {e:?}"))?;
    check_product(&a_host, &b_host, c, m, k, n, &mut rng)?;

    seconds_per_iteration(|iterations| {
        for _ in 0..iterations {
            // burn's wgpu backend (built without fusion) launches each matmul as it is called;
            // the dropped output's buffer goes back to burn's pool for the next one on the queue.
            drop(a.clone().matmul(b.clone()));
        }
        // Submits what burn has batched and waits for the queue to finish it.
        device.sync().map_err(|e| anyhow!("waiting for burn's matmuls: {e}"))
    })
}

/// The adapter features cubecl-wgpu 0.11.3 turns into shader capabilities or timing
/// (`register_types`, plane ops, `TimingMethod::Device`), so the device it runs on needs them all.
const CUBECL_READS: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::SHADER_INT64)
    .union(wgpu::Features::SHADER_F64)
    .union(wgpu::Features::SHADER_FLOAT32_ATOMIC)
    .union(wgpu::Features::SUBGROUP);

/// The burn device for `gpu`, registering it on first use: cubecl gives every registration a
/// runtime of its own, so each of tessera's devices is registered once per process.
fn burn_device(gpu: &Gpu) -> anyhow::Result<Device> {
    static REGISTERED: Mutex<Vec<(wgpu::Device, Device)>> = Mutex::new(Vec::new());
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, device)) = registered.iter().find(|(ours, _)| ours == gpu.device()) {
        return Ok(device.clone());
    }
    let (instance, adapter) = matching_adapter(gpu.device())?;
    let missing = (adapter.features() & CUBECL_READS) - gpu.device().features();
    let (device, queue) = if missing.is_empty() {
        (gpu.device().clone(), gpu.queue().clone())
    } else {
        eprintln!(
            "burn peer: tessera's device lacks {missing}, which burn would use because the adapter offers \
             them; burn runs on a second device opened from the same adapter"
        );
        let features = gpu.device().features() | (adapter.features() & CUBECL_READS);
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tessera burn peer"),
            required_features: features,
            required_limits: gpu.device().limits(),
            ..Default::default()
        }))
        .context("opening a device for burn")?
    };
    let setup = WgpuSetup { backend: adapter.get_info().backend, instance, adapter, device, queue };
    let device = Device::wgpu_options().setup(setup).init().context("registering a wgpu device with burn")?;
    registered.push((gpu.device().clone(), device.clone()));
    Ok(device)
}

/// A fresh instance and the adapter in it that `device` was opened from, found by its
/// `AdapterInfo`. `Gpu::instance()` and `Gpu::wgpu_adapter()` accessors would make this a lookup.
fn matching_adapter(device: &wgpu::Device) -> anyhow::Result<(wgpu::Instance, wgpu::Adapter)> {
    let wanted = device.adapter_info();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wanted.backend.into()));
    let found: Vec<String> = adapters.iter().map(|adapter| adapter.get_info().name).collect();
    let adapter = adapters.into_iter().find(|adapter| adapter.get_info() == wanted).with_context(|| {
        format!("no {:?} adapter matches tessera's device {:?} (found {found:?})", wanted.backend, wanted.name)
    })?;
    Ok((instance, adapter))
}

/// Compares `c` = `a` x `b` against a CPU dot product at the corners and at 64 random entries.
fn check_product(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize, rng: &mut Rng) -> anyhow::Result<()> {
    ensure!(c.len() == m * n, "burn's product has {} values, expected {}", c.len(), m * n);
    let corners = [(0, 0), (0, n - 1), (m - 1, 0), (m - 1, n - 1)];
    let random = (0..64).map(|_| (rng.below(m as u32) as usize, rng.below(n as u32) as usize));
    for (row, col) in corners.into_iter().chain(random) {
        let (mut sum, mut scale) = (0.0f64, 0.0f64);
        for i in 0..k {
            let term = f64::from(a[row * k + i]) * f64::from(b[i * n + col]);
            sum += term;
            scale += term.abs();
        }
        let got = f64::from(c[row * n + col]);
        ensure!(
            (got - sum).abs() <= 1e-4 * scale + 1e-6,
            "burn's matmul [{m},{k}]x[{k},{n}] is wrong at ({row}, {col}): {got}, expected {sum}"
        );
    }
    Ok(())
}
