//! `tessera serve`'s async shell around the sans-IO core: one task owns the `Scheduler`
//! (`actor`), one task per contributor speaks the protocol over its DataChannel (`peer`), and
//! axum serves the HTTP API, the blobs and the WebSocket signalling (`http`) and the volunteer
//! page and the widget (`www`). `model` publishes the embedding model into the blob store under
//! its manifest's CID. Generation is a task of its own (`serving`: the span plan and the
//! pipeline of sessions, over the language model `llm` loads) behind the OpenAI-compatible
//! routes of `generation`; it also keeps what `/api/swarm` shows (`swarm`).
//!
//! Nothing here decides anything: membership, deadlines, reissue and reconciliation are the
//! scheduler's; this module only translates between sockets, clocks and its inputs and outputs.

mod actor;
mod generation;
mod http;
mod llm;
mod model;
mod peer;
mod serving;
mod swarm;
mod www;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::blobs::{BlobError, BlobStore};
use crate::scheduler::{Config, SchedulerError};
use crate::sqlite::{Durability, SqliteStore};
use crate::store::StoreError;

pub use llm::LlamaSource;
pub use model::PublishedModel;
pub use serving::ServingConfig;

/// What `start` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTP address; the WebRTC endpoint binds UDP on the same IP (a concrete one).
    pub addr: SocketAddr,
    /// Holds `coordinator.sqlite` and `blobs/`.
    pub data_dir: PathBuf,
    /// The embedding model's name in the API (`minilm`).
    pub model_name: String,
    /// A folder with the model's `config.json`, `model.safetensors` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Inputs per work unit.
    pub inputs_per_unit: usize,
    /// Agreeing results a unit needs.
    pub replicas: u8,
    /// What each unit's contributor gets to compute it.
    pub unit_deadline: Duration,
    /// How long `POST /v1/embeddings` waits for its job before answering 504.
    pub request_timeout: Duration,
    /// The web pages (the volunteer page, the widget and the wasm build in `pkg/`: the
    /// repository's `www/`). `None`, or a folder that is not there: pages answer 503 saying how
    /// to build them; the API is unaffected.
    pub www_dir: Option<PathBuf>,
    pub scheduler: Config,
    /// The language model served through `/v1/chat/completions` and `/v1/completions`, its
    /// embedding and head on this machine's GPU; `None`: those routes answer 404 for every model.
    pub llama: Option<LlamaSource>,
    pub serving: ServingConfig,
}

impl ServerConfig {
    /// The defaults for `addr` and `data_dir`, with the model in `model_dir`.
    pub fn new(addr: SocketAddr, data_dir: PathBuf, model_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            addr,
            data_dir,
            model_name: "minilm".into(),
            model_dir,
            inputs_per_unit: 16,
            replicas: 2,
            unit_deadline: Duration::from_secs(120),
            request_timeout: Duration::from_secs(600),
            www_dir: None,
            llama: None,
            serving: ServingConfig::default(),
            scheduler: Config {
                heartbeat_interval_ms: 2_000,
                heartbeat_timeout_ms: 12_000,
                ..Config::default()
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("model {name}: {detail}")]
    Model { name: String, detail: String },
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the WebRTC endpoint: {0}")]
    Rtc(#[from] tessera_rtc::RtcError),
    #[error("the HTTP server stopped: {0}")]
    Http(std::io::Error),
}

/// Counters the peer tasks, the actor and the HTTP handlers share, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub contributors_connected: AtomicU64,
    pub contributors_joined: AtomicU64,
    pub contributors_lost: AtomicU64,
    pub contributors_excluded: AtomicU64,
    pub units_dispatched: AtomicU64,
    pub units_reissued: AtomicU64,
    pub units_accepted: AtomicU64,
    pub units_cancelled: AtomicU64,
    pub results_rejected: AtomicU64,
    pub results_reported: AtomicU64,
    pub jobs_submitted: AtomicU64,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_running: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub peers_disconnected_for_errors: AtomicU64,
    pub blob_bytes_sent: AtomicU64,
    pub store_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One line on stderr: what the coordinator is doing, for whoever runs it.
pub(crate) fn log(line: std::fmt::Arguments<'_>) {
    eprintln!("tessera serve: {line}");
}

/// A coordinator bound to its sockets, not yet serving.
pub struct Server {
    listener: TcpListener,
    router: axum::Router,
    local_addr: SocketAddr,
    model: Arc<PublishedModel>,
}

impl Server {
    /// Opens the database (resuming unfinished jobs) and the blob store, publishes the model,
    /// binds HTTP on `config.addr` and WebRTC (UDP) on the same IP, and starts the scheduler
    /// task. Must run inside a tokio runtime.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let blobs = Arc::new(BlobStore::open(config.data_dir.join("blobs"))?);
        let model = {
            let (blobs, name, dir) = (Arc::clone(&blobs), config.model_name.clone(), config.model_dir.clone());
            tokio::task::spawn_blocking(move || model::publish(&blobs, &name, &dir))
                .await
                .map_err(|e| ServerError::Model {
                    name: config.model_name.clone(),
                    detail: format!("publishing stopped: {e}"),
                })??
        };
        let model = Arc::new(model);
        let store = SqliteStore::open(&config.data_dir.join("coordinator.sqlite"), Durability::Normal)?;

        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServerError::Listen { addr: config.addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen { addr: config.addr, source })?;
        let endpoint = tessera_rtc::Endpoint::bind(SocketAddr::new(local_addr.ip(), 0), tessera_rtc::Config::default()).await?;

        let counters = Arc::new(Counters::default());
        let (commands, inbox) = mpsc::channel(actor::QUEUE);
        let actor = actor::Actor::new(&config, store, Arc::clone(&counters))?;
        tokio::spawn(actor.run(inbox));

        let serving = serving::start(config.serving.clone(), config.llama.as_ref().map(|l| l.name.clone()), Arc::clone(&blobs));
        if let Some(source) = config.llama.clone() {
            let loaded = Arc::clone(&serving.model);
            tokio::spawn(async move {
                let result = tokio::task::spawn_blocking(move || llm::load(&source)).await.unwrap_or_else(|e| Err(e.to_string()));
                match &result {
                    Ok(model) => log(format_args!("{} loaded: {} blocks, its embedding and head on {}", model.name, model.config.blocks, model.gpu.adapter().name)),
                    Err(e) => log(format_args!("the language model cannot be served: {e}")),
                }
                let _ = loaded.set(result.map(Arc::new));
            });
        }

        let (accepted_tx, mut accepted_rx) = mpsc::channel(16);
        let peer_context = peer::Context {
            actor: commands.clone(),
            blobs: Arc::clone(&blobs),
            counters: Arc::clone(&counters),
            serving: serving.commands.clone(),
        };
        tokio::spawn(async move {
            while let Some(p) = accepted_rx.recv().await {
                tokio::spawn(peer::run(p, peer_context.clone()));
            }
        });

        let state = http::AppState {
            actor: commands,
            blobs,
            model: Arc::clone(&model),
            counters,
            endpoint: endpoint.clone(),
            inputs_per_unit: config.inputs_per_unit,
            replicas: config.replicas,
            unit_deadline: config.unit_deadline,
            request_timeout: config.request_timeout,
            www: www::Www::new(config.www_dir.as_deref()),
            serving,
        };
        let router = http::router(state).merge(tessera_rtc::signal::router(endpoint, accepted_tx));
        Ok(Server { listener, router, local_addr, model })
    }

    /// The HTTP address actually bound (the real port when `addr` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The model published at start.
    pub fn model(&self) -> &PublishedModel {
        &self.model
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Http)
    }
}
