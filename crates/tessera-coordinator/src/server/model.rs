//! Publishing the embedding model: its `config.json` and `model.safetensors` go into the blob
//! store, then a `ModelManifest` naming them; the manifest's CID is the model id units carry.
//! The tokenizer stays here: the coordinator tokenizes, contributors never do.

use std::collections::BTreeMap;
use std::path::Path;

use tessera_engine::bert::BertConfig;
use tessera_engine::cid::Cid;
use tessera_engine::tokenizer::TextTokenizer;
use tessera_protocol::{Architecture, ModelManifest};

use crate::blobs::BlobStore;
use crate::server::ServerError;

/// The model as the coordinator serves it.
#[derive(Debug)]
pub struct PublishedModel {
    /// The API name (`minilm`).
    pub name: String,
    /// The manifest's CID: `Work::Embedding { model }`.
    pub cid: String,
    pub config: BertConfig,
    pub tokenizer: TextTokenizer,
}

/// Adds the model's files and manifest to `blobs` (files already there are not copied again).
pub fn publish(blobs: &BlobStore, name: &str, dir: &Path) -> Result<PublishedModel, ServerError> {
    let fail = |detail: String| ServerError::Model { name: name.into(), detail };
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| fail(format!("reading {}: {e}", path.display())))
    };
    let config_bytes = read("config.json")?;
    let config = BertConfig::from_json(&dir.join("config.json").display().to_string(), &config_bytes)
        .map_err(|e| fail(e.to_string()))?;
    let tokenizer = TextTokenizer::from_json(&dir.join("tokenizer.json").display().to_string(), &read("tokenizer.json")?)
        .map_err(|e| fail(e.to_string()))?;

    let mut files = BTreeMap::new();
    for file in ["config.json", "model.safetensors"] {
        let path = dir.join(file);
        let shown = path.display().to_string();
        let open = || std::fs::File::open(&path).map_err(|e| fail(format!("opening {shown}: {e}")));
        let cid = Cid::of_reader(&shown, &mut open()?).map_err(|e| fail(e.to_string()))?;
        if !blobs.contains(&cid) {
            blobs.insert_expecting(&cid, &shown, &mut open()?)?;
        }
        files.insert(file.to_string(), cid.to_string());
    }
    let manifest = ModelManifest::new(name, Architecture::Bert, files).to_bytes();
    let cid = blobs.insert("model manifest", &mut manifest.as_slice())?;
    Ok(PublishedModel { name: name.into(), cid: cid.to_string(), config, tokenizer })
}

impl PublishedModel {
    /// Token ids for `text`, cut to the model's positions: the last position keeps the
    /// closing `[SEP]`. Returns the ids and whether the text was truncated.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, bool), String> {
        let mut ids = self.tokenizer.encode(text, true).map_err(|e| e.to_string())?;
        let max = self.config.max_position_embeddings;
        if max == 0 {
            return Err("the model's config allows no positions".into());
        }
        if ids.len() <= max {
            return Ok((ids, false));
        }
        let last = ids[ids.len() - 1];
        ids.truncate(max);
        ids[max - 1] = last;
        Ok((ids, true))
    }
}
