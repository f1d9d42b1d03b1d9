//! The contributor's protocol, once: one sans-IO state machine that a native process
//! (`tessera contribute`) and a browser tab (`tessera-web`) both run.
//!
//! [`Session`] is one connection to the coordinator. What arrives goes in with the time
//! (`handle` for the coordinator's channel, `link_message` for a peer's, and the completions of
//! the jobs the glue ran: `finished`, `span_loaded`, `forwarded`, `passed`, `described`,
//! `link_open`, `link_closed`, `blob_checked`, `blob_stored`, `blob_read`); what to send and to
//! whom, which jobs to run (a unit, a span job, a blob job, a direct channel to make or close),
//! what the page or the log should hear, and when to wake next come out (`poll`,
//! `poll_timeout`). The glue moves bytes, runs the GPU, keeps the blob cache and owns the
//! sockets; it never decodes a message nor decides what to send.
//!
//! What differs between a tab and a native process is a [`Policy`] (does it take direct
//! channels, fetch blobs over its channel, fetch ahead, lend) and its `Capabilities`, never a
//! second implementation.

mod session;

pub use session::{
    Assignment, BlobJob, Event, LINK_TIMEOUT_MS, MAX_BLOB_BYTES, MAX_HIDDEN_BYTES, MAX_LENDS, MAX_QUEUED_UNITS, Millis, Outgoing, Output, Policy, Session,
    SpanJob, Status, StoreError, next_span_jobs,
};
