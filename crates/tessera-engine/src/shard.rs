//! Span shards: the part of a llama-family GGUF that one contributor needs for its span of
//! blocks, as a GGUF file of its own. A shard holds the span's tensors (`blk.{i}.*`) and the
//! model's metadata without the tokenizer (contributors see hidden states, never token ids), with
//! `llama.vocab_size` spelled out since the vocabulary is gone. [`Llama::load`] reads a shard as
//! it reads the whole file, given the same blocks; the coordinator publishes each shard under its
//! CID, so a contributor downloads and verifies only its own span's bytes.
//!
//! [`Llama::load`]: crate::llama::Llama::load

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::ops::Range;

use crate::ModelError;
use crate::gguf::{Gguf, Value};
use crate::llama::LlamaConfig;

/// Metadata key holding a shard's block range as `[start, end]`.
pub const SHARD_BLOCKS_KEY: &str = "tessera.shard.blocks";

/// Whether tensor `name` belongs to one of `blocks`.
fn in_blocks(name: &str, blocks: &Range<usize>) -> bool {
    name.strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(index, _)| index.parse::<usize>().ok())
        .is_some_and(|index| blocks.contains(&index))
}

/// Writes the shard of `blocks` of the GGUF in `source` (named `file` in errors) to `out` and
/// returns its length in bytes.
pub fn write_span_shard<R: Read + Seek, W: Write>(file: &str, source: &mut R, blocks: Range<usize>, out: &mut W) -> Result<u64, ModelError> {
    let gguf = Gguf::read(file, source)?;
    let config = LlamaConfig::from_gguf(file, &gguf)?;
    if blocks.is_empty() || blocks.end > config.blocks {
        return Err(ModelError::Invalid { file: file.into(), problem: format!("a shard of blocks {blocks:?}: the model has blocks 0..{}", config.blocks) });
    }
    let mut metadata: BTreeMap<String, Value> = gguf.metadata.iter().filter(|(key, _)| !key.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.insert("llama.vocab_size".into(), Value::U64(config.vocab as u64));
    metadata.insert(SHARD_BLOCKS_KEY.into(), Value::Array(vec![Value::U64(blocks.start as u64), Value::U64(blocks.end as u64)]));
    Ok(gguf.write_subset(file, source, &metadata, |tensor| in_blocks(&tensor.name, &blocks), out)?)
}

/// The blocks a shard holds (its `tessera.shard.blocks`), or `None` for a whole model file.
pub fn shard_blocks(gguf: &Gguf) -> Option<Range<usize>> {
    match gguf.get(SHARD_BLOCKS_KEY)?.as_array()? {
        [start, end] => Some(start.as_u64()? as usize..end.as_u64()? as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tensors_are_told_apart_by_index() {
        assert!(in_blocks("blk.10.attn_q.weight", &(10..20)));
        assert!(!in_blocks("blk.1.attn_q.weight", &(10..20)));
        assert!(!in_blocks("blk.20.ffn_up.weight", &(10..20)));
        assert!(!in_blocks("token_embd.weight", &(0..30)));
        assert!(!in_blocks("blk.x.attn_q.weight", &(0..30)));
    }
}
