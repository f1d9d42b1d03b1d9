//! `tessera bench scheduler` and `tessera bench network`: the coordinator's side of the work.
//!
//! The scheduler has no runnable peer here (BOINC's single server did about 100 units/s), so
//! its figures are printed against the target. The DataChannel round trip runs beside a
//! plain TCP echo of the same frame on the same loopback, its floor.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_coordinator::{BenchConfig, BenchStore, bench_scheduler};

/// The target for units dispatched and reconciled per second.
const TARGET_UNITS_PER_SECOND: f64 = 20_000.0;

#[derive(clap::Args)]
pub struct SchedulerArgs {
    /// Simulated contributors.
    #[arg(long, default_value_t = 10_000)]
    contributors: usize,
    /// Units of 8 embeddings each, every one done twice.
    #[arg(long, default_value_t = 200_000)]
    units: usize,
    /// Where accepted results go: memory, sqlite (WAL, in a temporary folder) or both.
    #[arg(long, default_value = "both")]
    store: String,
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let stores = match args.store.as_str() {
        "memory" => vec![BenchStore::Memory],
        "sqlite" => vec![BenchStore::Sqlite(std::env::temp_dir())],
        "both" => vec![BenchStore::Memory, BenchStore::Sqlite(std::env::temp_dir())],
        other => anyhow::bail!("--store must be memory, sqlite or both, got {other:?}"),
    };
    for store in stores {
        let config = BenchConfig { contributors: args.contributors, units: args.units, store, ..BenchConfig::default() };
        let report = bench_scheduler(&config)?;
        print!("{report}");
        println!(
            "ratio to the target of {TARGET_UNITS_PER_SECOND} units/s: {:.2}x ({})",
            report.units_per_second / TARGET_UNITS_PER_SECOND,
            if report.units_per_second >= TARGET_UNITS_PER_SECOND { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct NetworkArgs {
    /// Round trips to time.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Bytes per frame.
    #[arg(long, default_value_t = 64 * 1024)]
    frame: usize,
}

pub fn network(args: NetworkArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ours = runtime.block_on(tessera_rtc::bench_round_trip(args.iterations, args.frame))?;
    println!("{ours}");
    let tcp = tcp_round_trip(args.iterations, args.frame).context("the TCP echo peer")?;
    println!("TCP echo on loopback, same frames: median {tcp:.1?}");
    println!("ratio DataChannel / TCP (median round trip): {:.1}x", ours.median.as_secs_f64() / tcp.as_secs_f64());
    Ok(())
}

/// Median round trip of `frame` bytes to a loopback TCP echo thread and back.
fn tcp_round_trip(iterations: usize, frame: usize) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = vec![0; frame];
        for _ in 0..iterations {
            stream.read_exact(&mut buffer)?;
            stream.write_all(&buffer)?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let sent = vec![7u8; frame];
    let mut back = vec![0; frame];
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        stream.write_all(&sent)?;
        stream.read_exact(&mut back)?;
        times.push(started.elapsed());
    }
    echo.join().map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    times.sort();
    Ok(times[times.len() / 2])
}
