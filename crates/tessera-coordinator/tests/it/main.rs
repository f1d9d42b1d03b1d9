//! The coordinator's integration tests: targeted scheduler cases, large simulations in
//! simulated time, the SQLite store, and the async shell on loopback (no GPU needed).

mod common;
mod scheduler;
mod server;
mod simulation;
mod sqlite;
