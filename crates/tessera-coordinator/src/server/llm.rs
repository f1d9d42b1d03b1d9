//! The language model the coordinator serves: its GGUF file, tokenizer and chat template; its
//! embedding and head on the coordinator's own GPU (`EndsStage`: contributors see hidden states,
//! never token ids); and its span shards, written into the blob store once per block range.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tessera_engine::Gpu;
use tessera_engine::gguf::{Gguf, Value};
use tessera_engine::llama::{Llama, LlamaConfig, Stages};
use tessera_engine::stage::EndsStage;
use tessera_engine::tokenizer::{ChatTemplate, TextTokenizer};

use crate::blobs::BlobStore;

/// Where the served language model comes from.
#[derive(Debug, Clone)]
pub struct LlamaSource {
    /// Its name in the API (`smollm2`).
    pub name: String,
    /// A llama-family GGUF.
    pub path: PathBuf,
}

/// The model, loaded.
pub struct ServedLlama {
    pub name: String,
    pub path: PathBuf,
    pub config: LlamaConfig,
    pub tokenizer: TextTokenizer,
    /// `None` when the file has none: chat completions are refused.
    pub template: Option<ChatTemplate>,
    pub eos: Option<u32>,
    /// Bytes of weights per block (the blocks' tensors in the file, averaged).
    pub block_weight_bytes: u64,
    /// Floating-point operations per block per token (a decode step).
    pub block_flops: f64,
    pub gpu: Arc<Gpu>,
    pub ends: EndsStage,
    /// Shards written so far, by block range: their CIDs.
    shards: Mutex<HashMap<Range<u32>, String>>,
}

impl std::fmt::Debug for ServedLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedLlama").field("name", &self.name).field("path", &self.path).field("config", &self.config).finish()
    }
}

/// Opens the model and loads its ends on this machine's GPU. Blocks (run it on a blocking
/// thread); the error says what is missing, for the 503 the generation endpoints answer.
pub fn load(source: &LlamaSource) -> Result<ServedLlama, String> {
    let file = source.path.display().to_string();
    let open = || std::fs::File::open(&source.path).map_err(|e| format!("cannot open {file}: {e} (fetch it with `tessera models fetch {}`)", source.name));
    let gguf = Gguf::read(&file, &mut open()?).map_err(|e| e.to_string())?;
    let config = LlamaConfig::from_gguf(&file, &gguf).map_err(|e| e.to_string())?;
    let tokenizer = TextTokenizer::from_gguf(&file, &gguf).map_err(|e| e.to_string())?;
    let template = ChatTemplate::from_gguf(&file, &gguf).ok();
    let eos = gguf.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).map(|id| id as u32);
    let block_bytes: u64 = gguf.tensors.iter().filter(|t| t.name.starts_with("blk.")).map(|t| t.bytes).sum();
    let block_weight_bytes = block_bytes / config.blocks.max(1) as u64;
    let block_flops = {
        let c = &config;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        2.0 * (c.dim * (q + 2 * kv) + q * c.dim + 3 * c.dim * c.ffn) as f64
    };
    let gpu = pollster::block_on(Gpu::request()).map_err(|e| format!("this coordinator has no GPU adapter for {}'s embedding and head: {e}", source.name))?;
    let model = Llama::load(&gpu, &file, &mut open()?, &Stages { embedding: true, blocks: 0..0, head: true }).map_err(|e| e.to_string())?;
    Ok(ServedLlama {
        name: source.name.clone(),
        path: source.path.clone(),
        config,
        tokenizer,
        template,
        eos,
        block_weight_bytes,
        block_flops,
        gpu: Arc::new(gpu),
        ends: EndsStage::new(model),
        shards: Mutex::new(HashMap::new()),
    })
}

impl ServedLlama {
    /// The CID of the shard of `blocks`, if it is in the blob store already.
    pub fn shard_cid(&self, blocks: &Range<u32>) -> Option<String> {
        self.shards.lock().ok()?.get(blocks).cloned()
    }

    /// The CID of the shard of `blocks`, written into `blobs` the first time. Blocks (run it
    /// on a blocking thread).
    pub fn shard(&self, blobs: &BlobStore, blocks: Range<u32>) -> Result<String, String> {
        if let Some(cid) = self.shards.lock().map_err(|_| "the shard table's lock is poisoned")?.get(&blocks) {
            return Ok(cid.clone());
        }
        let file = self.path.display().to_string();
        let mut source = std::fs::File::open(&self.path).map_err(|e| format!("cannot open {file}: {e}"))?;
        let mut bytes = Vec::new();
        tessera_engine::shard::write_span_shard(&file, &mut source, blocks.start as usize..blocks.end as usize, &mut bytes).map_err(|e| e.to_string())?;
        let name = format!("{} blocks {}..{}", self.name, blocks.start, blocks.end);
        let cid = blobs.insert(&name, &mut bytes.as_slice()).map_err(|e| e.to_string())?.to_string();
        self.shards.lock().map_err(|_| "the shard table's lock is poisoned")?.insert(blocks, cid.clone());
        Ok(cid)
    }
}
