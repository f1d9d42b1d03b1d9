//! `tessera serve`: the coordinator. Finds (or fetches) the default MiniLM, then runs
//! `tessera_coordinator::server` on a tokio runtime until Ctrl-C. It serves the volunteer page
//! and the widget from `--www`, by default the `www/` of the repository it was built from. When
//! SmolLM2 is fetched, it is served too, split into spans across the contributors
//! (`/v1/chat/completions`, `/v1/completions`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tessera_coordinator::server::{LlamaSource, Server, ServerConfig};

use crate::models;

#[derive(Args)]
pub struct ServeArgs {
    /// Where to serve HTTP (the API, blobs and `/ws` signalling); WebRTC binds UDP on the same
    /// IP, which must be a concrete address. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The data folder (database and blobs). Default: `$XDG_DATA_HOME/tessera` or
    /// `~/.local/share/tessera`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Inputs per work unit.
    #[arg(long, default_value_t = 16)]
    unit_inputs: usize,
    /// Contributors that must agree on a unit before it is accepted (1 trusts one result:
    /// for benchmarks and trials, not for volunteers one does not know).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    replicas: u8,
    /// The web pages to serve (`/` the volunteer page, `/widget.js`, `/embed`, and the wasm
    /// build in `pkg/`). Default: the `www/` folder of the repository this binary was built
    /// from, when it is there.
    #[arg(long)]
    www: Option<PathBuf>,
    /// How long a contributor holding a span may take for one step of a generation session
    /// before its span moves to another.
    #[arg(long, default_value_t = 20_000)]
    stage_deadline_ms: u64,
    /// The least time a span holder is given for one step, however fast it has been: lower
    /// notices a lost holder sooner, at the risk of moving spans off holders that only
    /// stalled for a moment.
    #[arg(long, default_value_t = 1_000)]
    stage_floor_ms: u64,
}

/// `www/` of the repository this binary was built from, if it is still there.
fn default_www_dir() -> Option<PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../www");
    dir.is_dir().then(|| dir.canonicalize().unwrap_or(dir))
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("tessera"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_DATA_HOME nor HOME is set: pass --data DIR")?;
    Ok(PathBuf::from(home).join(".local/share/tessera"))
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.addr.ip().is_unspecified(), "--addr {} is not a concrete IP: WebRTC needs one to offer as its candidate", args.addr);
    anyhow::ensure!(args.unit_inputs > 0, "--unit-inputs must be at least 1");
    let data = match args.data {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let model_dir = models::default_path("minilm").context("minilm is a default model")?;
    if ["config.json", "model.safetensors", "tokenizer.json"].iter().any(|f| !model_dir.join(f).exists()) {
        models::run(models::Models::Fetch { names: vec!["minilm".into()] }).context("fetching minilm")?;
    }
    let www = args.www.or_else(default_www_dir);
    match &www {
        Some(dir) if !dir.is_dir() => anyhow::bail!("--www {}: no such folder", dir.display()),
        Some(dir) if !dir.join("pkg").is_dir() => {
            eprintln!("tessera serve: {} has no pkg/ (the browser contributor): run `cargo run -p xtask -- build-web`", dir.display());
        }
        Some(_) => {}
        None => eprintln!("tessera serve: no www folder, so no volunteer page or widget (pass --www DIR)"),
    }
    let mut config = ServerConfig::new(args.addr, data.clone(), model_dir);
    config.inputs_per_unit = args.unit_inputs;
    config.replicas = args.replicas;
    config.www_dir = www.clone();
    anyhow::ensure!(
        0 < args.stage_floor_ms && args.stage_floor_ms <= args.stage_deadline_ms,
        "--stage-floor-ms {} must be positive and at most --stage-deadline-ms {}",
        args.stage_floor_ms,
        args.stage_deadline_ms
    );
    config.serving.stage_deadline = std::time::Duration::from_millis(args.stage_deadline_ms);
    config.serving.stage_floor = std::time::Duration::from_millis(args.stage_floor_ms);
    match models::default_path("smollm2") {
        Some(path) if path.exists() => config.llama = Some(LlamaSource { name: "smollm2".into(), path }),
        _ => eprintln!("tessera serve: smollm2 is not fetched, so no text generation (run `tessera models fetch smollm2`)"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let server = Server::start(config).await.with_context(|| format!("starting the coordinator (data in {})", data.display()))?;
        eprintln!("tessera serve: model {} is {}; data in {}", server.model().name, server.model().cid, data.display());
        if let Some(dir) = &www {
            eprintln!("tessera serve: web pages from {}: volunteer at http://{}/", dir.display(), server.local_addr());
        }
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "tessera coordinator listening on http://{}", server.local_addr())?;
        stdout.flush()?;
        drop(stdout);
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        server.serve(shutdown).await.context("serving")
    })
}
