//! SmolLM2-135M-Instruct (GGUF Q4_1) against the float64 reference in `tests/data`: teacher-forced
//! logits at every position, greedy decoding, and the model split into spans.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;
use tessera_engine::generate::{Sampler, Session};
use tessera_engine::gguf::{Gguf, Value};
use tessera_engine::llama::{KvCache, Llama, LlamaConfig, Stages};
use tessera_engine::{DType, Gpu};

use crate::gpu;

const MODEL: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The reference's own bound: a logit within this of the float64 value, and where the
/// reference's top two are closer than this, either is a legitimate choice.
const TOLERANCE: f32 = 0.05;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    top5: Vec<Top5>,
}

#[derive(Deserialize)]
struct Top5 {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

impl Top5 {
    fn margin(&self) -> f32 {
        self.logits[0] - self.logits[1]
    }
}

fn fixture() -> Fixture {
    let text = include_str!("../data/smollm2-135m-instruct-q4_1.json");
    serde_json::from_str(text).expect("the fixture parses")
}

/// Where `tessera models fetch` puts it.
fn model_path() -> PathBuf {
    tessera_engine::cache::model_cache_dir().join(MODEL)
}

/// The whole model on the shared GPU (loaded once for all tests), or `None` (loudly) where either
/// is missing outside CI.
fn model() -> Option<(&'static Gpu, &'static Llama)> {
    static MODEL: OnceLock<Option<Llama>> = OnceLock::new();
    let gpu = gpu()?;
    let model = MODEL.get_or_init(|| {
        let path = model_path();
        let Ok(mut file) = std::fs::File::open(&path) else {
            assert!(std::env::var_os("CI").is_none(), "CI is set but {} is missing: run `tessera models fetch`", path.display());
            eprintln!("NOT RUN: {} is missing; run `tessera models fetch`", path.display());
            return None;
        };
        let name = path.display().to_string();
        Some(Llama::load(gpu, &name, &mut file, &Stages::all()).expect("the model loads"))
    });
    Some((gpu, model.as_ref()?))
}

/// Logits [ids.len(), vocab] for `ids` from position 0, running the blocks as `spans`.
fn logits(gpu: &Gpu, model: &Llama, spans: &[std::ops::Range<usize>], ids: &[u32]) -> Vec<f32> {
    let c = &model.config;
    let tokens = ids.len();
    let mut caches: Vec<KvCache> = spans.iter().map(|s| model.kv_cache(gpu, s.clone(), 64).unwrap()).collect();
    let ids_t = gpu.upload_u32(&[tokens], ids).unwrap();
    let positions: Vec<u32> = (0..tokens as u32).collect();
    let positions = gpu.upload_u32(&[tokens], &positions).unwrap();
    let hidden = gpu.empty(&[tokens, c.dim], DType::F32).unwrap();
    let out = gpu.empty(&[tokens, c.vocab], DType::F32).unwrap();
    let mut batch = gpu.batch();
    model.embed(&mut batch, &ids_t, &hidden).unwrap();
    for cache in &mut caches {
        model.forward_span(&mut batch, &hidden, &positions, cache).unwrap();
    }
    model.head(&mut batch, &hidden, &out).unwrap();
    batch.submit();
    pollster::block_on(gpu.read_f32(&out)).unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

#[test]
fn teacher_forced_logits_match_the_reference() {
    let Some((gpu, model)) = model() else { return };
    let vocab = model.config.vocab;
    let whole = 0..model.config.blocks;
    for case in fixture().cases {
        let ids: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy_ids).copied().collect();
        let ids = &ids[..case.top5.len()];
        let logits = logits(gpu, model, std::slice::from_ref(&whole), ids);
        for (position, reference) in case.top5.iter().enumerate() {
            let row = &logits[position * vocab..][..vocab];
            if reference.margin() > TOLERANCE {
                assert_eq!(argmax(row), reference.ids[0], "{:?} position {position}: top-1 differs", case.text);
            }
            for (&id, &expected) in reference.ids.iter().zip(&reference.logits) {
                let got = row[id as usize];
                assert!((got - expected).abs() <= TOLERANCE, "{:?} position {position}, token {id}: logit {got}, reference {expected}", case.text);
            }
        }
    }
}

#[test]
fn three_spans_equal_the_whole_model_bit_for_bit() {
    let Some((gpu, model)) = model() else { return };
    let ids = &fixture().cases[0].prompt_ids;
    let whole = logits(gpu, model, std::slice::from_ref(&(0..30)), ids);
    let spans = logits(gpu, model, &[0..10, 10..20, 20..30], ids);
    assert!(whole.iter().zip(&spans).all(|(a, b)| a.to_bits() == b.to_bits()), "spans differ from the whole model");
}

/// Hidden states after every block for `ids`, fed `chunk` tokens at a time through one cache.
fn hidden_in_chunks(gpu: &Gpu, model: &Llama, ids: &[u32], chunk: usize) -> Vec<f32> {
    let dim = model.config.dim;
    let mut cache = model.kv_cache(gpu, 0..model.config.blocks, 64).unwrap();
    let mut rows = Vec::new();
    for (i, part) in ids.chunks(chunk).enumerate() {
        let tokens = part.len();
        let ids_t = gpu.upload_u32(&[tokens], part).unwrap();
        let positions: Vec<u32> = (i * chunk..i * chunk + tokens).map(|p| p as u32).collect();
        let positions = gpu.upload_u32(&[tokens], &positions).unwrap();
        let hidden = gpu.empty(&[tokens, dim], DType::F32).unwrap();
        let mut batch = gpu.batch();
        model.embed(&mut batch, &ids_t, &hidden).unwrap();
        model.forward_span(&mut batch, &hidden, &positions, &mut cache).unwrap();
        batch.submit();
        rows.extend(pollster::block_on(gpu.read_f32(&hidden)).unwrap());
    }
    rows
}

/// Rebuilding a KV cache by replaying a session's tokens a few at a time (as a replacement
/// stage does) gives exactly the states that decoding them one by one gave: short inputs take
/// the same per-row kernels as single tokens, so failover does not change greedy output.
#[test]
fn replaying_in_chunks_of_up_to_eight_tokens_equals_decoding_one_by_one() {
    let Some((gpu, model)) = model() else { return };
    let ids = &fixture().cases[3].prompt_ids;
    let one_by_one = hidden_in_chunks(gpu, model, ids, 1);
    for chunk in [3, 8] {
        let chunked = hidden_in_chunks(gpu, model, ids, chunk);
        let first_difference = one_by_one.iter().zip(&chunked).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(first_difference, None, "chunks of {chunk}: row {:?} differs", first_difference.map(|i| i / model.config.dim));
    }
}

/// The model as the coordinator and three contributors run it: the ends, then three span
/// stages with hidden states crossing as CPU rows, gives the whole model's logits bit for bit,
/// prompt and decode; a replacement stage rebuilt by replaying the session's inputs carries on
/// exactly; and bad input to a stage is an error, not a wrong answer.
#[test]
fn stages_compose_to_the_whole_model_and_a_replacement_carries_on() {
    use tessera_engine::generate::Session;
    use tessera_engine::stage::{EndsStage, SpanStage};
    let Some((gpu, model)) = model() else { return };
    let path = model_path();
    let load = |stages: Stages| Llama::load(gpu, "model", &mut std::fs::File::open(&path).unwrap(), &stages).unwrap();
    let ends = EndsStage::new(load(Stages { embedding: true, blocks: 0..0, head: true }));
    let spans = [0..10, 10..20, 20..30];
    let mut stages: Vec<SpanStage> = spans.iter().map(|b| SpanStage::new(load(Stages { embedding: false, blocks: b.clone(), head: false }), b.clone(), 4).unwrap()).collect();

    let mut whole = Session::new(gpu, model, 64).unwrap();
    let prompt = fixture().cases[1].prompt_ids.clone();
    let mut feed = prompt.clone();
    let mut inputs_of_middle: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut position = 0;
    for _ in 0..4 {
        let expected = pollster::block_on(whole.feed(&feed)).unwrap();
        let mut hidden = pollster::block_on(ends.embed(gpu, &feed)).unwrap();
        for (i, stage) in stages.iter_mut().enumerate() {
            if i == 1 {
                inputs_of_middle.push((position, hidden.clone()));
            }
            hidden = pollster::block_on(stage.forward(gpu, 7, 64, position, &hidden)).unwrap();
        }
        let logits = pollster::block_on(ends.logits(gpu, &hidden)).unwrap();
        assert!(logits.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "stages differ from the whole model at position {position}");
        position += feed.len();
        feed = vec![argmax(&logits)];
    }

    // The middle stage is lost; its replacement replays the session's inputs in the chunks they
    // first came in (the prompt, then decoded tokens merged up to eight), then takes the next step.
    let mut replacement = SpanStage::new(load(Stages { embedding: false, blocks: 10..20, head: false }), 10..20, 4).unwrap();
    let decoded: Vec<f32> = inputs_of_middle[1..].iter().flat_map(|(_, h)| h.clone()).collect();
    pollster::block_on(replacement.forward(gpu, 7, 64, 0, &inputs_of_middle[0].1)).unwrap();
    pollster::block_on(replacement.forward(gpu, 7, 64, inputs_of_middle[1].0, &decoded)).unwrap();
    assert_eq!(replacement.cached(7), stages[1].cached(7));
    let step = pollster::block_on(ends.embed(gpu, &feed)).unwrap();
    let before = pollster::block_on(stages[0].forward(gpu, 7, 64, position, &step)).unwrap();
    let a = pollster::block_on(stages[1].forward(gpu, 7, 64, position, &before)).unwrap();
    let b = pollster::block_on(replacement.forward(gpu, 7, 64, position, &before)).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "the replacement computes differently");

