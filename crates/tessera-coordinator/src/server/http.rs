//! The HTTP API: `POST /v1/embeddings` (a job across contributors), the generation routes
//! (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /api/requests/{id}`: `generation`), `GET /api/contributors`, `GET /api/swarm` (what the
//! `/swarm` page shows: contributors, the span plan, tokens/s, recent requests: `swarm`),
//! `GET /api/jobs/{id}`, `GET /metrics` (Prometheus text) and `GET`/`HEAD /blobs/{cid}` with
//! ranges. Every error is OpenAI's error object (`ApiError`), through one `IntoResponse`; every
//! route has a body limit. The web pages (`/`, `/swarm`, `/embed`, `/widget.js`, `/pkg/*` and
//! the files beside them) come from `www`; a path that names none of them is the API's 404.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tessera_engine::cid::Cid;
use tessera_protocol::{JobId, Tensor};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot};

use crate::blobs::{BlobError, BlobStore, parse_range};
use crate::openai::{ApiError, EmbeddingInputs, EmbeddingsRequest, EmbeddingsResponse, MAX_INPUTS, MAX_INPUT_BYTES};
use crate::reconcile::JobKind;
use crate::scheduler::JobSpec;
use crate::server::actor::Command;
use crate::server::generation::{self, MAX_COMPLETION_BODY};
use crate::server::serving::{self, Serving};
use crate::server::www::Www;
use crate::server::{Counters, PublishedModel};

/// Largest `POST /v1/embeddings` body: 2048 inputs of up to 64 KiB would be 128 MiB; real
/// requests are far smaller, and this bounds what one request may make us hold.
const MAX_EMBEDDINGS_BODY: usize = 16 << 20;
/// Every other route takes no body.
const MAX_OTHER_BODY: usize = 4 << 10;
/// The response header naming the job an embeddings request ran as (for `/api/jobs/{id}`).
pub const JOB_HEADER: &str = "x-tessera-job";

#[derive(Clone)]
pub struct AppState {
    pub actor: mpsc::Sender<Command>,
    pub blobs: Arc<BlobStore>,
    pub model: Arc<PublishedModel>,
    pub counters: Arc<Counters>,
    pub endpoint: tessera_rtc::Endpoint,
    pub inputs_per_unit: usize,
    pub replicas: u8,
    pub unit_deadline: Duration,
    pub request_timeout: Duration,
    pub www: Www,
    pub serving: Serving,
}

/// `ApiError` as a response: its status and OpenAI's error JSON.
pub(crate) struct ApiResponse(ApiError);

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        ApiResponse(e)
    }
}

impl IntoResponse for ApiResponse {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.0.to_json())
    }
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

type ApiResult = Result<Response, ApiResponse>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings).layer(DefaultBodyLimit::max(MAX_EMBEDDINGS_BODY)))
        .route("/v1/models", get(generation::models))
        .route("/v1/chat/completions", post(generation::chat_completions).layer(DefaultBodyLimit::max(MAX_COMPLETION_BODY)))
        .route("/v1/completions", post(generation::completions).layer(DefaultBodyLimit::max(MAX_COMPLETION_BODY)))
        .route("/api/requests/{id}", get(generation::request))
        .route("/api/contributors", get(contributors))
        .route("/api/swarm", get(swarm))
        .route("/api/jobs/{id}", get(job))
        .route("/metrics", get(metrics))
        .route("/blobs/{cid}", get(blob))
        .route("/", get(page))
        .route("/embed", get(page))
        .route("/swarm", get(page))
        .route("/widget.js", get(page))
        .route("/pkg/{*file}", get(page))
        .fallback(page_or_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_OTHER_BODY))
        .with_state(state)
}

fn not_found() -> Response {
    ApiResponse(ApiError::not_found(
        "No such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, /api/requests/{id}, /api/contributors, /api/swarm, /api/jobs/{id}, /metrics, /blobs/{cid}, /ws, and the pages /, /swarm, /embed and /widget.js",
    ))
    .into_response()
}

