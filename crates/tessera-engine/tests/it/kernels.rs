//! Every kernel against its CPU reference, on fresh random inputs, at the shapes in
//! `tessera_engine::checks::cases` (the browser self-test runs the same ones).

use tessera_engine::checks;

use crate::{gpu, seed};

/// Runs every case of `kernel` and fails with all the reports if any is off.
fn check(kernel: &str) {
    let Some(gpu) = gpu() else { return };
    let cases: Vec<_> = checks::cases().into_iter().filter(|c| c.kernel() == kernel).collect();
    assert!(!cases.is_empty(), "no cases for {kernel}");
    let seed = seed();
    let reports: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| pollster::block_on(checks::run(gpu, case, seed + i as u64)).unwrap_or_else(|e| panic!("{case:?}: {e}")))
        .collect();
    let failed: Vec<String> = reports.iter().filter(|r| !r.passed()).map(ToString::to_string).collect();
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), reports.len(), failed.join("\n"));
    assert_eq!(gpu.take_device_errors(), Vec::<String>::new());
}

#[test]
fn matmul() {
    check("matmul");
}

#[test]
fn linear_f32() {
    check("linear_f32");
}

#[test]
fn matvec_quant() {
    check("matvec_quant");
}

#[test]
fn matmul_quant() {
    check("matmul_quant");
}

#[test]
fn gather() {
    check("gather");
}

#[test]
fn rms_norm() {
    check("rms_norm");
}

#[test]
fn layer_norm() {
    check("layer_norm");
}

#[test]
fn softmax() {
    check("softmax");
}

#[test]
fn rope() {
    check("rope");
}

#[test]
fn rope_qkv() {
    check("rope_qkv");
}

#[test]
fn matvec_quant_norm() {
    check("matvec_quant_norm");
}

#[test]
fn matvec_quant_norm_glu() {
    check("matvec_quant_norm_glu");
}

/// The unfused forms of the fused ops, for several rows or f32 weights.
#[test]
fn norm_linear_and_norm_glu() {
    check("norm_linear");
    check("norm_glu");
}

#[test]
fn silu_mul() {
    check("silu_mul");
}

#[test]
fn gelu() {
    check("gelu");
}

#[test]
fn add() {
    check("add");
}

#[test]
fn attention() {
    check("attention");
}

#[test]
fn mean_pool_l2() {
    check("mean_pool_l2");
}

#[test]
fn every_case_belongs_to_a_test() {
    let tested = [
        "matmul", "linear_f32", "matvec_quant", "matmul_quant", "gather", "rms_norm", "layer_norm", "softmax", "rope",
        "silu_mul", "gelu", "add", "attention", "mean_pool_l2", "rope_qkv", "matvec_quant_norm", "matvec_quant_norm_glu",
        "norm_linear", "norm_glu",
    ];
    for case in checks::cases() {
        assert!(tested.contains(&case.kernel()), "{} has cases but no test", case.kernel());
    }
}

#[test]
fn the_error_measure_catches_nan_and_drift() {
    assert!(checks::relative_error(&[1.0, f32::NAN], &[1.0, 2.0]).is_infinite());
    assert!(checks::relative_error(&[1.0], &[1.0, 2.0]).is_infinite());
    assert_eq!(checks::relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((checks::relative_error(&[1.0, 2.2], &[1.0, 2.0]) - 0.1).abs() < 1e-6);
}

#[test]
fn the_pool_reuses_buffers_in_a_steady_loop() {
    // A device of its own, so other tests' allocations do not mix into the counts.
    if gpu().is_none() {
        return;
    }
    let gpu = pollster::block_on(tessera_engine::Gpu::request()).expect("a second device on the same adapter");
    let step = || {
        let x = gpu.upload_f32(&[3, 40], &[0.5; 120]).unwrap();
        let w = gpu.upload_f32(&[40], &[1.0; 40]).unwrap();
        let out = gpu.empty(&[3, 40], tessera_engine::DType::F32).unwrap();
        let mut batch = gpu.batch();
        batch.rms_norm(&x, &w, 1e-5, &out).unwrap();
        batch.submit();
    };
    // Buffers dropped during a step become reusable at the next submission.
    step();
    step();
    let before = gpu.pool_stats();
    for _ in 0..5 {
        step();
    }
    let after = gpu.pool_stats();
    assert_eq!(after.created, before.created, "the steady loop created buffers");
    assert!(after.reused >= before.reused + 5 * 4, "{before:?} -> {after:?}");
}

/// A tensor dropped while a batch that reads it is still open must not be reused (and
/// overwritten) before that batch runs, even if another batch is submitted in between, as
/// happens when threads share a device.
#[test]
fn an_open_batch_keeps_its_inputs_from_being_reused() {
    let Some(gpu) = gpu() else { return };
    let y = gpu.upload_f32(&[64], &[1.0; 64]).unwrap();
    let out = gpu.empty(&[64], tessera_engine::DType::F32).unwrap();
    let mut open = gpu.batch();
    {
        let x = gpu.upload_f32(&[64], &[2.0; 64]).unwrap();
        open.add(&x, &y, &out).unwrap();
    }
    gpu.batch().submit();
    // Same size as `x`: were `x`'s buffer free, this would take it and overwrite it first.
    let other = gpu.upload_f32(&[64], &[100.0; 64]).unwrap();
    open.submit();
    assert_eq!(pollster::block_on(gpu.read_f32(&out)).unwrap(), vec![3.0; 64]);
    drop(other);
}

#[test]
fn matmul_score_is_a_finite_positive_rate() {
    let Some(gpu) = gpu() else { return };
    let started = std::time::Instant::now();
    let real = || started.elapsed().as_secs_f64() * 1e3;
    // A browser's clock may be too coarse to see the work at all.
    let stuck = || 0.0;
    for clock in [&real as &dyn Fn() -> f64, &stuck] {
        let score = pollster::block_on(tessera_engine::score::matmul_score(gpu, clock)).unwrap();
        assert!(score.is_finite() && score > 0.0, "score {score}");
    }
}