    // Bad input from a peer.
    let dim = model.config.dim;
    let stage = &mut stages[2];
    let fail = |r: Result<Vec<f32>, tessera_engine::EngineError>| r.unwrap_err().to_string();
    assert!(fail(pollster::block_on(stage.forward(gpu, 7, 64, 0, &[0.0; 5]))).contains("not rows of 576"));
    let mut nan = vec![0.0; dim];
    nan[3] = f32::NAN;
    assert!(fail(pollster::block_on(stage.forward(gpu, 7, 64, 0, &nan))).contains("value 3 is NaN"));
    assert!(fail(pollster::block_on(stage.forward(gpu, 7, 64, 100, &vec![0.0; dim]))).contains("holds only"));
    assert!(fail(pollster::block_on(stage.forward(gpu, 8, 2, 0, &vec![0.0; 3 * dim]))).contains("exceed"));
    for session in 9..12 {
        let _ = pollster::block_on(stage.forward(gpu, session, 4, 0, &vec![0.0; dim]));
    }
    assert!(fail(pollster::block_on(stage.forward(gpu, 12, 4, 0, &vec![0.0; dim]))).contains("sessions are open"));
    assert_eq!(stage.sessions(), 4, "a failed first step leaves no cache");
    assert!(!stage.end(12) && stage.end(9));
    assert!(fail(pollster::block_on(ends.embed(gpu, &[u32::MAX]))).contains("outside the vocabulary"));
}

