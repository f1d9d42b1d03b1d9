//! The OpenAI-compatible text generation API's shapes, sans-IO: `POST /v1/chat/completions` and
//! `POST /v1/completions` requests (parsed and checked, every problem an `invalid_request_error`
//! naming its field), their responses and streamed chunks (server-sent events ending in
//! `data: [DONE]`), and [`StopScanner`], which finds stop sequences in streamed text without
//! ever sending a client the start of one.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::openai::ApiError;

/// The most stop sequences a request may give, as OpenAI allows.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// The longest stop sequence accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most messages a chat request may hold.
pub const MAX_MESSAGES: usize = 1024;
/// The longest prompt accepted before tokenization, in bytes (the model's context is the real
/// limit, checked after tokenization).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: String,
    pub content: String,
}

/// What to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions`: the text itself.
    Text(String),
}

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; OpenAI's default is 1.
    pub temperature: f32,
    pub top_p: f32,
    /// Without a seed, the coordinator picks one per request.
    pub seed: Option<u64>,
}

/// A checked chat or text completion request.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// Tokens to generate at most; `None`: until the context is full or the model stops.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Streaming only: a last chunk with `usage` before `[DONE]`.
    pub include_usage: bool,
}

/// The endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Text,
}

impl Endpoint {
    /// The `object` of a whole response.
    fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Text => "text_completion",
        }
    }

    /// The `object` of a streamed chunk.
    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Text => "text_completion",
        }
    }
}

/// Whether a field's value is its default.
type IsDefault = fn(&Value) -> bool;

/// Fields OpenAI defines that this API accepts only at their defaults (a client library may
/// send them explicitly): the field and whether a value is its default.
const DEFAULT_ONLY: &[(&str, IsDefault)] = &[
    ("n", |v| v.as_u64() == Some(1)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("logprobs", |v| matches!(v, Value::Bool(false)) || v.as_u64() == Some(0)),
    ("best_of", |v| v.as_u64() == Some(1)),
    ("echo", |v| matches!(v, Value::Bool(false))),
    ("tools", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("logit_bias", |v| v.as_object().is_some_and(Map::is_empty)),
];

/// Fields accepted and ignored: they change nothing this API computes.
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier", "parallel_tool_calls", "top_logprobs", "suffix"];

impl CompletionRequest {
    /// Parses and checks a request body sent to `endpoint`.
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<CompletionRequest, ApiError> {
        let shape = |detail: &str| ApiError::invalid(None, format!("The request body is not a JSON object of the expected shape: {detail}"));
        let body: Value = serde_json::from_slice(body).map_err(|e| shape(&e.to_string()))?;
        let Value::Object(mut fields) = body else {
            return Err(shape("it must be an object with `model` and a prompt"));
        };
        let known: &[&str] = match endpoint {
            Endpoint::Chat => &["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream", "stream_options"],
            Endpoint::Text => &["model", "prompt", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options"],
        };
        for (name, value) in &fields {
            if known.contains(&name.as_str()) || IGNORED.contains(&name.as_str()) || value.is_null() {
                continue;
            }
            match DEFAULT_ONLY.iter().find(|(field, _)| field == name) {
                Some((_, is_default)) if is_default(value) => {}
                Some(_) => return Err(ApiError::invalid(None, format!("`{name}` is not supported by this coordinator except at its default value"))),
                None => return Err(ApiError::invalid(None, format!("Unrecognized request argument supplied: {name}"))),
            }
        }
        let mut take = |name: &str| fields.remove(name).filter(|v| !v.is_null());

        let model = match take("model") {
            Some(Value::String(model)) if !model.is_empty() => model,
            Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a non-empty string")),
            None => return Err(ApiError::invalid(Some("model"), "you must provide a model parameter")),
        };
        let prompt = match endpoint {
            Endpoint::Chat => Prompt::Chat(parse_messages(take("messages"))?),
            Endpoint::Text => Prompt::Text(parse_text_prompt(take("prompt"))?),
        };
        let temperature = number(take("temperature"), "temperature", 0.0..=2.0)?.unwrap_or(1.0);
        let top_p = number(take("top_p"), "top_p", 0.0..=1.0)?.unwrap_or(1.0);
        if top_p == 0.0 {
            return Err(ApiError::invalid(Some("top_p"), "`top_p` must be greater than 0"));
        }
        let seed = match take("seed") {
            None => None,
            Some(value) => Some(value.as_u64().or_else(|| value.as_i64().map(|s| s as u64)).ok_or_else(|| ApiError::invalid(Some("seed"), "`seed` must be an integer"))?),
        };
        let max_completion = take("max_completion_tokens");
        let max_tokens = match (take("max_tokens"), max_completion) {
            (Some(_), Some(_)) => return Err(ApiError::invalid(Some("max_tokens"), "give `max_tokens` or `max_completion_tokens`, not both")),
            (Some(v), None) => Some(count(v, "max_tokens")?),
            (None, Some(v)) => Some(count(v, "max_completion_tokens")?),
            (None, None) => None,
        };
        let stop = parse_stop(take("stop"))?;
        let stream = match take("stream") {
            None => false,
            Some(Value::Bool(stream)) => stream,
            Some(_) => return Err(ApiError::invalid(Some("stream"), "`stream` must be a boolean")),
        };
        let include_usage = match take("stream_options") {
            None => false,
            Some(_) if !stream => return Err(ApiError::invalid(Some("stream_options"), "`stream_options` is only allowed when `stream` is true")),
            Some(Value::Object(options)) => match options.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(include)) => *include,
                Some(_) => return Err(ApiError::invalid(Some("stream_options"), "`stream_options.include_usage` must be a boolean")),
            },
            Some(_) => return Err(ApiError::invalid(Some("stream_options"), "`stream_options` must be an object")),
        };
        Ok(CompletionRequest { model, prompt, sampling: Sampling { temperature, top_p, seed }, max_tokens, stop, stream, include_usage })
    }
}

fn number(value: Option<Value>, param: &'static str, range: std::ops::RangeInclusive<f32>) -> Result<Option<f32>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    match value.as_f64().map(|v| v as f32) {
        Some(v) if range.contains(&v) => Ok(Some(v)),
        _ => Err(ApiError::invalid(Some(param), format!("`{param}` must be a number from {} to {}", range.start(), range.end()))),
    }
}

