//! `tessera bench kernels`: f32 matmul GFLOP/s beside burn (feature `burn-peer`), and Q4_1
//! matvec GB/s of weights streamed beside a plain streaming-read kernel on the same buffer size.

use anyhow::Context;
use serde::Serialize;
use tessera_engine::Rng;
use tessera_engine::{DType, Gpu, Layout, quant};

use super::seconds_per_iteration;

/// f32 matmul shapes [M, K] x [K, N]: MiniLM's FFN in and out at 128 and 512 tokens, and 1024^3.
const MATMUL_SHAPES: [(usize, usize, usize); 3] = [(128, 384, 1536), (512, 1536, 384), (1024, 1024, 1024)];
/// Q4_1 matvec shapes (in -> out): SmolLM2's FFN in and out, and its vocabulary head.
const MATVEC_SHAPES: [(usize, usize); 3] = [(576, 1536), (1536, 576), (576, 49152)];

#[derive(Serialize)]
struct Report {
    adapter: tessera_engine::AdapterSummary,
    matmul_f32: Vec<MatmulRow>,
    matvec_q4_1: Vec<MatvecRow>,
}

#[derive(Serialize)]
struct MatmulRow {
    m: usize,
    k: usize,
    n: usize,
    tessera_gflops: f64,
    /// burn with autotuning, then with it off (its autotuner can pick a poor kernel on lavapipe).
    burn_gflops: Option<f64>,
    burn_no_autotune_gflops: Option<f64>,
    /// tessera / best burn.
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct MatvecRow {
    k: usize,
    n: usize,
    weight_bytes: usize,
    tessera_gbps: f64,
    stream_read_gbps: f64,
    ratio: f64,
}

pub fn run(json: bool) -> anyhow::Result<()> {
    let gpu = pollster::block_on(Gpu::request()).context("finding a GPU adapter")?;
    let adapter = gpu.adapter().clone();
    if !json {
        println!("adapter: {} ({}, {}, {})", adapter.name, adapter.backend, adapter.device_type, adapter.driver);
    }
    let mut rng = Rng::new(0x7e55e7a);

    let mut matmul_f32 = Vec::new();
    for (m, k, n) in MATMUL_SHAPES {
        let a = gpu.upload_f32(&[m, k], &rng.vec(m * k, -1.0, 1.0))?;
        let b = gpu.upload_f32(&[k, n], &rng.vec(k * n, -1.0, 1.0))?;
        let c = gpu.empty(&[m, n], DType::F32)?;
        let seconds = seconds_per_iteration(|iterations| {
            let mut batch = gpu.batch();
            for _ in 0..iterations {
                batch.matmul(&a, &b, Layout::Nn, &c)?;
            }
            batch.submit();
            Ok(gpu.wait_idle()?)
        })?;
        let flops = 2.0 * (m * k * n) as f64;
        let tessera_gflops = flops / seconds / 1e9;
        let (burn_gflops, burn_no_autotune_gflops) = burn_figures(&gpu, m, k, n)?;
        let best = burn_gflops.into_iter().chain(burn_no_autotune_gflops).reduce(f64::max);
        let row = MatmulRow { m, k, n, tessera_gflops, burn_gflops, burn_no_autotune_gflops, ratio: best.map(|b| tessera_gflops / b) };
        if !json {
            let show = |v: Option<f64>| v.map_or_else(|| "not built".to_string(), |v| format!("{v:.1}"));
            println!(
                "matmul f32 [{m},{k}]x[{k},{n}]: tessera {:.1} GFLOP/s | burn {} / no autotune {} | ratio {}",
                row.tessera_gflops,
                show(row.burn_gflops),
                show(row.burn_no_autotune_gflops),
                row.ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}x")),
            );
        }
        matmul_f32.push(row);
    }

    let mut matvec_q4_1 = Vec::new();
    for (k, n) in MATVEC_SHAPES {
        let weights = quant::quantize_q4_1(&rng.vec(n * k, -1.0, 1.0));
        let w = gpu.upload_weights(&[n, k], DType::Q4_1, &weights)?;
        let x = gpu.upload_f32(&[1, k], &rng.vec(k, -1.0, 1.0))?;
        let y = gpu.empty(&[1, n], DType::F32)?;
        let ours = seconds_per_iteration(|iterations| {
            let mut batch = gpu.batch();
            for _ in 0..iterations {
                batch.linear(&x, &w, None, &y, false)?;
            }
            batch.submit();
            Ok(gpu.wait_idle()?)
        })?;
        // The peer reads a buffer of the same size with the simplest possible kernel.
        let data = gpu.upload_f32(&[weights.len() / 4], &rng.vec(weights.len() / 4, -1.0, 1.0))?;
        // Four vec4 per invocation: enough workgroups to keep a large GPU busy.
        let sums = gpu.empty(&[(weights.len() / 16 / 256 / 4).max(1)], DType::F32)?;
        let stream = seconds_per_iteration(|iterations| {
            let mut batch = gpu.batch();
            for _ in 0..iterations {
                batch.stream_read(&data, &sums)?;
            }
            batch.submit();
            Ok(gpu.wait_idle()?)
        })?;
        let gbps = |seconds: f64| weights.len() as f64 / seconds / 1e9;
        let row = MatvecRow { k, n, weight_bytes: weights.len(), tessera_gbps: gbps(ours), stream_read_gbps: gbps(stream), ratio: stream / ours };
        if !json {
            println!(
                "matvec Q4_1 {k}->{n} ({:.1} MB): tessera {:.2} GB/s | stream read {:.2} GB/s | ratio {:.2}",
                row.weight_bytes as f64 / 1e6,
                row.tessera_gbps,
                row.stream_read_gbps,
                row.ratio,
            );
        }
        matvec_q4_1.push(row);
    }

    let errors = gpu.take_device_errors();
    anyhow::ensure!(errors.is_empty(), "the device reported errors: {errors:?}");
    if json {
        let report = Report { adapter, matmul_f32, matvec_q4_1 };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// burn's GFLOP/s with autotuning on and off, when the peer is built in.
#[cfg(feature = "burn-peer")]
fn burn_figures(gpu: &Gpu, m: usize, k: usize, n: usize) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let flops = 2.0 * (m * k * n) as f64;
    // A build measures burn with autotuning or without it (a cargo feature of burn's); the other
    // figure comes back NaN and is reported as not built.
    let gflops = |seconds: f64| Some(flops / seconds / 1e9).filter(|g| g.is_finite());
    let on = super::burn_peer::matmul_seconds(gpu, m, k, n, true)?;
    let off = super::burn_peer::matmul_seconds(gpu, m, k, n, false)?;
    Ok((gflops(on), gflops(off)))
}

#[cfg(not(feature = "burn-peer"))]
fn burn_figures(_: &Gpu, _: usize, _: usize, _: usize) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    Ok((None, None))
}
