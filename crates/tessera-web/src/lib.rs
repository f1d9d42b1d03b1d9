//! The browser contributor, compiled to WebAssembly: Tessera's engine on the page's WebGPU adapter.
//!
//! - [`Contributor`]: a volunteer's page joins a coordinator over a WebRTC DataChannel, speaking
//!   the contributor's protocol (`tessera_contributor::Session`, the one the native contributor
//!   runs, with `Policy::TAB`), and computes the units it is given (and the steps of the spans
//!   it holds, passed to and from its neighbours on direct channels). `lifecycle.rs` holds the
//!   page's bookkeeping without I/O (tested natively); `contributor.rs`, `rtc.rs`, `signal.rs`,
//!   `worker.rs` and `blobs.rs` are the browser glue.
//! - [`self_test`]: the kernel self-test a volunteer's page runs to show that this browser
//!   computes every kernel as the CPU reference does (the same cases the native tests run).
//! - [`Engine`]: the page's GPU; it loads models from bytes the page fetched
//!   ([`llama::LlamaModel`], [`bert::BertModel`]), which run prompts as spans of layers, decode,
//!   embed and time themselves.
//!
//! JavaScript sees opaque handles, plain JSON strings, plain event objects and `Uint8Array`s, and
//! `Error`s; `JsError` conversion happens in [`js_error`] only.

#![deny(clippy::unwrap_used, clippy::expect_used)]

mod bert;
mod blobs;
mod bytes;
mod contributor;
mod lifecycle;
mod llama;
mod rtc;
mod signal;
mod worker;

use std::rc::Rc;

use js_sys::Uint8Array;
use serde::Serialize;
use tessera_engine::{Gpu, checks};
use wasm_bindgen::prelude::*;

pub use bert::BertModel;
pub use contributor::Contributor;
pub use llama::LlamaModel;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

fn js_error(error: impl std::fmt::Display) -> JsError {
    JsError::new(&error.to_string())
}

/// Fails if the GPU reported an error that no op caught (an engine bug or a lost device).
fn check_device(gpu: &Gpu) -> Result<(), JsError> {
    let errors = gpu.take_device_errors();
    if errors.is_empty() { Ok(()) } else { Err(js_error(format!("the GPU reported errors: {errors:?}"))) }
}

fn to_json(value: &impl Serialize) -> Result<String, JsError> {
    serde_json::to_string(value).map_err(js_error)
}

fn from_json<'a, T: serde::Deserialize<'a>>(what: &str, json: &'a str) -> Result<T, JsError> {
    serde_json::from_str(json).map_err(|e| js_error(format!("{what}: {e}")))
}

/// Milliseconds on the page's clock (since the epoch).
fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// Milliseconds on the finest clock the page has (`performance.now()`), for timing GPU work.
fn clock_ms() -> f64 {
    web_sys::window().and_then(|w| w.performance()).map_or_else(js_sys::Date::now, |p| p.now())
}

/// What a JavaScript exception or error event says.
fn js_detail(value: &JsValue) -> String {
    if let Some(error) = value.dyn_ref::<js_sys::Error>() {
        return String::from(error.message());
    }
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}

/// A line in the page's console.
fn log(line: &str) {
    web_sys::console::log_1(&JsValue::from_str(&format!("tessera: {line}")));
}

/// The page's WebGPU device, shared by the models loaded on it.
#[wasm_bindgen]
pub struct Engine {
    gpu: Rc<Gpu>,
}

#[wasm_bindgen]
impl Engine {
    /// Opens this browser's WebGPU adapter; rejects when there is none.
    pub async fn open() -> Result<Engine, JsError> {
        Ok(Engine { gpu: Rc::new(Gpu::request().await.map_err(js_error)?) })
    }

    /// The adapter as JSON: `{name, backend, device_type, driver}`.
    pub fn adapter(&self) -> Result<String, JsError> {
        to_json(self.gpu.adapter())
    }

    /// Loads `stages` (JSON `{"embedding": bool, "blocks": [a, b], "head": bool}`) of the
    /// llama-family GGUF in `bytes` (called `name` in errors).
    #[wasm_bindgen(js_name = loadLlama)]
    pub fn load_llama(&self, name: &str, bytes: &Uint8Array, stages: &str) -> Result<LlamaModel, JsError> {
        let model = LlamaModel::load(self.gpu.clone(), name, bytes, stages)?;
        check_device(&self.gpu)?;
        Ok(model)
    }

    /// Loads a BERT encoder from its `config.json` text and its safetensors `bytes` (called
    /// `name` in errors).
    #[wasm_bindgen(js_name = loadBert)]
    pub fn load_bert(&self, name: &str, config: &str, bytes: &Uint8Array) -> Result<BertModel, JsError> {
        let model = BertModel::load(self.gpu.clone(), name, config, bytes)?;
        check_device(&self.gpu)?;
        Ok(model)
    }
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
    check_device(&gpu)?;
    to_json(&SelfTest { adapter: summary, reports })
}