/// Several sessions' steps through a span in one batch (their rows stacked, at most eight in
/// all) give each session bit for bit what running it alone gives, prompt, decode and replay
/// alike, in one submission and one readback; positions fed again with the states they came
/// with are answered as before without the GPU; a bad step fails the whole batch and changes no
/// session. The span runs on a device of its own, so its counters are this test's alone.
#[test]
fn sessions_batched_through_a_span_compute_as_each_alone() {
    use tessera_engine::stage::{SpanStage, Step};
    let Some(_) = model() else { return };
    let gpu = pollster::block_on(Gpu::request()).unwrap();
    let blocks = 4..7;
    let load = || Llama::load(&gpu, "model", &mut std::fs::File::open(model_path()).unwrap(), &Stages { embedding: false, blocks: blocks.clone(), head: false }).unwrap();
    let (mut alone, mut batched) = (SpanStage::new(load(), blocks.clone(), 4).unwrap(), SpanStage::new(load(), blocks.clone(), 4).unwrap());
    let dim = alone.dim();
    let seed = crate::seed();
    let mut rng = tessera_engine::Rng::new(seed);
    // Rounds of (session, start, rows): prompts of different lengths, decode steps beside a new
    // session's prompt, and a replay that cuts session 1 back.
    let rounds: [&[(u64, usize, usize)]; 3] = [&[(1, 0, 3), (2, 0, 1), (3, 0, 2)], &[(2, 1, 2), (1, 3, 1), (3, 2, 1), (4, 0, 4)], &[(1, 2, 2), (4, 4, 1)]];
    // Every step's (session, start, input, output), for the repeats below.
    let mut history: Vec<(u64, usize, Vec<f32>, Vec<f32>)> = Vec::new();
    for (round, steps) in rounds.iter().enumerate() {
        let inputs: Vec<Vec<f32>> = steps.iter().map(|&(_, _, rows)| rng.vec(rows * dim, -2.0, 2.0)).collect();
        let expected: Vec<Vec<f32>> =
            steps.iter().zip(&inputs).map(|(&(session, start, _), hidden)| pollster::block_on(alone.forward(&gpu, session, 16, start, hidden)).unwrap()).collect();
        let steps: Vec<Step> = steps.iter().zip(&inputs).map(|(&(session, start, _), hidden)| Step { session, capacity: 16, start, hidden }).collect();
        let before = gpu.counters();
        let outputs = pollster::block_on(batched.forward_batch(&gpu, &steps)).unwrap();
        let after = gpu.counters();
        assert_eq!((after.submits - before.submits, after.readbacks - before.readbacks), (1, 1), "round {round}: submits and readbacks");
        for (step, (got, want)) in steps.iter().zip(outputs.iter().zip(&expected)) {
            assert_eq!(got.len(), want.len());
            let same = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "round {round}, session {}: batched differs from alone (seed {seed})", step.session);
            assert_eq!(batched.cached(step.session), alone.cached(step.session));
            history.push((step.session, step.start, step.hidden.to_vec(), got.clone()));
        }
    }

    // A replay through a span that did not change: session 4's prompt and session 2's first
    // rows again, with the same states, are answered as before with no GPU work, and the caches
    // keep the positions after them; beside a step that is new, one submission for that alone.
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let (prompt_in, prompt_out) = history.iter().find(|h| h.0 == 4 && h.1 == 0).map(|h| (h.2.clone(), h.3.clone())).unwrap();
    let (two_in, two_out) = history.iter().find(|h| h.0 == 2 && h.1 == 1).map(|h| (h.2.clone(), h.3.clone())).unwrap();
    let (held_four, held_two) = (batched.cached(4), batched.cached(2));
    let before = gpu.counters();
    let outputs = pollster::block_on(batched.forward_batch(&gpu, &[Step { session: 4, capacity: 16, start: 0, hidden: &prompt_in }, Step { session: 2, capacity: 16, start: 1, hidden: &two_in }])).unwrap();
    assert_eq!(gpu.counters().submits, before.submits, "repeats need no submission");
    assert!(same(&outputs[0], &prompt_out) && same(&outputs[1], &two_out), "repeats answer what the span gave");
    assert_eq!((batched.cached(4), batched.cached(2), batched.repeats()), (held_four, held_two, 2));
    let next = rng.vec(dim, -2.0, 2.0);
    let want = pollster::block_on(alone.forward(&gpu, 4, 16, held_four, &next)).unwrap();
    let before = gpu.counters();
    let outputs = pollster::block_on(batched.forward_batch(&gpu, &[Step { session: 2, capacity: 16, start: 1, hidden: &two_in }, Step { session: 4, capacity: 16, start: held_four, hidden: &next }])).unwrap();
    assert_eq!(gpu.counters().submits - before.submits, 1);
    assert!(same(&outputs[0], &two_out) && same(&outputs[1], &want), "a repeat beside a new step");
    // Other states for positions held: computed again, the cache cut back to them.
    let other: Vec<f32> = two_in.iter().map(|v| v + 0.25).collect();
    let want = pollster::block_on(alone.forward(&gpu, 2, 16, 1, &other)).unwrap();
    let got = pollster::block_on(batched.forward(&gpu, 2, 16, 1, &other)).unwrap();
    assert!(same(&got, &want) && !same(&got, &two_out));
    assert_eq!((batched.cached(2), batched.repeats()), (3, 3));

    // Bad batches: each fails whole and leaves every session as it was.
    let held: Vec<usize> = (1..=5).map(|s| batched.cached(s)).collect();
    let row = vec![0.5; dim];
    let mut nan = row.clone();
    nan[7] = f32::NAN;
    let twelve = row.repeat(12);
    let step = |session, start, hidden| Step { session, capacity: 16, start, hidden };
    let cases: &[(&[Step], &str)] = &[
        (&[], "no steps"),
        (&[step(1, 4, &row), step(2, 3, &row), step(1, 4, &row)], "session 1 appears twice"),
        (&[step(1, 4, &row), step(2, 3, &row[1..])], "session 2: 575 values are not rows of 576"),
        (&[step(1, 4, &row), step(3, 3, &nan)], "session 3: hidden state value 7 is NaN"),
        (&[step(2, 3, &row), step(3, 9, &row)], "session 3 holds only 0..3"),
        (&[step(2, 3, &row), step(4, 5, &twelve)], "positions up to 17 exceed session 4's 16"),
        (&[step(1, 4, &row), step(5, 0, &row), step(6, 0, &row)], "sessions are open here already"),
    ];
    for &(steps, expected) in cases {
        let error = pollster::block_on(batched.forward_batch(&gpu, steps)).unwrap_err().to_string();
        assert!(error.contains(expected), "{error:?} should say {expected:?}");
        assert_eq!((1..=5).map(|s| batched.cached(s)).collect::<Vec<_>>(), held, "a failed batch ({expected}) changed a session");
        assert_eq!(batched.sessions(), 4);
    }
}