fn count(value: Value, param: &'static str) -> Result<u32, ApiError> {
    match value.as_u64() {
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        _ => Err(ApiError::invalid(Some(param), format!("`{param}` must be a positive integer"))),
    }
}

fn parse_messages(value: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let invalid = |message: String| ApiError::invalid(Some("messages"), message);
    let Some(value) = value else { return Err(invalid("you must provide a messages parameter".into())) };
    let Value::Array(items) = value else { return Err(invalid("`messages` must be an array".into())) };
    if items.is_empty() || items.len() > MAX_MESSAGES {
        return Err(invalid(format!("`messages` must hold 1 to {MAX_MESSAGES} messages, not {}", items.len())));
    }
    let mut bytes = 0;
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let role = match item.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(other) => return Err(invalid(format!("messages[{i}].role is {other:?}; this model takes system, user and assistant messages"))),
            None => return Err(invalid(format!("messages[{i}] needs a string `role`"))),
        };
        let content = match item.get("content") {
            Some(Value::String(text)) => text.clone(),
            // An array of content parts: text parts only, joined.
            Some(Value::Array(parts)) => parts
                .iter()
                .enumerate()
                .map(|(j, part)| match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => Ok(text),
                    _ => Err(invalid(format!("messages[{i}].content[{j}] is not a text part; this model reads text only"))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            _ => return Err(invalid(format!("messages[{i}].content must be a string or an array of text parts"))),
        };
        bytes += content.len();
        if bytes > MAX_PROMPT_BYTES {
            return Err(invalid(format!("the messages are longer than {MAX_PROMPT_BYTES} bytes")));
        }
        messages.push(ChatMessage { role: role.into(), content });
    }
    Ok(messages)
}

fn parse_text_prompt(value: Option<Value>) -> Result<String, ApiError> {
    let invalid = |message: &str| ApiError::invalid(Some("prompt"), message);
    let text = match value {
        None => return Err(invalid("you must provide a prompt parameter")),
        Some(Value::String(text)) => text,
        // OpenAI takes a batch of prompts; one at a time here.
        Some(Value::Array(items)) => match <[Value; 1]>::try_from(items) {
            Ok([Value::String(text)]) => text,
            _ => return Err(invalid("`prompt` must be a string (or an array of exactly one string)")),
        },
        Some(_) => return Err(invalid("`prompt` must be a string")),
    };
    if text.len() > MAX_PROMPT_BYTES {
        return Err(invalid("the prompt is too long"));
    }
    Ok(text)
}

