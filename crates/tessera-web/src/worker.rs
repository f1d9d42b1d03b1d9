//! What a browser contributor computes with: the page's GPU (reopened after it is lost), the
//! models units name by manifest CID (fetched through `blobs`, loaded once, kept by CID), and the
//! unit itself, timed for the compute budget; and the spans of language models it serves, each a
//! `SpanStage` loaded from its shard (a blob checked against its CID) with a KV cache per session.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use js_sys::{Reflect, Uint8Array};
use tessera_contributor::{Assignment, Event, SpanJob};
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::cid::Cid;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::stage::{SpanStage, Step};
use tessera_engine::{AdapterSummary, EngineError, Gpu};
use tessera_protocol::model::MAX_MANIFEST_BYTES;
use tessera_protocol::{AdapterLimits, Architecture, Capabilities, ModelManifest, UnitId};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use crate::blobs;
use crate::bytes::JsBytes;
use crate::lifecycle::Options;

/// Models kept loaded at once; loading another drops them.
const MAX_MODELS: usize = 2;
/// The largest `config.json` read.
const MAX_CONFIG_BYTES: u32 = 1 << 20;
/// GPU memory a tab offers the coordinator at most.
const MEMORY_BUDGET: u64 = 1 << 30;

/// A unit's outcome, for `Session::finished`.
pub struct Finished {
    pub unit: UnitId,
    pub busy_ms: f64,
    pub result: Result<Vec<Vec<f32>>, String>,
    /// The device was lost (or reported errors): reopen it before going on.
    pub gpu_lost: bool,
}

/// An open GPU and whether WebGPU has reported it lost.
struct Opened {
    gpu: Rc<Gpu>,
    lost: Arc<AtomicBool>,
}

impl Opened {
    fn new(gpu: Gpu) -> Opened {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        gpu.device().set_device_lost_callback(move |reason, message| {
            flag.store(true, Ordering::Relaxed);
            // `Destroyed` is our own doing: a replaced or stopped GPU.
            if reason != wgpu::DeviceLostReason::Destroyed {
                crate::log(&format!("the GPU device was lost: {message}"));
            }
        });
        Opened { gpu: Rc::new(gpu), lost }
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// A span job's outcome, for `Session::span_loaded` or `Session::forwarded`.
pub enum SpanDone {
    Loaded { shard: String, blocks: Range<usize>, result: Result<(), String> },
    /// The steps of one batch of forwards, in order.
    Forwarded(Vec<StepDone>),
    /// An end or an unload: nothing to report.
    Freed,
}

/// One forward's outcome: the output rows and their width, or why it failed; `busy_ms` is its
/// share of the batch's GPU time.
pub struct StepDone {
    pub session: u64,
    pub step: u64,
    pub busy_ms: f64,
    pub result: Result<(Vec<f32>, usize), String>,
}

/// A forward job's fields, borrowed for a batch.
struct Forward<'a> {
    shard: &'a str,
    session: u64,
    step: u64,
    start: usize,
    capacity: usize,
    rows: usize,
    hidden: &'a [f32],
}

pub struct Worker {
    options: Options,
    gpu: RefCell<Option<Opened>>,
    models: RefCell<HashMap<String, Rc<Bert>>>,
    /// Spans loaded, by shard CID. They belong to one connection: a new one starts without.
    spans: RefCell<HashMap<String, SpanStage>>,
    emit: Box<dyn Fn(Event)>,
}

impl Worker {
    pub fn new(options: Options, gpu: Gpu, emit: Box<dyn Fn(Event)>) -> Worker {
        Worker { options, gpu: RefCell::new(Some(Opened::new(gpu))), models: RefCell::default(), spans: RefCell::default(), emit }
    }

