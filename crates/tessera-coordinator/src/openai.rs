//! The OpenAI-compatible API's shapes: `POST /v1/embeddings` requests and responses, and the
//! error object every endpoint answers with (`{"error": {"message", "type", "param", "code"}}`),
//! so existing OpenAI clients work against a coordinator unchanged.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// OpenAI's own cap on inputs per embeddings request.
pub const MAX_INPUTS: usize = 2048;
/// The longest text input accepted, in bytes, before tokenization.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// An API error: the HTTP status and OpenAI's error object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { status: 404, message: message.into(), kind: "not_found_error", param: None, code: None }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: 404,
            message: format!("The model `{model}` does not exist or is not served by this coordinator"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError { status: 503, message: message.into(), kind: "server_error", param: None, code: Some("no_capacity") }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// The response body.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

/// What to embed: texts (tokenized by the coordinator) or token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmbeddingInputs {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl EmbeddingInputs {
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInputs::Texts(texts) => texts.len(),
            EmbeddingInputs::Tokens(tokens) => tokens.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32s in base64, as OpenAI's clients ask for by default.
    Base64,
}

/// A validated `POST /v1/embeddings` request.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: EmbeddingInputs,
    pub encoding_format: EncodingFormat,
    /// Must equal the model's width when given: these models cannot shorten their vectors.
    pub dimensions: Option<usize>,
}

/// The request as sent, before validation. Unknown fields (`user`, ...) are ignored, as
/// OpenAI's API does.
#[derive(Deserialize)]
struct RawRequest {
    input: Option<Value>,
    model: Option<Value>,
    #[serde(default)]
    encoding_format: Option<Value>,
    #[serde(default)]
    dimensions: Option<Value>,
}

impl EmbeddingsRequest {
    /// Parses and checks a request body; every problem is an `invalid_request_error` that names
    /// the field.
    pub fn parse(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
        let not_an_object = |detail: String| ApiError::invalid(None, format!("The request body is not a JSON object of the expected shape: {detail}"));
        let body: Value = serde_json::from_slice(body).map_err(|e| not_an_object(e.to_string()))?;
        if !body.is_object() {
            return Err(not_an_object("it must be an object with `model` and `input`".into()));
        }
        let raw: RawRequest = serde_json::from_value(body).map_err(|e| not_an_object(e.to_string()))?;
        let model = match raw.model {
            Some(Value::String(model)) if !model.is_empty() => model,
            Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a non-empty string")),
            None => return Err(ApiError::invalid(Some("model"), "you must provide a model parameter")),
        };
        let input = raw.input.ok_or_else(|| ApiError::invalid(Some("input"), "you must provide an input parameter"))?;
        let inputs = parse_inputs(input)?;
        let encoding_format = match raw.encoding_format {
            None | Some(Value::Null) => EncodingFormat::Float,
            Some(value) => serde_json::from_value(value)
                .map_err(|_| ApiError::invalid(Some("encoding_format"), "`encoding_format` must be \"float\" or \"base64\""))?,
        };
        let dimensions = match raw.dimensions {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(d) if d > 0 => Some(d as usize),
                _ => return Err(ApiError::invalid(Some("dimensions"), "`dimensions` must be a positive integer")),
            },
        };
        Ok(EmbeddingsRequest { model, inputs, encoding_format, dimensions })
    }
}

fn parse_inputs(input: Value) -> Result<EmbeddingInputs, ApiError> {
    const SHAPE: &str = "`input` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids";
    let bad = |message: String| ApiError::invalid(Some("input"), message);
    let text = |value: Value, index: usize| -> Result<String, ApiError> {
        let Value::String(text) = value else { return Err(bad(format!("{SHAPE}; item {index} is not a string"))) };
        if text.is_empty() {
            return Err(bad(format!("input {index} is empty")));
        }
        if text.len() > MAX_INPUT_BYTES {
            return Err(bad(format!("input {index} is {} bytes; at most {MAX_INPUT_BYTES} are accepted", text.len())));
        }
        Ok(text)
    };
    let tokens = |value: &Value, index: usize| -> Result<Vec<u32>, ApiError> {
        let Value::Array(items) = value else { return Err(bad(format!("{SHAPE}; item {index} is not an array of token ids"))) };
        if items.is_empty() {
            return Err(bad(format!("input {index} is empty")));
        }
        items
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| bad(format!("input {index} holds something other than token ids (integers from 0 to 2^32 - 1)")))
    };
    let inputs = match input {
        Value::String(_) => EmbeddingInputs::Texts(vec![text(input, 0)?]),
        Value::Array(items) if items.is_empty() => return Err(bad("`input` is an empty array".into())),
        Value::Array(items) if items.len() > MAX_INPUTS => {
            return Err(bad(format!("`input` has {} items; at most {MAX_INPUTS} are accepted per request", items.len())));
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => EmbeddingInputs::Texts(items.into_iter().enumerate().map(|(i, v)| text(v, i)).collect::<Result<_, _>>()?),
            Value::Number(_) => EmbeddingInputs::Tokens(vec![tokens(&Value::Array(items), 0)?]),
            Value::Array(_) => EmbeddingInputs::Tokens(items.iter().enumerate().map(|(i, v)| tokens(v, i)).collect::<Result<_, _>>()?),
            _ => return Err(bad(SHAPE.into())),
        },
        _ => return Err(bad(SHAPE.into())),
    };
    Ok(inputs)
}

