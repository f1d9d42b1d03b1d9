//! Bad input becomes a typed error naming the op and the shapes; nothing reaches the device.

use tessera_engine::{AttentionParams, DType, EngineError, Layout};

use crate::gpu;

/// Runs `op` against a fresh batch and expects an error whose message contains every `needle`.
fn check(what: &str, result: Result<(), EngineError>, needles: &[&str]) {
    let error = result.expect_err(what).to_string();
    for needle in needles {
        assert!(error.contains(needle), "{what}: {error:?} does not mention {needle:?}");
    }
}

#[test]
fn shape_and_dtype_errors_name_the_op_and_shapes() {
    let Some(gpu) = gpu() else { return };
    let f = |dims: &[usize]| gpu.empty(dims, DType::F32).unwrap();
    let (a, b, out) = (f(&[4, 8]), f(&[6, 8]), f(&[4, 8]));
    let ids = gpu.upload_u32(&[2], &[0, 1]).unwrap();
    let mut batch = gpu.batch();
    check("matmul inner", batch.matmul(&a, &b, Layout::Nn, &out), &["matmul", "[4, 8]", "[6, 8]"]);
    check("matmul output", batch.matmul(&a, &f(&[8, 5]), Layout::Nn, &out), &["matmul", "output", "[4, 5]"]);
    check("matmul dtype", batch.matmul(&a, &ids, Layout::Nn, &out), &["matmul", "U32"]);
    check("aliasing", batch.matmul(&a, &f(&[8, 8]), Layout::Nn, &a), &["matmul", "also an input"]);
    check("linear bias", batch.linear(&a, &b, Some(&f(&[5])), &f(&[4, 6]), false), &["linear", "bias", "[5]"]);
    check("rms weight", batch.rms_norm(&a, &f(&[7]), 1e-5, &out), &["rms_norm", "weight", "[7]"]);
    check("rope rank", batch.rope(&a, &ids, 10_000.0), &["rope", "[tokens, heads, head_dim]"]);
    check("add lengths", batch.add(&a, &f(&[3]), &out), &["add", "[4, 8]", "[3]"]);
    check("gather ids", batch.gather(&b, &a, &out), &["gather", "ids", "F32"]);
    let q = f(&[1, 2, 3, 8]);
    let kv = f(&[1, 16, 2, 8]);
    let attn = AttentionParams { causal: true, past: 15, kv_len: 16, scale: 0.3 };
    check("attention heads", batch.attention(&q, &kv, &kv, None, &f(&[1, 2, 3, 8]), attn), &["attention", "[1, 2, 3, 8]"]);
    let q = f(&[1, 2, 4, 8]);
    check("attention causal", batch.attention(&q, &kv, &kv, None, &f(&[1, 2, 4, 8]), attn), &["attention", "kv_len 16"]);
    assert_eq!(batch.dispatches(), 0, "a rejected op recorded a kernel");
    batch.submit();
    assert_eq!(gpu.take_device_errors(), Vec::<String>::new());
}

#[test]
fn oversized_and_malformed_tensors_are_refused() {
    let Some(gpu) = gpu() else { return };
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let too_many = (limit / 4 + 1) as usize;
    check("oversize", gpu.empty(&[too_many], DType::F32).map(drop), &["empty", "exceeds", "limit"]);
    check("no elements", gpu.empty(&[3, 0], DType::F32).map(drop), &["no elements"]);
    check("rank", gpu.empty(&[1, 1, 1, 1, 1], DType::F32).map(drop), &["rank 5"]);
    check("block", gpu.empty(&[2, 40], DType::Q4_1).map(drop), &["multiple of 32"]);
    check("upload size", gpu.upload_f32(&[2, 3], &[1.0; 5]).map(drop), &["upload", "24 bytes", "got 20"]);
    let quantized = gpu.upload(&[2, 32], DType::Q4_1, &[0; 40]).unwrap();
    let mut batch = gpu.batch();
    // Nine rows take the tiled kernel (up to eight run as matvecs, which take any N).
    let x = gpu.empty(&[9, 32], DType::F32).unwrap();
    check(
        "quantized odd N",
        batch.linear(&x, &gpu.upload(&[3, 32], DType::Q4_1, &[0; 60]).unwrap(), None, &gpu.empty(&[9, 3], DType::F32).unwrap(), false),
        &["linear", "multiple of 4"],
    );
    check("quantized NN", batch.matmul(&x, &quantized, Layout::Nn, &x), &["matmul", "Q4_1"]);
    batch.submit();
    assert_eq!(gpu.take_device_errors(), Vec::<String>::new());
}