    /// The GPU, opened again (with no models) if it was lost.
    pub async fn gpu(&self) -> Result<Rc<Gpu>, String> {
        if let Some(opened) = self.gpu.borrow().as_ref().filter(|o| !o.is_lost()) {
            return Ok(opened.gpu.clone());
        }
        self.lose_gpu();
        let opened = Opened::new(open_gpu().await?);
        let gpu = opened.gpu.clone();
        *self.gpu.borrow_mut() = Some(opened);
        crate::log("reopened the GPU");
        Ok(gpu)
    }

    fn lose_gpu(&self) {
        self.gpu.borrow_mut().take();
        self.models.borrow_mut().clear();
        self.spans.borrow_mut().clear();
    }

    /// Drops every span (a new connection: the coordinator places spans afresh); returns
    /// their shards.
    pub fn drop_spans(&self) -> Vec<String> {
        self.spans.borrow_mut().drain().map(|(shard, _)| shard).collect()
    }

    /// Runs span jobs as `next_span_jobs` groups them: one load, end or unload, or a
    /// batch of forwards through one span. The glue runs one group at a time, in order.
    pub async fn span(self: Rc<Self>, jobs: Vec<SpanJob>) -> SpanDone {
        match jobs.first() {
            None => SpanDone::Freed,
            Some(SpanJob::Forward { .. }) => SpanDone::Forwarded(self.forward(&jobs).await),
            Some(SpanJob::Load { shard, blocks, max_sessions }) => {
                let result = self.load_span(shard, blocks.clone(), *max_sessions).await;
                SpanDone::Loaded { shard: shard.clone(), blocks: blocks.clone(), result }
            }
            Some(SpanJob::End { session }) => {
                for stage in self.spans.borrow_mut().values_mut() {
                    stage.end(*session);
                }
                SpanDone::Freed
            }
            Some(SpanJob::Unload { shard }) => {
                if self.spans.borrow_mut().remove(shard).is_some() {
                    crate::log(&format!("span {shard} unloaded"));
                }
                SpanDone::Freed
            }
        }
    }

    /// Fetches shard `shard` (checked against its CID) and loads `blocks` from it.
    async fn load_span(&self, shard: &str, blocks: Range<usize>, max_sessions: usize) -> Result<(), String> {
        if self.spans.borrow().contains_key(shard) {
            return Ok(());
        }
        let cid: Cid = shard.parse().map_err(|e| format!("shard {e}"))?;
        let gpu = self.gpu().await?;
        let bytes = self.blob(&cid).await?;
        let name = format!("span shard {shard}");
        let stages = Stages { embedding: false, blocks: blocks.clone(), head: false };
        let loaded = Llama::load(&gpu, &name, &mut JsBytes::reader(&bytes), &stages);
        self.check_device(&gpu, None)?;
        let stage = SpanStage::new(loaded.map_err(|e| e.to_string())?, blocks.clone(), max_sessions).map_err(|e| e.to_string())?;
        crate::log(&format!("loaded blocks {}..{} of a language model ({shard})", blocks.start, blocks.end));
        self.spans.borrow_mut().insert(shard.to_string(), stage);
        Ok(())
    }

    /// Runs a batch of forwards through one span in one submission (`SpanStage::forward_batch`:
    /// each session's output is what it would be alone), each step's outcome in order. A batch
    /// fails whole when one step is bad, changing nothing, so then each step runs alone for an
    /// answer of its own.
    async fn forward(&self, jobs: &[SpanJob]) -> Vec<StepDone> {
        let steps: Vec<Forward<'_>> = jobs
            .iter()
            .filter_map(|job| match job {
                SpanJob::Forward { shard, session, step, start, capacity, rows, hidden } => {
                    Some(Forward { shard, session: *session, step: *step, start: *start, capacity: *capacity, rows: *rows, hidden })
                }
                _ => None,
            })
            .collect();
        let started = crate::clock_ms();
        let results = match self.forward_steps(&steps).await {
            Ok(results) => results,
            Err(reason) => steps.iter().map(|_| Err(reason.clone())).collect(),
        };
        let busy_ms = (crate::clock_ms() - started) / steps.len().max(1) as f64;
        steps.iter().zip(results).map(|(f, result)| StepDone { session: f.session, step: f.step, busy_ms, result }).collect()
    }

