//! The `tessera` command line.

mod bench;
mod contribute;
mod models;
mod run;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Pooled GPU inference from browser tabs and native contributors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a coordinator: the HTTP API, blobs and WebRTC signalling, until stopped (Ctrl-C).
    Serve(serve::ServeArgs),
    /// Joins a coordinator and runs work units on this machine's GPU until stopped (Ctrl-C).
    Contribute(contribute::ContributeArgs),
    /// Generates text with a language model on this machine's GPU, streamed to stdout.
    Run(run::RunArgs),
    /// Prints one JSON line with the embedding of each text.
    Embed(run::EmbedArgs),
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
        Command::Contribute(args) => contribute::contribute(args),
        Command::Serve(args) => serve::serve(args),
        Command::Run(args) => run::run(args),
        Command::Embed(args) => run::embed(args),
    }
}
