//! `tessera run` and `tessera embed`: a model on this machine's GPU, from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::generate::{Sampler, Session};
use tessera_engine::gguf::{Gguf, Value};
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::tokenizer::{ChatTemplate, TextTokenizer};
use tessera_engine::Gpu;

use crate::models;

#[derive(Args)]
pub struct RunArgs {
    /// `smollm2`, or the path of a GGUF llama-family model.
    #[arg(long)]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 picks the likeliest token every time (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (may be given several times).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object ({prompt_ids, ids, text}) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// `minilm`, or a folder holding model.safetensors, config.json and tokenizer.json.
    #[arg(long)]
    model: String,
    /// The texts to embed; one JSON line is printed for each.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(Serialize)]
struct RunOutput<'a> {
    prompt_ids: &'a [u32],
    ids: &'a [u32],
    text: &'a str,
}

fn gpu() -> anyhow::Result<Gpu> {
    pollster::block_on(Gpu::request()).context("finding a GPU adapter")
}

/// A default model's main file, or the path given.
fn resolve(model: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = models::default_path(model) {
        anyhow::ensure!(path.exists(), "{} is not fetched yet: run `tessera models fetch {model}`", path.display());
        return Ok(path);
    }
    let path = PathBuf::from(model);
    anyhow::ensure!(path.exists(), "{model:?} is neither a default model (smollm2, minilm) nor an existing path");
    Ok(path)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let path = resolve(&args.model)?;
    let name = path.display().to_string();
    let mut file = std::fs::File::open(&path).with_context(|| format!("opening {name}"))?;
    let gguf = Gguf::read(&name, &mut file)?;
    let tokenizer = TextTokenizer::from_gguf(&name, &gguf)?;
    let prompt = if args.chat { ChatTemplate::from_gguf(&name, &gguf)?.render([("user", args.prompt.as_str())])? } else { args.prompt.clone() };
    let prompt_ids = tokenizer.encode(&prompt, false)?;
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let eos = gguf.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).map(|id| id as u32);

    let gpu = gpu()?;
    let model = Llama::load(&gpu, &name, &mut file, &Stages::all())?;
    let context = model.config.context;
    if prompt_ids.len() >= context {
        bail!("the prompt is {} tokens; the model's context is {context}", prompt_ids.len());
    }
    let mut session = Session::new(&gpu, &model, (prompt_ids.len() + args.max_tokens).min(context))?;
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);

    let mut ids = Vec::new();
    let mut text = String::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    let mut logits = pollster::block_on(session.feed(&prompt_ids))?;
    while ids.len() < args.max_tokens && session.len() < session.capacity() {
        let next = sampler.sample(&logits);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        text = tokenizer.decode(&ids)?;
        if let Some(at) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            break;
        }
        if !args.json {
            // Hold back what could still become a stop string, or half of a UTF-8 character.
            let hold = args.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            let mut end = text.len().saturating_sub(hold);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            if end > printed && !text[..end].ends_with('\u{fffd}') {
                write!(stdout, "{}", &text[printed..end])?;
                stdout.flush()?;
                printed = end;
            }
        }
        if ids.len() == args.max_tokens {
            break;
        }
        logits = pollster::block_on(session.feed(&[next]))?;
    }
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&RunOutput { prompt_ids: &prompt_ids, ids: &ids, text: &text })?)?;
    } else {
        writeln!(stdout, "{}", &text[printed.min(text.len())..])?;
    }
    Ok(())
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let path = resolve(&args.model)?;
    let dir: &Path = if path.is_dir() { &path } else { path.parent().context("a model folder")? };
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let config_name = dir.join("config.json").display().to_string();
    let config = BertConfig::from_json(&config_name, &read("config.json")?)?;
    let tokenizer = TextTokenizer::from_json(&dir.join("tokenizer.json").display().to_string(), &read("tokenizer.json")?)?;
    let weights = dir.join("model.safetensors");
    let gpu = gpu()?;
    let mut file = std::fs::File::open(&weights).with_context(|| format!("opening {}", weights.display()))?;
    let model = Bert::load(&gpu, config, &weights.display().to_string(), &mut file)?;
    let ids = args.texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<Vec<_>, _>>()?;
    for (i, sentence) in ids.iter().enumerate() {
        anyhow::ensure!(
            sentence.len() <= model.config.max_position_embeddings,
            "text {i} is {} tokens; the model takes at most {}",
            sentence.len(),
            model.config.max_position_embeddings
        );
    }
    let embeddings = pollster::block_on(model.embed(&gpu, &ids))?;
    let mut stdout = std::io::stdout().lock();
    for (text, embedding) in args.texts.iter().zip(embeddings) {
        writeln!(stdout, "{}", serde_json::json!({ "text": text, "embedding": embedding }))?;
    }
    Ok(())
}