    /// The outputs of `steps`, all through the first one's shard; `Err` when none can run.
    async fn forward_steps(&self, steps: &[Forward<'_>]) -> Result<Vec<Result<(Vec<f32>, usize), String>>, String> {
        let Some(shard) = steps.first().map(|f| f.shard) else { return Ok(Vec::new()) };
        let gpu = self.gpu().await?;
        // Out of the map while it runs, so that no borrow is held across the GPU's await; jobs
        // run one batch at a time, so nothing else looks for it meanwhile.
        let mut stage = self.spans.borrow_mut().remove(shard).ok_or_else(|| format!("span {shard} is not loaded here"))?;
        let dim = stage.dim();
        // A step whose tensor is not rows of this span's width is refused on its own.
        let mut results: Vec<Result<Vec<f32>, String>> = steps
            .iter()
            .map(|f| if f.hidden.len() == f.rows * dim { Ok(Vec::new()) } else { Err(format!("{} rows of {} values, not of {dim}", f.rows, f.hidden.len() / f.rows.max(1))) })
            .collect();
        let batch: Vec<Step<'_>> =
            steps.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(f, _)| Step { session: f.session, capacity: f.capacity, start: f.start, hidden: f.hidden }).collect();
        let outputs: Vec<Result<Vec<f32>, EngineError>> = if batch.is_empty() {
            Vec::new()
        } else {
            match stage.forward_batch(&gpu, &batch).await {
                Ok(outputs) => outputs.into_iter().map(Ok).collect(),
                Err(e) if batch.len() == 1 => vec![Err(e)],
                Err(_) => {
                    let mut alone = Vec::new();
                    for s in &batch {
                        alone.push(stage.forward(&gpu, s.session, s.capacity, s.start, s.hidden).await);
                    }
                    alone
                }
            }
        };
        self.spans.borrow_mut().insert(shard.to_string(), stage);
        self.check_device(&gpu, outputs.iter().find_map(|r| r.as_ref().err()))?;
        let mut outputs = outputs.into_iter();
        for result in results.iter_mut().filter(|r| r.is_ok()) {
            *result = outputs.next().unwrap_or_else(|| Err(EngineError::Shape { op: "stage", detail: "a step had no output".into() })).map_err(|e| e.to_string());
        }
        Ok(results.into_iter().map(|r| r.map(|values| (values, dim))).collect())
    }

    /// Computes one unit.
    pub async fn run(self: Rc<Self>, assignment: Assignment) -> Finished {
        let mut busy_ms = 0.0;
        let result = self.compute(&assignment, &mut busy_ms).await;
        let gpu_lost = self.gpu.borrow().as_ref().is_none_or(Opened::is_lost);
        Finished { unit: assignment.unit, busy_ms, result, gpu_lost }
    }

    async fn compute(&self, assignment: &Assignment, busy_ms: &mut f64) -> Result<Vec<Vec<f32>>, String> {
        let gpu = self.gpu().await?;
        let bert = self.model(&gpu, &assignment.model).await?;
        let started = crate::clock_ms();
        let result = bert.embed(&gpu, &assignment.inputs).await;
        *busy_ms = crate::clock_ms() - started;
        self.check_device(&gpu, result.as_ref().err())?;
        result.map_err(|e| e.to_string())
    }

