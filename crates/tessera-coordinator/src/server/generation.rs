//! The generation API over HTTP: `GET /v1/models`, `POST /v1/chat/completions` and
//! `POST /v1/completions` (whole responses, or server-sent events), and `GET /api/requests/{id}`.
//! A handler checks and tokenizes the request (the chat template as `tessera run --chat`
//! renders it), hands the tokens to the serving task, and turns the tokens it hears back into
//! text: decoded whole each time (so the text is exactly the decoding of the tokens), held back
//! while it ends in half a character, and cut at stop sequences by `StopScanner`.
//!
//! Every response names the contributors that served each span in `x-tessera-spans`
//! (`0-10=3,10-20=5,20-30=7`: blocks and contributor id) and its request id in
//! `x-tessera-request`; `/api/requests/{id}` has both, and whoever took over after a loss.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::completions::{CompletionRequest, Endpoint, FinishReason, Prompt, ResponseHead, SSE_DONE, StopScanner, Usage, generation_budget, sse_event};
use crate::openai::ApiError;
use crate::server::http::{ApiResponse, AppState, json_response, unreadable_body};
use crate::server::llm::ServedLlama;
use crate::server::serving::{Command, Event, Generate, Serving, Started};

/// Largest completion request body: a prompt is at most 1 MiB of text, plus the JSON around it.
pub const MAX_COMPLETION_BODY: usize = 2 << 20;
/// The response header naming who served which span.
pub const SPANS_HEADER: &str = "x-tessera-spans";
/// The response header naming the request (for `/api/requests/{id}`).
pub const REQUEST_HEADER: &str = "x-tessera-request";

type ApiResult = Result<Response, ApiResponse>;

pub async fn models(State(state): State<AppState>) -> Response {
    let mut data = vec![json!({ "id": state.model.name, "object": "model", "created": 0, "owned_by": "tessera" })];
    if let Some(name) = &state.serving.name {
        data.push(json!({ "id": name, "object": "model", "created": 0, "owned_by": "tessera" }));
    }
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

pub async fn chat_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    complete(state, Endpoint::Chat, body).await
}

pub async fn completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    complete(state, Endpoint::Text, body).await
}

pub async fn request(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id: u64 = id.parse().map_err(|_| ApiError::invalid(None, format!("{id:?} is not a request id (a decimal integer)")))?;
    let (reply, answer) = oneshot::channel();
    let gone = || ApiError::unavailable("the coordinator is shutting down");
    state.serving.commands.send(Command::Request(id, reply)).await.map_err(|_| gone())?;
    match answer.await.map_err(|_| gone())? {
        Some(value) => Ok(json_response(StatusCode::OK, &value)),
        None => Err(ApiError::not_found(format!("No generation request {id}")).into()),
    }
}

/// The served model, or the 503 that says why there is none.
fn served(serving: &Serving, name: &str) -> Result<Arc<ServedLlama>, ApiError> {
    match serving.model.get() {
        None => Err(ApiError::unavailable(format!("{name} is still loading on this coordinator; try again in a moment"))),
        Some(Err(reason)) => Err(ApiError::unavailable(format!("{name} cannot be served by this coordinator: {reason}"))),
        Some(Ok(model)) => Ok(Arc::clone(model)),
    }
}

