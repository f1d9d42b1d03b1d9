//! The `tessera` command line.

mod bench;
mod models;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Pooled GPU inference from browser tabs and native contributors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The default models: fetch them into the model cache, or list them.
    Models {
        #[command(subcommand)]
        command: models::Models,
    },
    /// Benchmarks against peers measured side by side in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench { what } => bench::run(what),
        Command::Models { command } => models::run(command),
    }
}
