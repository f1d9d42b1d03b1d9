//! Prints `bench_round_trip`'s figures for a 64 KiB frame:
//! `cargo run --release -p tessera-rtc --example round_trip [ITERATIONS]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1000,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = runtime.block_on(tessera_rtc::bench_round_trip(iterations, 64 * 1024))?;
    println!("{figures}");
    Ok(())
}