    /// Fails, and drops the GPU to be reopened, if the device reported errors or an op failed
    /// the way a lost device makes it fail.
    fn check_device(&self, gpu: &Gpu, error: Option<&EngineError>) -> Result<(), String> {
        let errors = gpu.take_device_errors();
        let reported_lost = self.gpu.borrow().as_ref().is_some_and(Opened::is_lost);
        let lost = reported_lost || matches!(error, Some(EngineError::Device(_) | EngineError::Readback { .. }));
        if errors.is_empty() && !lost {
            return Ok(());
        }
        self.lose_gpu();
        let what = match (errors.is_empty(), error) {
            (false, _) => errors.join("; "),
            (true, Some(error)) => error.to_string(),
            (true, None) => "the device was lost".into(),
        };
        Err(format!("the GPU failed ({what}); it will be reopened"))
    }

    /// The BERT encoder that manifest `id` names, loaded once.
    async fn model(&self, gpu: &Gpu, id: &str) -> Result<Rc<Bert>, String> {
        if let Some(bert) = self.models.borrow().get(id) {
            return Ok(bert.clone());
        }
        let cid: Cid = id.parse().map_err(|e| format!("model {e}"))?;
        let manifest = self.blob(&cid).await?;
        if manifest.length() as usize > MAX_MANIFEST_BYTES {
            return Err(format!("model {id}: a manifest of {} bytes, over the limit of {MAX_MANIFEST_BYTES}", manifest.length()));
        }
        let manifest = ModelManifest::parse(&manifest.to_vec()).map_err(|e| format!("model {id}: {e}"))?;
        if manifest.architecture != Architecture::Bert {
            return Err(format!("model {} is a {:?} model; embedding units need a BERT encoder", manifest.name, manifest.architecture));
        }
        let file = |name: &str| -> Result<Cid, String> {
            let cid = manifest.file(name).map_err(|e| e.to_string())?;
            cid.parse().map_err(|e| format!("model {}: {name}: {e}", manifest.name))
        };
        let config = self.blob(&file("config.json")?).await?;
        if config.length() > MAX_CONFIG_BYTES {
            return Err(format!("model {}: config.json of {} bytes, over the limit of {MAX_CONFIG_BYTES}", manifest.name, config.length()));
        }
        let config = BertConfig::from_json(&format!("{} config.json", manifest.name), &config.to_vec()).map_err(|e| e.to_string())?;
        let weights = self.blob(&file("model.safetensors")?).await?;
        let name = format!("{} model.safetensors", manifest.name);
        let loaded = Bert::load(gpu, config, &name, &mut JsBytes::reader(&weights));
        self.check_device(gpu, None)?;
        let bert = Rc::new(loaded.map_err(|e| e.to_string())?);
        let mut models = self.models.borrow_mut();
        if models.len() >= MAX_MODELS {
            models.clear();
        }
        models.insert(id.to_string(), bert.clone());
        crate::log(&format!("loaded {} ({id})", manifest.name));
        Ok(bert)
    }