/// A span shard holds only its blocks' bytes and computes what the whole file does for them.
#[test]
fn a_span_shard_computes_as_the_whole_file_does() {
    let Some((gpu, model)) = model() else { return };
    let path = model_path();
    let name = path.display().to_string();
    let mut shard = Vec::new();
    let written = tessera_engine::shard::write_span_shard(&name, &mut std::fs::File::open(&path).unwrap(), 10..20, &mut shard).unwrap();
    let whole = std::fs::metadata(&path).unwrap().len();
    assert_eq!(written, shard.len() as u64);
    // A third of the blocks, and neither the embedding nor the tokenizer.
    assert!(written < whole / 3, "a shard of 10 blocks is {written} bytes of {whole}");
    let stages = Stages { embedding: false, blocks: 10..20, head: false };
    let gguf = Gguf::read("shard", &mut std::io::Cursor::new(&shard)).unwrap();
    assert_eq!(tessera_engine::shard::shard_blocks(&gguf), Some(10..20));
    assert!(gguf.get("tokenizer.ggml.tokens").is_none() && gguf.tensor("token_embd.weight").is_none());
    let part = Llama::load(gpu, "shard", &mut std::io::Cursor::new(&shard), &stages).unwrap();
    assert_eq!(part.config.vocab, model.config.vocab);

    let ids = &fixture().cases[0].prompt_ids;
    let tokens = ids.len();
    let hidden_after = |llama: &Llama, input: &[f32]| {
        let hidden = gpu.upload_f32(&[tokens, llama.config.dim], input).unwrap();
        let positions = gpu.upload_u32(&[tokens], &(0..tokens as u32).collect::<Vec<_>>()).unwrap();
        let mut cache = llama.kv_cache(gpu, 10..20, 64).unwrap();
        let mut batch = gpu.batch();
        llama.forward_span(&mut batch, &hidden, &positions, &mut cache).unwrap();
        batch.submit();
        pollster::block_on(gpu.read_f32(&hidden)).unwrap()
    };
    let input: Vec<f32> = (0..tokens * model.config.dim).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
    let (a, b) = (hidden_after(model, &input), hidden_after(&part, &input));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "the shard computes differently");
    // Blocks outside the shard are refused by name, not read as garbage.
    let outside = Stages { embedding: false, blocks: 0..10, head: false };
    assert!(Llama::load(gpu, "shard", &mut std::io::Cursor::new(&shard), &outside).is_err());
}

