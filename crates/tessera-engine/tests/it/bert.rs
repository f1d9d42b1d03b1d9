//! all-MiniLM-L6-v2 (safetensors f32) against the float64 reference embeddings in `tests/data`,
//! one sentence at a time and all padded into one batch; and broken model files.

use std::io::Cursor;

use serde::Deserialize;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::safetensors::SafeTensors;

use crate::gpu;
use crate::tokenizer::cached;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f64>,
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * y).sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn embeddings_match_the_reference_alone_and_batched() {
    let Some(gpu) = gpu() else { return };
    let Some(weights) = cached("minilm/model.safetensors") else { return };
    let config_path = weights.with_file_name("config.json");
    let config = BertConfig::from_json(&config_path.display().to_string(), &std::fs::read(&config_path).unwrap()).unwrap();
    let model = Bert::load(gpu, config, &weights.display().to_string(), &mut std::fs::File::open(&weights).unwrap()).unwrap();
    let fixture: Fixture = serde_json::from_str(include_str!("../data/all-minilm-l6-v2.json")).unwrap();

    let all: Vec<Vec<u32>> = fixture.cases.iter().map(|c| c.ids.clone()).collect();
    let batched = pollster::block_on(model.embed(gpu, &all)).unwrap();
    for (case, got) in fixture.cases.iter().zip(&batched) {
        let alone = pollster::block_on(model.embed(gpu, std::slice::from_ref(&case.ids))).unwrap();
        for (how, embedding) in [("alone", &alone[0]), ("batched", got)] {
            let similarity = cosine(embedding, &case.embedding);
            assert!(similarity >= 0.9999, "{:?} ({how}): cosine {similarity}", case.text);
        }
    }
    let error = pollster::block_on(model.embed(gpu, &[vec![5, 40_000]])).unwrap_err().to_string();
    assert!(error.contains("40000"), "{error}");
}

/// Broken safetensors files: each is an error naming the file and the problem.
#[test]
fn broken_safetensors_are_errors_that_say_what_is_wrong() {
    let file = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    };
    let ok = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    assert!(SafeTensors::read("ok.safetensors", &mut Cursor::new(file(ok, 16))).is_ok());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "too short"),
        (file(ok, 8), "truncated: tensor w ends at byte"),
        (u64::MAX.to_le_bytes().to_vec(), "the header claims"),
        (file("{not json", 0), "not valid JSON"),
        (file(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, 16), "do not hold [3] of F32"),
        (file(r#"{"w":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}"#, 16), "unknown dtype Q9"),
    ];
    for (bytes, expected) in cases {
        let error = SafeTensors::read("bad.safetensors", &mut Cursor::new(bytes)).unwrap_err().to_string();
        assert!(error.starts_with("bad.safetensors: ") && error.contains(expected), "{error:?} does not say {expected:?}");
    }
    let st = SafeTensors::read("ok.safetensors", &mut Cursor::new(file(ok, 16))).unwrap();
    let error = st.read_f32("ok.safetensors", &mut Cursor::new(file(ok, 16)), "w", &[4]).unwrap_err().to_string();
    assert!(error.contains("expected F32 [4]"), "{error}");
}