    async fn blob(&self, cid: &Cid) -> Result<Uint8Array, String> {
        let cid_text = cid.to_string();
        let fetched = blobs::fetch(&self.options.blob_url(&cid_text), cid).await?;
        (self.emit)(Event::Download { cid: cid_text, bytes: u64::from(fetched.bytes.length()), cached: fetched.cached });
        Ok(fetched.bytes)
    }
}

/// The page's WebGPU device, or why there is none.
pub async fn open_gpu() -> Result<Gpu, String> {
    let global = js_sys::global();
    let get = |target: &JsValue, key: &str| Reflect::get(target, &key.into()).unwrap_or(JsValue::UNDEFINED);
    let gpu = get(&get(&global, "navigator"), "gpu");
    if gpu.is_undefined() || gpu.is_null() {
        return Err(if get(&global, "isSecureContext").as_bool() == Some(false) {
            "WebGPU is unavailable: this page is not a secure context (it must be served over https or from localhost)".into()
        } else {
            "this browser does not offer WebGPU (navigator.gpu is missing)".into()
        });
    }
    Gpu::request().await.map_err(|e| format!("WebGPU is present but offers no usable GPU: {e}"))
}

/// The adapter as the page sees it. Browsers give wgpu no name, so it is taken from the
/// adapter's `info` ("google · swiftshader"), as a page would show it.
pub async fn describe(gpu: &Gpu) -> AdapterSummary {
    let mut summary = gpu.adapter().clone();
    if summary.name.is_empty() {
        summary.name = browser_adapter_name().await.unwrap_or_else(|| "a WebGPU adapter".into());
    }
    summary
}

async fn browser_adapter_name() -> Option<String> {
    let get = |target: &JsValue, key: &str| Reflect::get(target, &key.into()).ok();
    let gpu = get(&get(&js_sys::global(), "navigator")?, "gpu")?;
    let request: js_sys::Function = get(&gpu, "requestAdapter")?.dyn_into().ok()?;
    let adapter = JsFuture::from(request.call0(&gpu).ok()?.dyn_into::<js_sys::Promise>().ok()?).await.ok()?;
    let info = get(&adapter, "info")?;
    let parts: Vec<String> =
        ["description", "vendor", "architecture"].iter().filter_map(|key| get(&info, key)?.as_string()).filter(|part| !part.is_empty()).collect();
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// Where a measured score is kept between visits (`localStorage`, this origin's).
const SCORE_KEY: &str = "tessera.matmulScore.v1";
/// How long a measured score is reused. A volunteer's GPU rarely changes, and measuring takes
/// seconds on a slow adapter, all before the page can join.
const SCORE_MAX_AGE_MS: f64 = 7.0 * 24.0 * 3600.0 * 1000.0;

/// A score as kept in `localStorage`.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedScore {
    /// The adapter it was measured on: its name and `AdapterSummary`.
    adapter: String,
    score: f64,
    /// `Date.now()` when measured.
    measured_at_ms: f64,
}

fn local_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok().flatten()
}

/// The score measured on `adapter` within `SCORE_MAX_AGE_MS`, if one was kept and still makes
/// sense; storage that is disabled, full or garbled just means measuring again.
fn saved_score(adapter: &str) -> Option<f64> {
    let saved: SavedScore = serde_json::from_str(&local_storage()?.get_item(SCORE_KEY).ok()??).ok()?;
    let age = js_sys::Date::now() - saved.measured_at_ms;
    (saved.adapter == adapter && (0.0..SCORE_MAX_AGE_MS).contains(&age) && saved.score.is_finite() && saved.score > 0.0).then_some(saved.score)
}

fn save_score(adapter: &str, score: f64) {
    let saved = SavedScore { adapter: adapter.to_string(), score, measured_at_ms: js_sys::Date::now() };
    if let (Some(storage), Ok(json)) = (local_storage(), serde_json::to_string(&saved)) {
        // Not being able to keep it only costs a measurement next time.
        let _ = storage.set_item(SCORE_KEY, &json);
    }
}

/// What this tab tells the coordinator in its `Hello` about `gpu` (called `name`), with its
/// score: measured, or kept from a visit in the last week on the same adapter.
pub async fn capabilities(gpu: &Gpu, name: &str, memory_mib: Option<u64>) -> Result<Capabilities, String> {
    let limits = gpu.limits();
    let adapter = format!("{name} {}", serde_json::to_string(gpu.adapter()).unwrap_or_default());
    let score = match saved_score(&adapter) {
        Some(score) => score,
        None => {
            let score = tessera_engine::score::matmul_score(gpu, &crate::clock_ms).await.map_err(|e| format!("measuring the GPU: {e}"))?;
            save_score(&adapter, score);
            score
        }
    };
    Ok(Capabilities {
        adapter: name.to_string(),
        backend: "webgpu".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        },
        memory_budget_bytes: memory_mib.map_or(limits.max_buffer_size.min(MEMORY_BUDGET), |mib| mib << 20),
        benchmark_score: score,
        max_concurrent_units: 1,
        // A tab spares its volunteer's upload: it lends no shards.
        lends_blobs: false,
    })
}
