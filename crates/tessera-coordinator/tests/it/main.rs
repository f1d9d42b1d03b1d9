//! The coordinator's integration tests: targeted scheduler cases, large simulations in
//! simulated time, and the SQLite store.

mod common;
mod scheduler;
mod simulation;
mod sqlite;
