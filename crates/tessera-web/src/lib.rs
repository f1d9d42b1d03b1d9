//! The browser contributor, compiled to WebAssembly: Tessera's engine on the page's WebGPU adapter.
//!
//! So far it exposes the kernel self-test, which a volunteer's page runs to show that this
//! browser computes every kernel as the CPU reference does (the same cases the native tests run).
//! JavaScript sees plain JSON and `Error`s; `JsError` conversion happens in [`js_error`] only.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use serde::Serialize;
use tessera_engine::{Gpu, checks};
use wasm_bindgen::prelude::*;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

fn js_error(error: impl std::fmt::Display) -> JsError {
    JsError::new(&error.to_string())
}

#[derive(Serialize)]
struct SelfTest {
    adapter: tessera_engine::AdapterSummary,
    reports: Vec<Report>,
}

#[derive(Serialize)]
struct Report {
    kernel: &'static str,
    case: String,
    seed: u64,
    /// `null` when the error is not finite (NaN in the output).
    max_error: Option<f64>,
    tolerance: f64,
    passed: bool,
}

/// Runs every kernel check on this browser's WebGPU adapter with inputs drawn from `seed`, and
/// resolves to a JSON string: `{adapter: {name, backend, ...}, reports: [{kernel, case, seed,
/// max_error, tolerance, passed}]}`. Rejects when there is no WebGPU adapter or a kernel fails
/// to run at all.
#[wasm_bindgen(js_name = selfTest)]
pub async fn self_test(seed: u32) -> Result<String, JsError> {
    let gpu = Gpu::request().await.map_err(js_error)?;
    let summary = gpu.adapter().clone();
    let mut reports = Vec::new();
    for (i, case) in checks::cases().iter().enumerate() {
        let report = checks::run(&gpu, case, u64::from(seed) + i as u64).await.map_err(js_error)?;
        reports.push(Report {
            kernel: report.kernel,
            case: report.case.clone(),
            seed: report.seed,
            max_error: report.max_error.is_finite().then_some(report.max_error),
            tolerance: report.tolerance,
            passed: report.passed(),
        });
    }
    let errors = gpu.take_device_errors();
    if !errors.is_empty() {
        return Err(js_error(format!("the GPU reported errors: {errors:?}")));
    }
    serde_json::to_string(&SelfTest { adapter: summary, reports }).map_err(js_error)
}