/// A page or asset from `www` (`GET` and `HEAD`).
async fn page(State(state): State<AppState>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    state.www.respond(&method, uri.path(), &headers).await.unwrap_or_else(not_found)
}

/// Any other path: a file beside the pages (`/tessera.css`, `/volunteer.js`, ...) or the API's 404.
async fn page_or_not_found(State(state): State<AppState>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_found();
    }
    page(State(state), method, uri, headers).await
}

async fn method_not_allowed(method: Method) -> ApiResponse {
    ApiError { status: 405, message: format!("Method {method} is not allowed on this route"), kind: "invalid_request_error", param: None, code: None }.into()
}

/// Asks the actor something; an actor that is gone is a 503.
async fn ask<T>(actor: &mpsc::Sender<Command>, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || ApiError::unavailable("the coordinator is shutting down");
    actor.send(command(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

/// A request body that could not be read (too large, cut off): an OpenAI-shaped error with the
/// rejection's own status.
pub(crate) fn unreadable_body(rejection: &BytesRejection, limit: usize) -> ApiError {
    ApiError {
        status: rejection.status().as_u16(),
        message: format!("The request body could not be read: {} (at most {limit} bytes)", rejection.body_text()),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

async fn embeddings(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let body = body.map_err(|e| unreadable_body(&e, MAX_EMBEDDINGS_BODY))?;
    let request = EmbeddingsRequest::parse(&body)?;
    let model = Arc::clone(&state.model);
    if request.model != model.name && request.model != model.cid {
        return Err(ApiError::model_not_found(&request.model).into());
    }
    let hidden = model.config.hidden_size;
    if let Some(d) = request.dimensions
        && d != hidden
    {
        return Err(ApiError::invalid(Some("dimensions"), format!("{} has {hidden} dimensions and cannot produce {d}", model.name)).into());
    }
    let inputs = request.inputs;
    let tokenized = tokio::task::spawn_blocking({
        let model = Arc::clone(&model);
        move || tokenize(&model, inputs)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
    let tokens: usize = tokenized.iter().map(Vec::len).sum();
    let count = tokenized.len();
    let spec = JobSpec {
        kind: JobKind::Embedding,
        model: model.cid.clone(),
        inputs: tokenized,
        inputs_per_unit: state.inputs_per_unit,
        replicas: state.replicas,
        unit_deadline_ms: u64::try_from(state.unit_deadline.as_millis()).unwrap_or(u64::MAX),
        min_memory_bytes: 0,
    };
    let (job, done) = ask(&state.actor, |reply| Command::Submit { spec, reply }).await??;
    let rows = match tokio::time::timeout(state.request_timeout, done).await {
        Err(_) => {
            return Err(ApiError {
                status: 504,
                message: format!("Job {job} did not finish within {} s; it keeps running (see /api/jobs/{job})", state.request_timeout.as_secs()),
                kind: "server_error",
                param: None,
                code: Some("timeout"),
            }
            .into());
        }
        Ok(Err(_)) => return Err(ApiError::unavailable("the coordinator is shutting down").into()),
        Ok(Ok(Err(reason))) => return Err(ApiError::internal(format!("Job {job} failed: {reason}")).into()),
        Ok(Ok(Ok(rows))) => rows,
    };
    let vectors = vectors(&rows, count, hidden).map_err(|e| ApiError::internal(format!("job {job}: {e}")))?;
    let response = EmbeddingsResponse::new(&request.model, vectors, tokens, request.encoding_format);
    let body = serde_json::to_string(&response).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Ok(value) = HeaderValue::from_str(&job.to_string()) {
        response.headers_mut().insert(JOB_HEADER, value);
    }
    Ok(response)
}

/// Token ids per input: texts through the model's tokenizer (cut to its positions, keeping
/// the final `[SEP]`), token arrays checked against its vocabulary and positions.
fn tokenize(model: &PublishedModel, inputs: EmbeddingInputs) -> Result<Vec<Vec<u32>>, ApiError> {
    let config = &model.config;
    match inputs {
        EmbeddingInputs::Texts(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                model.tokenize(text).map(|(ids, _)| ids).map_err(|e| ApiError::invalid(Some("input"), format!("input {i} cannot be tokenized: {e}")))
            })
            .collect(),
        EmbeddingInputs::Tokens(inputs) => {
            for (i, ids) in inputs.iter().enumerate() {
                if ids.len() > config.max_position_embeddings {
                    return Err(ApiError::invalid(Some("input"), format!("input {i} has {} tokens; {} takes at most {}", ids.len(), model.name, config.max_position_embeddings)));
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
                    return Err(ApiError::invalid(Some("input"), format!("input {i} holds token id {bad}; the vocabulary has {} tokens", config.vocab_size)));
                }
            }
            Ok(inputs)
        }
    }
}

/// The rows of every unit's `[n, hidden]` tensor, in order; there must be `count` of them.
fn vectors(units: &[Tensor], count: usize, hidden: usize) -> Result<Vec<Vec<f32>>, String> {
    let mut out = Vec::with_capacity(count);
    for (i, t) in units.iter().enumerate() {
        let values: Vec<f32> = t.f32_values().ok_or_else(|| format!("unit {i}'s result is {:?}, not F32", t.dtype()))?.collect();
        if hidden == 0 || !values.len().is_multiple_of(hidden) {
            return Err(format!("unit {i}'s result has dims {:?}, not [n, {hidden}]", t.dims()));
        }
        out.extend(values.chunks_exact(hidden).map(<[f32]>::to_vec));
    }
    if out.len() != count {
        return Err(format!("{} vectors for {count} inputs", out.len()));
    }
    Ok(out)
}

async fn contributors(State(state): State<AppState>) -> ApiResult {
    let value = ask(&state.actor, Command::Contributors).await?;
    Ok(json_response(StatusCode::OK, &value))
}

/// Asks the serving task, which owns the plan and the requests.
async fn swarm(State(state): State<AppState>) -> ApiResult {
    let (reply, answer) = oneshot::channel();
    let gone = || ApiError::unavailable("the coordinator is shutting down");
    state.serving.commands.send(serving::Command::Swarm(reply)).await.map_err(|_| gone())?;
    let value = answer.await.map_err(|_| gone())?;
    Ok(json_response(StatusCode::OK, &value))
}

async fn job(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id: u64 = id.parse().map_err(|_| ApiError::invalid(None, format!("{id:?} is not a job id (a decimal integer)")))?;
    match ask(&state.actor, |reply| Command::Job(JobId(id), reply)).await? {
        Some(value) => Ok(json_response(StatusCode::OK, &value)),
        None => Err(ApiError::not_found(format!("No job {id}")).into()),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let c = &state.counters;
    let rtc = state.endpoint.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let rows: [(&str, &str, &str, u64); 24] = [
        ("tessera_contributors_connected", "gauge", "Contributors joined and connected now.", load(&c.contributors_connected)),
        ("tessera_contributors_joined_total", "counter", "Contributors that said hello.", load(&c.contributors_joined)),
        ("tessera_contributors_lost_total", "counter", "Contributors dropped for missing heartbeats.", load(&c.contributors_lost)),
        ("tessera_contributors_excluded_total", "counter", "Contributors dropped for losing too many votes.", load(&c.contributors_excluded)),
        ("tessera_units_dispatched_total", "counter", "Unit assignments sent (replicas included).", load(&c.units_dispatched)),
        ("tessera_units_reissued_total", "counter", "Assignments beyond a unit's first replicas (deadline, loss, disagreement).", load(&c.units_reissued)),
        ("tessera_units_accepted_total", "counter", "Units whose result was accepted and committed.", load(&c.units_accepted)),
        ("tessera_units_cancelled_total", "counter", "Cancel messages sent.", load(&c.units_cancelled)),
        ("tessera_results_reported_total", "counter", "Unit results received.", load(&c.results_reported)),
        ("tessera_results_rejected_total", "counter", "Results that lost their vote or had the wrong shape.", load(&c.results_rejected)),
        ("tessera_jobs_submitted_total", "counter", "Jobs submitted.", load(&c.jobs_submitted)),
        ("tessera_jobs_done_total", "counter", "Jobs completed.", load(&c.jobs_done)),
        ("tessera_jobs_failed_total", "counter", "Jobs failed.", load(&c.jobs_failed)),
        ("tessera_jobs_running", "gauge", "Jobs running now.", load(&c.jobs_running)),
        ("tessera_protocol_errors_total", "counter", "Bad messages from peers (each got an error reply).", load(&c.protocol_errors)),
        ("tessera_peers_closed_for_errors_total", "counter", "Peers closed for protocol errors.", load(&c.peers_disconnected_for_errors)),
        ("tessera_blob_bytes_sent_total", "counter", "Blob bytes sent over DataChannels.", load(&c.blob_bytes_sent)),
        ("tessera_store_errors_total", "counter", "Failed database commits (retried).", load(&c.store_errors)),
        ("tessera_rtc_peers", "gauge", "WebRTC peers connecting or connected.", rtc.peers as u64),
        ("tessera_rtc_garbage_datagrams_total", "counter", "UDP datagrams that were not STUN, DTLS, RTP or RTCP.", rtc.garbage_datagrams),
        ("tessera_rtc_unmatched_datagrams_total", "counter", "Well-formed datagrams no peer accepted.", rtc.unmatched_datagrams),
        ("tessera_rtc_dropped_peers_total", "counter", "WebRTC peers closed for misbehaving.", rtc.dropped_peers),
        ("tessera_max_inputs_per_request", "gauge", "Inputs accepted per embeddings request.", MAX_INPUTS as u64),
        ("tessera_max_input_bytes", "gauge", "Bytes accepted per text input.", MAX_INPUT_BYTES as u64),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn blob(State(state): State<AppState>, Path(cid): Path<String>, method: Method, headers: HeaderMap) -> ApiResult {
    let parsed: Cid = cid.parse().map_err(|e| ApiError::invalid(None, format!("{cid:?} is not a CID: {e}")))?;
    let found = tokio::task::spawn_blocking({
        let blobs = Arc::clone(&state.blobs);
        move || blobs.get(&parsed)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let blob = match found {
        Ok(blob) => blob,
        Err(BlobError::Missing(_)) => return Err(ApiError::not_found(format!("No blob {cid}")).into()),
        Err(e) => return Err(ApiError::internal(e.to_string()).into()),
    };
    let len = blob.len;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::invalid(None, "the Range header is not ASCII"))?;
            match parse_range(value, len) {
                Ok(range) => Some(range),
                Err(e) => {
                    let mut response = ApiResponse(ApiError { status: 416, message: e.to_string(), kind: "invalid_request_error", param: None, code: None }).into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        response.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(response);
                }
            }
        }
    };
    let (status, start, end) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end),
        None => (StatusCode::OK, 0, len),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ETAG, format!("\"{cid}\""))
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if range.is_some() {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end.saturating_sub(1)));
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let mut file = tokio::fs::File::from_std(blob.file);
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| ApiError::internal(format!("blob {cid}: {e}")))?;
        let chunks = futures::stream::unfold((file, end - start), |(mut file, left)| async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0; left.min(256 << 10) as usize];
            match file.read_exact(&mut buf).await {
                Ok(_) => {
                    let n = buf.len() as u64;
                    Some((Ok(Bytes::from(buf)), (file, left - n)))
                }
                Err(e) => Some((Err(e), (file, 0))),
            }
        });
        Body::from_stream(chunks)
    };
    builder.body(body).map_err(|e| ApiError::internal(e.to_string()).into())
}
