//! Runs `bench_scheduler` with the defaults until the CLI's `tessera bench scheduler` calls it:
//! `cargo run --release -p tessera-coordinator --example bench_scheduler [memory|sqlite|both]`.

use tessera_coordinator::{BenchConfig, BenchStore, bench_scheduler};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "both".into());
    if which == "memory" || which == "both" {
        print!("{}", bench_scheduler(&BenchConfig::default())?);
    }
    if which == "sqlite" || which == "both" {
        let sqlite = BenchConfig {
            store: BenchStore::Sqlite(std::env::temp_dir()),
            ..BenchConfig::default()
        };
        print!("{}", bench_scheduler(&sqlite)?);
    }
    Ok(())
}