/// The `POST /v1/embeddings` response.
#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// A vector as the request's `encoding_format` asked.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

impl EmbeddingsResponse {
    /// The response for `vectors` (in input order) that took `tokens` input tokens.
    pub fn new(model: &str, vectors: Vec<Vec<f32>>, tokens: usize, format: EncodingFormat) -> EmbeddingsResponse {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| EmbeddingData {
                object: "embedding",
                index,
                embedding: match format {
                    EncodingFormat::Float => EmbeddingVector::Float(vector),
                    EncodingFormat::Base64 => EmbeddingVector::Base64(base64(&vector)),
                },
            })
            .collect();
        EmbeddingsResponse { object: "list", data, model: model.into(), usage: Usage { prompt_tokens: tokens, total_tokens: tokens } }
    }
}

/// Standard base64 (with padding) of the vector's little-endian f32 bytes.
fn base64(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((word >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<EmbeddingsRequest, ApiError> {
        EmbeddingsRequest::parse(body.as_bytes())
    }

    #[test]
    fn every_input_shape_openai_accepts_parses() {
        let r = parse(r#"{"model": "minilm", "input": "hello", "user": "u1"}"#).unwrap();
        assert_eq!(r.inputs, EmbeddingInputs::Texts(vec!["hello".into()]));
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        let r = parse(r#"{"model": "minilm", "input": ["a", "b"], "encoding_format": "base64"}"#).unwrap();
        assert_eq!(r.inputs, EmbeddingInputs::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        let r = parse(r#"{"model": "minilm", "input": [101, 7592, 102]}"#).unwrap();
        assert_eq!(r.inputs, EmbeddingInputs::Tokens(vec![vec![101, 7592, 102]]));
        let r = parse(r#"{"model": "minilm", "input": [[101, 102], [7]], "dimensions": 384}"#).unwrap();
        assert_eq!(r.inputs, EmbeddingInputs::Tokens(vec![vec![101, 102], vec![7]]));
        assert_eq!(r.dimensions, Some(384));
    }

    #[test]
    fn bad_requests_name_the_field_at_fault() {
        let too_many = format!(r#"{{"model": "m", "input": [{}]}}"#, vec!["\"x\""; MAX_INPUTS + 1].join(","));
        let too_long = format!(r#"{{"model": "m", "input": "{}"}}"#, "x".repeat(MAX_INPUT_BYTES + 1));
        let cases: [(&str, Option<&str>, &str); 13] = [
            ("not json", None, "not a JSON object"),
            ("[1, 2]", None, "not a JSON object"),
            (r#"{"input": "x"}"#, Some("model"), "provide a model"),
            (r#"{"model": 3, "input": "x"}"#, Some("model"), "non-empty string"),
            (r#"{"model": "m"}"#, Some("input"), "provide an input"),
            (r#"{"model": "m", "input": []}"#, Some("input"), "empty array"),
            (r#"{"model": "m", "input": ""}"#, Some("input"), "input 0 is empty"),
            (r#"{"model": "m", "input": ["a", 3]}"#, Some("input"), "item 1 is not a string"),
            (r#"{"model": "m", "input": [1, -2]}"#, Some("input"), "token ids"),
            (r#"{"model": "m", "input": {"a": 1}}"#, Some("input"), "must be a string"),
            (r#"{"model": "m", "input": "x", "encoding_format": "hex"}"#, Some("encoding_format"), "\"base64\""),
            (&too_many, Some("input"), "at most 2048"),
            (&too_long, Some("input"), "bytes; at most"),
        ];
        for (body, param, expected) in cases {
            let error = parse(body).unwrap_err();
            assert_eq!((error.status, error.param), (400, param), "{body:.60}: {error}");
            assert!(error.message.contains(expected), "{body:.60}: {error}");
            let json = error.to_json();
            assert_eq!(json["error"]["type"], "invalid_request_error");
            assert_eq!(json["error"]["message"], error.message);
        }
    }

    #[test]
    fn responses_have_openais_shape_in_both_encodings() {
        let vectors = vec![vec![1.0f32, -2.5], vec![0.0, 0.5]];
        let json = serde_json::to_value(EmbeddingsResponse::new("minilm", vectors.clone(), 7, EncodingFormat::Float)).unwrap();
        assert_eq!(json["object"], "list");
        assert_eq!(json["data"][1]["index"], 1);
        assert_eq!(json["data"][1]["object"], "embedding");
        assert_eq!(json["data"][0]["embedding"], serde_json::json!([1.0, -2.5]));
        assert_eq!(json["usage"]["prompt_tokens"], 7);
        let json = serde_json::to_value(EmbeddingsResponse::new("minilm", vectors, 7, EncodingFormat::Base64)).unwrap();
        // 1.0 = 00 00 80 3f, -2.5 = 00 00 20 c0 (little-endian).
        assert_eq!(json["data"][0]["embedding"], "AACAPwAAIMA=");
    }
}
