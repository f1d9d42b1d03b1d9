//! Tessera's coordinator core. `scheduler` is a sans-IO state machine (membership, liveness,
//! dispatch, reconciliation) that never reads a clock or touches a socket; `store` and
//! `sqlite` persist units and accepted results before anything is acknowledged; `bench`
//! measures the scheduler with thousands of simulated contributors. `blobs` keeps model weights
//! as content-addressed files; `placement` assigns a model's blocks to contributors as spans
//! (sans-IO, like the scheduler), and `pipeline` runs generation sessions through the spans,
//! replaying a session into a stage that changed hands; `openai` and `completions` hold the OpenAI-compatible API's
//! shapes. `server` is the async shell (`tessera serve`): tokio, axum and the WebRTC endpoint
//! around the scheduler.

pub mod bench;
pub mod blobs;
pub mod completions;
pub mod openai;
pub mod pipeline;
pub mod placement;
pub mod reconcile;
pub mod scheduler;
pub mod server;
pub mod sqlite;
pub mod store;
pub mod time;

pub use bench::{BenchConfig, BenchStore, SchedulerBenchReport, bench_scheduler};
pub use reconcile::{EMBEDDING_MIN_COSINE, JobKind, embeddings_agree};
pub use scheduler::{
    Config, JobSpec, JobStatus, Output, Report, Reputation, Scheduler, SchedulerError,
};
pub use sqlite::{Checkpointer, Durability, SqliteStore};
pub use store::{
    AcceptedUnit, Batch, JobOutcome, JobRecord, MemoryStore, RecoveredJob, Snapshot, Store,
    StoreError, UnitRecord,
};
pub use time::Millis;
