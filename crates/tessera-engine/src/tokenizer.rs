//! Text to token ids and back, natively (the coordinator runs the embedding, so browsers never
//! tokenize): byte-level BPE built from a GGUF's metadata (SmolLM2 and other GPT-2-style llama
//! models), or any Hugging Face `tokenizer.json` (MiniLM's WordPiece); and [`ChatTemplate`], a
//! model's chat template rendered with `minijinja` (the one place that renders it: `tessera run
//! --chat` and the coordinator's chat completions give the model the same text).

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::gguf::{Gguf, Value};
use crate::error::ModelError;

/// GGUF token types that are not text: control tokens and user-defined ones (`<|im_start|>`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

pub struct TextTokenizer {
    inner: Tokenizer,
    file: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("file", &self.file).field("vocab", &self.inner.get_vocab_size(true)).finish()
    }
}

impl TextTokenizer {
    /// The byte-level BPE described by `tokenizer.ggml.*` in a GGUF file.
    pub fn from_gguf(file: &str, gguf: &Gguf) -> Result<TextTokenizer, ModelError> {
        let invalid = |problem: String| ModelError::Invalid { file: file.to_string(), problem };
        let text = |key: &str| gguf.get(key).and_then(Value::as_str);
        let array = |key: &str| gguf.get(key).and_then(Value::as_array).ok_or_else(|| invalid(format!("metadata {key} is missing")));
        match text("tokenizer.ggml.model") {
            Some("gpt2") => {}
            other => return Err(invalid(format!("tokenizer model {other:?} is not supported (gpt2-style BPE is)"))),
        }
        // The pre-tokenizer splits text before BPE; it must be the one the model was trained with.
        let pre = match text("tokenizer.ggml.pre") {
            Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            Some("gpt2" | "default") | None => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            Some(other) => return Err(invalid(format!("pre-tokenizer {other:?} is not supported (smollm and gpt2 are)"))),
        };
        let tokens = array("tokenizer.ggml.tokens")?;
        let mut vocab = Vocab::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            let token = token.as_str().ok_or_else(|| invalid(format!("token {id} is not a string")))?;
            vocab.insert(token.to_string(), id as u32);
        }
        let merges = array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                let (a, b) = merge.as_str().and_then(|m| m.split_once(' ')).ok_or_else(|| invalid(format!("merge {i} is not \"a b\"")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| invalid(format!("building the BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let types = gguf.get("tokenizer.ggml.token_type").and_then(Value::as_array).unwrap_or(&[]);
        let special: Vec<AddedToken> = types
            .iter()
            .zip(tokens)
            .filter(|(ty, _)| ty.as_i64().is_some_and(|t| t == CONTROL || t == USER_DEFINED))
            .filter_map(|(_, token)| token.as_str())
            .map(|token| AddedToken::from(token.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);
        Ok(TextTokenizer { inner, file: file.to_string() })
    }

    /// A Hugging Face `tokenizer.json`, with its normalizer, pre-tokenizer and post-processor.
    /// Its padding and truncation settings are dropped: batching pads, and the model checks length.
    pub fn from_json(file: &str, json: &[u8]) -> Result<TextTokenizer, ModelError> {
        let mut inner = Tokenizer::from_bytes(json).map_err(|e| ModelError::Invalid { file: file.to_string(), problem: format!("not a tokenizer: {e}") })?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| ModelError::Invalid { file: file.to_string(), problem: e.to_string() })?;
        Ok(TextTokenizer { inner, file: file.to_string() })
    }

    /// Token ids for `text`; `special` adds what the tokenizer adds around a sequence ([CLS]/[SEP]).
    /// Special tokens written in the text (`<|im_start|>`) are recognised either way.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self.inner.encode(text, special).map_err(|e| self.failed(format!("encoding: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text for `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(|e| self.failed(format!("decoding: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn failed(&self, problem: String) -> ModelError {
        ModelError::Invalid { file: self.file.clone(), problem }
    }
}

/// A model's chat template (`tokenizer.chat_template`, Jinja).
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    file: String,
    source: String,
}

impl ChatTemplate {
    /// The template of the GGUF file `file`, checked to parse.
    pub fn from_gguf(file: &str, gguf: &Gguf) -> Result<ChatTemplate, ModelError> {
        let source = gguf
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::invalid(file, "it has no chat template (tokenizer.chat_template)"))?;
        let template = ChatTemplate { file: file.into(), source: source.into() };
        minijinja::Environment::new().template_from_str(&template.source).map_err(|e| template.error("does not parse", &e))?;
        Ok(template)
    }

    fn error(&self, what: &str, e: &minijinja::Error) -> ModelError {
        ModelError::invalid(&self.file, format!("the chat template {what}: {e}"))
    }

    /// The prompt for `messages` (role, content), ending with the assistant's turn.
    pub fn render<'a>(&self, messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<String, ModelError> {
        let env = minijinja::Environment::new();
        let template = env.template_from_str(&self.source).map_err(|e| self.error("does not parse", &e))?;
        let messages: Vec<minijinja::Value> =
            messages.into_iter().map(|(role, content)| minijinja::Value::from_pairs([("role", role), ("content", content)])).collect();
        template
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .map_err(|e| self.error("does not render", &e))
    }
}
