//! BERT sentence encoders in the page: loading from `config.json` and safetensors bytes,
//! embedding batches of token-id sequences (the coordinator tokenizes; browsers never do), and a
//! timing of sentences per second.

use std::rc::Rc;

use js_sys::Uint8Array;
use serde::{Deserialize, Serialize};
use tessera_engine::Gpu;
use tessera_engine::bert::{Bert, BertConfig};
use wasm_bindgen::prelude::*;

use crate::bytes::JsBytes;
use crate::{check_device, from_json, js_error, now_ms, to_json};

#[derive(Serialize)]
struct Embeddings {
    dim: usize,
    embeddings: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchRequest {
    /// Tokenized sentences, cycled to fill each batch.
    sentences: Vec<Vec<u32>>,
    batch: usize,
    /// Timed batches (after one warm-up batch).
    repeats: usize,
}

#[derive(Serialize)]
struct Bench {
    batch: usize,
    repeats: usize,
    ms: f64,
    sentences_per_s: f64,
}

/// A BERT encoder on the page's GPU.
#[wasm_bindgen]
pub struct BertModel {
    gpu: Rc<Gpu>,
    model: Bert,
}

impl BertModel {
    pub(crate) fn load(gpu: Rc<Gpu>, name: &str, config: &str, bytes: &Uint8Array) -> Result<BertModel, JsError> {
        let config = BertConfig::from_json(&format!("{name} (config)"), config.as_bytes()).map_err(js_error)?;
        let model = Bert::load(&gpu, config, name, &mut JsBytes::reader(bytes)).map_err(js_error)?;
        Ok(BertModel { gpu, model })
    }
}

#[wasm_bindgen]
impl BertModel {
    /// Embeds tokenized sentences (JSON `[[id, ...], ...]`, one padded batch) and resolves to
    /// `{dim, embeddings: [[f32; dim], ...]}`, L2-normalised, in the sentences' order.
    pub async fn embed(&self, sentences: String) -> Result<String, JsError> {
        let sentences: Vec<Vec<u32>> = from_json("sentences", &sentences)?;
        let embeddings = self.model.embed(&self.gpu, &sentences).await.map_err(js_error)?;
        check_device(&self.gpu)?;
        to_json(&Embeddings { dim: self.model.config.hidden_size, embeddings })
    }

    /// Times `{sentences, batch, repeats}`: one warm-up batch, then `repeats` batches of `batch`
    /// sentences (cycling through `sentences`); resolves to `{batch, repeats, ms,
    /// sentences_per_s}`.
    pub async fn bench(&self, request: String) -> Result<String, JsError> {
        let request: BenchRequest = from_json("bench request", &request)?;
        if request.sentences.is_empty() || request.batch == 0 || request.repeats == 0 {
            return Err(js_error("bench request: needs sentences, a batch of at least one and at least one repeat"));
        }
        let batch: Vec<Vec<u32>> = request.sentences.iter().cycle().take(request.batch).cloned().collect();
        self.model.embed(&self.gpu, &batch).await.map_err(js_error)?;
        let start = now_ms();
        for _ in 0..request.repeats {
            self.model.embed(&self.gpu, &batch).await.map_err(js_error)?;
        }
        let ms = now_ms() - start;
        check_device(&self.gpu)?;
        let sentences_per_s = (request.batch * request.repeats) as f64 / ms * 1000.0;
        to_json(&Bench { batch: request.batch, repeats: request.repeats, ms, sentences_per_s })
    }
}