/// Greedy decoding, one token per step with the KV cache, reproduces the reference's tokens up
/// to the first position where the reference's own top two are within the tolerance.
#[test]
fn greedy_decoding_reproduces_the_reference() {
    let Some((gpu, model)) = model() else { return };
    for case in fixture().cases {
        let mut session = Session::new(gpu, model, 64).unwrap();
        let mut sampler = Sampler::greedy();
        let mut logits = pollster::block_on(session.feed(&case.prompt_ids)).unwrap();
        let mut generated = Vec::new();
        for (step, &expected) in case.greedy_ids.iter().enumerate() {
            let next = sampler.sample(&logits);
            generated.push(next);
            if case.top5[case.prompt_ids.len() - 1 + step].margin() < TOLERANCE {
                break; // a near-tie: both continuations are legitimate from here on
            }
            assert_eq!(next, expected, "{:?}: step {step} after {generated:?}", case.text);
            logits = pollster::block_on(session.feed(&[next])).unwrap();
        }
    }
}

/// The decode loop's budget: one token through the whole model is one batch (so one submit) of
/// at most 200 kernels, and copies nothing outside them.
#[test]
fn a_decode_step_is_one_batch_of_at_most_200_kernels() {
    let Some((gpu, model)) = model() else { return };
    let c = &model.config;
    let mut cache = model.kv_cache(gpu, 0..c.blocks, 8).unwrap();
    cache.len = 3;
    let ids = gpu.upload_u32(&[1], &[1]).unwrap();
    let positions = gpu.upload_u32(&[1], &[3]).unwrap();
    let hidden = gpu.empty(&[1, c.dim], DType::F32).unwrap();
    let logits = gpu.empty(&[1, c.vocab], DType::F32).unwrap();
    let mut batch = gpu.batch();
    model.embed(&mut batch, &ids, &hidden).unwrap();
    model.forward_span(&mut batch, &hidden, &positions, &mut cache).unwrap();
    model.last_logits(&mut batch, &hidden, &logits).unwrap();
    let dispatches = batch.dispatches();
    batch.submit();
    assert!(dispatches <= 200, "a decode step records {dispatches} kernels");
    assert_eq!(dispatches as usize, 2 + 6 * c.blocks, "embedding, six kernels a block, head");
    assert!(pollster::block_on(gpu.read_f32(&logits)).unwrap().iter().all(|v| v.is_finite()));

    // Through a session, the logits row comes back in the same submission. The counters are
    // the device's and other tests share `gpu`, so this part runs on a device of its own.
    let own = pollster::block_on(Gpu::request()).unwrap();
    let path = model_path();
    let model = Llama::load(&own, "model", &mut std::fs::File::open(&path).unwrap(), &Stages::all()).unwrap();
    let mut session = Session::new(&own, &model, 8).unwrap();
    pollster::block_on(session.feed(&[1, 2])).unwrap();
    let mut least = (u64::MAX, u64::MAX, u64::MAX);
    for token in 3..6 {
        let before = own.counters();
        pollster::block_on(session.feed(&[token])).unwrap();
        let after = own.counters();
        least.0 = least.0.min(after.submits - before.submits);
        least.1 = least.1.min(after.readbacks - before.readbacks);
        least.2 = least.2.min(after.dispatches - before.dispatches);
    }
    assert_eq!(least, (1, 1, u64::from(dispatches)), "submits, readbacks and kernels per token");
}