/// The prompt's token ids: the chat through the model's template, or the text as it is.
fn tokenize(model: &ServedLlama, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let text = match prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Chat(messages) => {
            let template = model.template.as_ref().ok_or_else(|| ApiError::invalid(Some("messages"), format!("{} has no chat template: use /v1/completions", model.name)))?;
            template
                .render(messages.iter().map(|m| (m.role.as_str(), m.content.as_str())))
                .map_err(|e| ApiError::invalid(Some("messages"), format!("the chat template cannot render these messages: {e}")))?
        }
    };
    let ids = model.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid(Some("prompt"), format!("the prompt cannot be tokenized: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    Ok(ids)
}

async fn complete(state: AppState, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let body = body.map_err(|e| unreadable_body(&e, MAX_COMPLETION_BODY))?;
    let request = CompletionRequest::parse(endpoint, &body)?;
    let serving = state.serving.clone();
    let Some(name) = serving.name.clone().filter(|name| *name == request.model) else {
        if request.model == state.model.name {
            return Err(ApiError::invalid(Some("model"), format!("{} is an embedding model: use /v1/embeddings", request.model)).into());
        }
        return Err(ApiError::model_not_found(&request.model).into());
    };
    let model = served(&serving, &name)?;
    let prompt = tokio::task::spawn_blocking({
        let (model, prompt) = (Arc::clone(&model), request.prompt.clone());
        move || tokenize(&model, &prompt)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
    let budget = generation_budget(prompt.len(), request.max_tokens, model.config.context)?;
    let prompt_tokens = prompt.len();
    let (events, mut heard) = mpsc::unbounded_channel();
    let (reply, answer) = oneshot::channel();
    let generate = Generate { prompt, budget, sampling: request.sampling, events };
    let gone = || ApiError::unavailable("the coordinator is shutting down");
    serving.commands.send(Command::Generate { request: generate, reply }).await.map_err(|_| gone())?;
    let started = answer.await.map_err(|_| gone())??;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let head = ResponseHead::new(endpoint, started.request, created, &request.model);
    let text = Text::new(model, request.stop.clone());
    let stop = StopOnDrop { commands: serving.commands.clone(), request: started.request, armed: true };
    if request.stream {
        let (chunks, body) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        tokio::spawn(stream(heard, chunks, head, text, prompt_tokens, request.include_usage, stop));
        let body = Body::from_stream(futures::stream::unfold(body, |mut body| async move { body.recv().await.map(|chunk| (chunk, body)) }));
        let response = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        return Ok(with_headers(response, &started, &started.spans));
    }
    let (text, finish, spans) = whole(&mut heard, text, stop).await?;
    let usage = Usage::new(prompt_tokens as u32, text.tokens as u32);
    let response = json_response(StatusCode::OK, &head.response(&text.sent, finish, usage));
    Ok(with_headers(response, &started, spans.as_deref().unwrap_or(&started.spans)))
}

fn with_headers(mut response: Response, started: &Started, spans: &str) -> Response {
    for (name, value) in [(SPANS_HEADER, spans.to_string()), (REQUEST_HEADER, started.request.to_string())] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Tells the serving task to stop a request when its handler goes away first (the client
/// disconnected, or a stop sequence ended the text).
struct StopOnDrop {
    commands: mpsc::Sender<Command>,
    request: u64,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.try_send(Command::Stop { request: self.request });
        }
    }
}

/// The text of a request's tokens, as it may be sent.
struct Text {
    model: Arc<ServedLlama>,
    ids: Vec<u32>,
    /// Bytes of the decoded text handed to the scanner so far.
    decoded: usize,
    scanner: StopScanner,
    /// What was sent to the client.
    sent: String,
    tokens: usize,
}

impl Text {
    fn new(model: Arc<ServedLlama>, stops: Vec<String>) -> Text {
        Text { model, ids: Vec::new(), decoded: 0, scanner: StopScanner::new(stops), sent: String::new(), tokens: 0 }
    }

    /// Adds a token; returns the text that may be sent now.
    fn push(&mut self, token: u32) -> Result<String, ApiError> {
        self.ids.push(token);
        self.tokens += 1;
        let text = self.model.tokenizer.decode(&self.ids).map_err(|e| ApiError::internal(format!("decoding the tokens failed: {e}")))?;
        // Half a character (or a text that changed before the end): wait for the next token.
        if text.ends_with('\u{fffd}') || text.len() < self.decoded || !text.is_char_boundary(self.decoded) {
            return Ok(String::new());
        }
        let piece = self.scanner.push(&text[self.decoded..]);
        self.decoded = text.len();
        self.sent.push_str(&piece);
        Ok(piece)
    }

    /// The end of the text: what was held back.
    fn finish(&mut self) -> Result<String, ApiError> {
        let mut piece = String::new();
        if !self.scanner.stopped() {
            let text = self.model.tokenizer.decode(&self.ids).map_err(|e| ApiError::internal(format!("decoding the tokens failed: {e}")))?;
            if text.len() > self.decoded && text.is_char_boundary(self.decoded) {
                piece = self.scanner.push(&text[self.decoded..]);
                self.decoded = text.len();
            }
            if !self.scanner.stopped() {
                piece.push_str(&self.scanner.finish());
            }
        }
        self.sent.push_str(&piece);
        Ok(piece)
    }
}

/// A whole response: the text, why it ended, and who served it.
async fn whole(heard: &mut mpsc::UnboundedReceiver<Event>, mut text: Text, mut stop: StopOnDrop) -> Result<(Text, FinishReason, Option<String>), ApiError> {
    loop {
        match heard.recv().await {
            Some(Event::Token(token)) => {
                text.push(token)?;
                if text.scanner.stopped() {
                    return Ok((text, FinishReason::Stop, None));
                }
            }
            Some(Event::Done { finish, spans }) => {
                stop.armed = false;
                text.finish()?;
                let finish = if text.scanner.stopped() { FinishReason::Stop } else { finish };
                return Ok((text, finish, Some(spans)));
            }
            Some(Event::Failed(error)) => {
                stop.armed = false;
                return Err(error);
            }
            None => return Err(ApiError::unavailable("the coordinator is shutting down")),
        }
    }
}

/// Streams a response as server-sent events; ends early when the client goes away.
async fn stream(
    mut heard: mpsc::UnboundedReceiver<Event>,
    chunks: mpsc::Sender<Result<Bytes, Infallible>>,
    head: ResponseHead,
    mut text: Text,
    prompt_tokens: usize,
    include_usage: bool,
    mut stop: StopOnDrop,
) {
    let send = |value: String| {
        let chunks = chunks.clone();
        async move { chunks.send(Ok(Bytes::from(value))).await.is_ok() }
    };
    let mut first = true;
    let finish = loop {
        let (piece, finish) = match heard.recv().await {
            Some(Event::Token(token)) => match text.push(token) {
                Ok(piece) => (piece, text.scanner.stopped().then_some(FinishReason::Stop)),
                Err(error) => break Err(error),
            },
            Some(Event::Done { finish, .. }) => {
                stop.armed = false;
                match text.finish() {
                    Ok(piece) => (piece, Some(if text.scanner.stopped() { FinishReason::Stop } else { finish })),
                    Err(error) => break Err(error),
                }
            }
            Some(Event::Failed(error)) => {
                stop.armed = false;
                break Err(error);
            }
            None => break Err(ApiError::unavailable("the coordinator is shutting down")),
        };
        if (!piece.is_empty() || first) && !send(sse_event(&head.chunk(&piece, first, None))).await {
            return;
        }
        first = false;
        if let Some(finish) = finish {
            break Ok(finish);
        }
    };
    match finish {
        Ok(finish) => {
            if !send(sse_event(&head.chunk("", false, Some(finish)))).await {
                return;
            }
            if include_usage && !send(sse_event(&head.usage_chunk(Usage::new(prompt_tokens as u32, text.tokens as u32)))).await {
                return;
            }
        }
        Err(error) => {
            let value: Value = error.to_json();
            if !send(sse_event(&value)).await {
                return;
            }
        }
    }
    let _ = send(SSE_DONE.to_string()).await;
}