fn parse_stop(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = |message: String| ApiError::invalid(Some("stop"), message);
    let stops = match value {
        None => Vec::new(),
        Some(Value::String(stop)) => vec![stop],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop),
                _ => Err(invalid("`stop` must be a string or an array of strings".into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("`stop` must be a string or an array of strings".into())),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!("`stop` may hold at most {MAX_STOP_SEQUENCES} sequences")));
    }
    if stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!("each stop sequence must be 1 to {MAX_STOP_BYTES} bytes")));
    }
    Ok(stops)
}

/// Tokens to generate for a prompt of `prompt_tokens` in a model of `context` positions: all
/// that fit, or `max_tokens` when it fits. A prompt that fills the context, or a `max_tokens`
/// past it, is a 400 saying the numbers (as OpenAI's `context_length_exceeded`).
pub fn generation_budget(prompt_tokens: usize, max_tokens: Option<u32>, context: usize) -> Result<usize, ApiError> {
    if prompt_tokens >= context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                Some("messages"),
                format!("This model's maximum context length is {context} tokens. However, your prompt is {prompt_tokens} tokens, leaving no room for a completion. Please shorten it."),
            )
        });
    }
    let room = context - prompt_tokens;
    match max_tokens {
        None => Ok(room),
        Some(n) if n as usize <= room => Ok(n as usize),
        Some(n) => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                Some("max_tokens"),
                format!("max_tokens is too large: {n}. This model's maximum context length is {context} tokens and your prompt is {prompt_tokens}, so at most {room} completion tokens fit."),
            )
        }),
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end token or a stop sequence.
    Stop,
    /// `max_tokens` or the context's end.
    Length,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// What every response and chunk of one request shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub endpoint: Endpoint,
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

impl ResponseHead {
    pub fn new(endpoint: Endpoint, request: u64, created: u64, model: &str) -> ResponseHead {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Text => "cmpl",
        };
        ResponseHead { endpoint, id: format!("{prefix}-{request}"), created, model: model.into() }
    }

    fn object(&self, object: &str, choices: Value) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("id".into(), self.id.clone().into());
        fields.insert("object".into(), object.into());
        fields.insert("created".into(), self.created.into());
        fields.insert("model".into(), self.model.clone().into());
        fields.insert("choices".into(), choices);
        fields
    }

    /// The whole (non-streamed) response.
    pub fn response(&self, text: &str, finish: FinishReason, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Text => serde_json::json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
        };
        let mut fields = self.object(self.endpoint.object(), Value::Array(vec![choice]));
        fields.insert("usage".into(), serde_json::to_value(usage).unwrap_or(Value::Null));
        Value::Object(fields)
    }

    /// A streamed chunk carrying `text` (the first chunk of a chat also says the role), or the
    /// end of the choice when `finish` is given.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if !text.is_empty() || (first && finish.is_none()) {
                    delta.insert("content".into(), text.into());
                }
                serde_json::json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Text => serde_json::json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
        };
        let mut fields = self.object(self.endpoint.chunk_object(), Value::Array(vec![choice]));
        if self.endpoint == Endpoint::Chat {
            fields.insert("usage".into(), Value::Null);
        }
        Value::Object(fields)
    }

    /// The last chunk of a stream that asked for usage: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut fields = self.object(self.endpoint.chunk_object(), Value::Array(Vec::new()));
        fields.insert("usage".into(), serde_json::to_value(usage).unwrap_or(Value::Null));
        Value::Object(fields)
    }
}