#[test]
fn bad_tokens_and_overlong_input_are_errors() {
    let Some((gpu, model)) = model() else { return };
    let mut session = Session::new(gpu, model, 4).unwrap();
    let error = pollster::block_on(session.feed(&[1, 60_000])).unwrap_err().to_string();
    assert!(error.contains("60000") && error.contains("vocabulary"), "{error}");
    let error = pollster::block_on(session.feed(&[1, 2, 3, 4, 5])).unwrap_err().to_string();
    assert!(error.contains("exceed the context of 4"), "{error}");
    assert!(session.is_empty());
    let error = model.kv_cache(gpu, 20..31, 4).err().expect("a cache past the last block is refused").to_string();
    assert!(error.contains("20..31") && error.contains("30"), "{error}");
}

#[test]
fn an_unknown_architecture_is_an_error_naming_the_file() {
    let Some(path) = crate::tokenizer::cached(MODEL) else { return };
    let name = path.display().to_string();
    let mut gguf = Gguf::read(&name, &mut std::fs::File::open(&path).unwrap()).unwrap();
    gguf.metadata.insert("general.architecture".into(), Value::String("mamba".into()));
    let error = LlamaConfig::from_gguf(&name, &gguf).unwrap_err().to_string();
    assert!(error.starts_with(&name) && error.contains("\"mamba\" is not supported"), "{error}");
}
