//! The `tessera` command line.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Pooled GPU inference from browser tabs and native contributors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks against peers measured side by side in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench { what } => bench::run(what),
    }
}