/// One server-sent event carrying `value`.
pub fn sse_event(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// The event that ends every stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Finds the first stop sequence in text that arrives piece by piece. [`StopScanner::push`]
/// returns the text safe to send now: everything except a tail that might still become a stop
/// sequence, which is held back until the next piece decides it.
#[derive(Clone, Debug)]
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> StopScanner {
        StopScanner { stops, held: String::new(), stopped: false }
    }

    /// Whether a stop sequence was found; later pushes return nothing.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `piece`; returns the text before any stop sequence that can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min() {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest tail that is a proper prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|stop| (1..stop.len()).rev().filter(|&n| stop.is_char_boundary(n)).map(move |n| &stop[..n]))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        out
    }

    /// The end of the text: whatever was held back is not a stop sequence after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: Value) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(endpoint, body.to_string().as_bytes())
    }

    fn chat(extra: Value) -> Result<CompletionRequest, ApiError> {
        let mut body = serde_json::json!({ "model": "smollm2", "messages": [{ "role": "user", "content": "Hi" }] });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse(Endpoint::Chat, body)
    }

    #[test]
    fn a_full_chat_request_parses() {
        let request = chat(serde_json::json!({
            "messages": [
                { "role": "developer", "content": "Be brief." },
                { "role": "user", "content": [{ "type": "text", "text": "What is " }, { "type": "text", "text": "2+2?" }] },
            ],
            "temperature": 0.7, "top_p": 0.9, "seed": 42, "max_completion_tokens": 20, "stop": ["\n\n", "END"],
            "stream": true, "stream_options": { "include_usage": true }, "n": 1, "user": "abc", "frequency_penalty": 0,
        }))
        .unwrap();
        assert_eq!(
            request.prompt,
            Prompt::Chat(vec![
                ChatMessage { role: "system".into(), content: "Be brief.".into() },
                ChatMessage { role: "user".into(), content: "What is 2+2?".into() },
            ])
        );
        assert_eq!(request.sampling, Sampling { temperature: 0.7, top_p: 0.9, seed: Some(42) });
        assert_eq!((request.max_tokens, request.stream, request.include_usage), (Some(20), true, true));
        assert_eq!(request.stop, vec!["\n\n".to_string(), "END".to_string()]);
    }

    #[test]
    fn a_text_request_takes_a_string_or_one_string_in_an_array() {
        let one = parse(Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "Once", "max_tokens": 5 })).unwrap();
        assert_eq!((one.prompt, one.max_tokens, one.sampling.temperature), (Prompt::Text("Once".into()), Some(5), 1.0));
        let array = parse(Endpoint::Text, serde_json::json!({ "model": "m", "prompt": ["Once"], "stop": "." })).unwrap();
        assert_eq!((array.prompt, array.stop), (Prompt::Text("Once".into()), vec![".".to_string()]));
    }

    /// Each bad request names the field at fault and says what is wrong.
    #[test]
    fn bad_requests_name_the_field() {
        let cases: Vec<(Endpoint, Value, Option<&str>, &str)> = vec![
            (Endpoint::Chat, serde_json::json!([1]), None, "not a JSON object"),
            (Endpoint::Chat, serde_json::json!({ "messages": [] }), Some("model"), "provide a model"),
            (Endpoint::Chat, serde_json::json!({ "model": "m" }), Some("messages"), "provide a messages"),
            (Endpoint::Chat, serde_json::json!({ "model": "m", "messages": [] }), Some("messages"), "1 to 1024"),
            (Endpoint::Chat, serde_json::json!({ "model": "m", "messages": [{ "role": "tool", "content": "x" }] }), Some("messages"), "\"tool\""),
            (Endpoint::Chat, serde_json::json!({ "model": "m", "messages": [{ "role": "user", "content": [{ "type": "image_url" }] }] }), Some("messages"), "not a text part"),
            (Endpoint::Chat, serde_json::json!({ "model": "m", "messages": [{ "role": "user" }] }), Some("messages"), "content must be"),
            (Endpoint::Text, serde_json::json!({ "model": "m" }), Some("prompt"), "provide a prompt"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": ["a", "b"] }), Some("prompt"), "exactly one"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "temperature": 3 }), Some("temperature"), "from 0 to 2"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "top_p": 0 }), Some("top_p"), "greater than 0"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "max_tokens": 0 }), Some("max_tokens"), "positive integer"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "max_tokens": -5 }), Some("max_tokens"), "positive integer"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "max_tokens": 1e30 }), Some("max_tokens"), "positive integer"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "stop": ["", "x"] }), Some("stop"), "1 to 256 bytes"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"] }), Some("stop"), "at most 4"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "seed": "x" }), Some("seed"), "integer"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "stream": "yes" }), Some("stream"), "boolean"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "stream_options": {} }), Some("stream_options"), "only allowed when"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "n": 3 }), None, "`n` is not supported"),
            (Endpoint::Text, serde_json::json!({ "model": "m", "prompt": "a", "wat": 1 }), None, "Unrecognized request argument supplied: wat"),
            (Endpoint::Chat, serde_json::json!({ "model": "m", "messages": [{ "role": "user", "content": "a" }], "max_tokens": 2, "max_completion_tokens": 2 }), Some("max_tokens"), "not both"),
        ];
        for (endpoint, body, param, expected) in cases {
            let error = parse(endpoint, body.clone()).expect_err(expected);
            assert_eq!((error.status, error.param), (400, param), "{body}: {error}");
            assert!(error.message.contains(expected), "{body}: {:?} does not say {expected:?}", error.message);
        }
        assert!(CompletionRequest::parse(Endpoint::Chat, b"{not json").is_err());
    }

    #[test]
    fn the_budget_is_what_fits_in_the_context() {
        assert_eq!(generation_budget(10, None, 2048), Ok(2038));
        assert_eq!(generation_budget(10, Some(5), 2048), Ok(5));
        assert_eq!(generation_budget(10, Some(2038), 2048), Ok(2038));
        let too_many = generation_budget(10, Some(1_000_000), 2048).unwrap_err();
        assert_eq!((too_many.status, too_many.param, too_many.code), (400, Some("max_tokens"), Some("context_length_exceeded")));
        assert!(too_many.message.contains("at most 2038 completion tokens"), "{}", too_many.message);
        let too_long = generation_budget(2048, None, 2048).unwrap_err();
        assert_eq!((too_long.status, too_long.code), (400, Some("context_length_exceeded")));
        assert!(too_long.message.contains("2048 tokens"), "{}", too_long.message);
    }

    #[test]
    fn responses_and_chunks_have_openais_shape() {
        let head = ResponseHead::new(Endpoint::Chat, 7, 1_700_000_000, "smollm2");
        let response = head.response("Paris.", FinishReason::Stop, Usage::new(10, 3));
        assert_eq!(response["id"], "chatcmpl-7");
        assert_eq!(response["object"], "chat.completion");
        assert_eq!(response["choices"][0]["message"]["content"], "Paris.");
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
        assert_eq!(response["usage"]["total_tokens"], 13);
        let first = head.chunk("", true, None);
        assert_eq!((first["object"].as_str(), first["choices"][0]["delta"]["role"].as_str()), (Some("chat.completion.chunk"), Some("assistant")));
        assert_eq!(first["choices"][0]["delta"]["content"], "");
        let last = head.chunk("", false, Some(FinishReason::Length));
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = head.usage_chunk(Usage::new(1, 2));
        assert_eq!((usage["choices"].as_array().map(Vec::len), usage["usage"]["completion_tokens"].as_u64()), (Some(0), Some(2)));
        assert_eq!(sse_event(&serde_json::json!({"a": 1})), "data: {\"a\":1}\n\n");

        let text = ResponseHead::new(Endpoint::Text, 8, 1, "smollm2");
        assert_eq!(text.response("x", FinishReason::Length, Usage::default())["choices"][0]["text"], "x");
        assert_eq!(text.chunk("y", true, None)["object"], "text_completion");
    }

    #[test]
    fn stop_sequences_are_cut_even_across_pieces_and_never_leak() {
        let mut scanner = StopScanner::new(vec!["\n\nUser:".into(), "END".into()]);
        let mut sent = String::new();
        for piece in ["Hello", " there.", "\n", "\nUs", "er:", " more"] {
            sent.push_str(&scanner.push(piece));
            assert!(!sent.contains('\n'), "the start of a stop sequence was sent: {sent:?}");
        }
        assert!(scanner.stopped());
        assert_eq!(sent, "Hello there.");
        assert_eq!(scanner.finish(), "");

        // A held-back tail that turns out not to be a stop sequence is sent after all.
        let mut scanner = StopScanner::new(vec!["END".into()]);
        assert_eq!(scanner.push("the EN"), "the ");
        assert_eq!(scanner.push("D"), "");
        assert!(scanner.stopped());
        let mut scanner = StopScanner::new(vec!["END".into()]);
        assert_eq!(scanner.push("the EN"), "the ");
        assert_eq!(scanner.push("TRY"), "ENTRY");
        assert_eq!(scanner.push(" E"), " ");
        assert_eq!(scanner.finish(), "E");
        // Multi-byte text is never split inside a character.
        let mut scanner = StopScanner::new(vec!["é!".into()]);
        assert_eq!(scanner.push("café"), "caf");
        assert_eq!(scanner.push("?"), "é?");
    }
}
