//! Tokenizers against the references' token ids: SmolLM2's BPE from its GGUF metadata and
//! MiniLM's WordPiece from its `tokenizer.json`.

use serde::Deserialize;
use tessera_engine::gguf::Gguf;
use tessera_engine::tokenizer::TextTokenizer;

/// A default model's file in the cache, or `None` (loudly) outside CI.
pub fn cached(relative: &str) -> Option<std::path::PathBuf> {
    let path = tessera_engine::cache::model_cache_dir().join(relative);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "CI is set but {} is missing: run `tessera models fetch`", path.display());
    eprintln!("NOT RUN: {} is missing; run `tessera models fetch`", path.display());
    None
}

#[derive(Deserialize)]
struct Cases<T> {
    cases: Vec<T>,
}

#[derive(Deserialize)]
struct LlamaCase {
    text: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

#[derive(Deserialize)]
struct BertCase {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn smollm2_bpe_from_gguf_gives_the_reference_ids() {
    let Some(path) = cached("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let name = path.display().to_string();
    let gguf = Gguf::read(&name, &mut std::fs::File::open(&path).unwrap()).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&name, &gguf).unwrap();
    let fixture: Cases<LlamaCase> = serde_json::from_str(include_str!("../data/smollm2-135m-instruct-q4_1.json")).unwrap();
    for case in fixture.cases {
        assert_eq!(tokenizer.encode(&case.text, false).unwrap(), case.prompt_ids, "{:?}", case.text);
        assert_eq!(tokenizer.decode(&case.prompt_ids).unwrap(), case.text);
        assert_eq!(tokenizer.decode(&case.greedy_ids).unwrap(), case.greedy_text);
    }
}

#[test]
fn minilm_wordpiece_gives_the_reference_ids() {
    let Some(path) = cached("minilm/tokenizer.json") else { return };
    let tokenizer = TextTokenizer::from_json(&path.display().to_string(), &std::fs::read(&path).unwrap()).unwrap();
    let fixture: Cases<BertCase> = serde_json::from_str(include_str!("../data/all-minilm-l6-v2.json")).unwrap();
    for case in fixture.cases {
        assert_eq!(tokenizer.encode(&case.text, true).unwrap(), case.ids, "{:?}", case.text);
    }
}

#[test]
fn bad_tokenizer_files_are_errors_naming_the_file() {
    let error = TextTokenizer::from_json("broken/tokenizer.json", b"{\"not\": 1}").unwrap_err().to_string();
    assert!(error.starts_with("broken/tokenizer.json: "), "{error}");
}
