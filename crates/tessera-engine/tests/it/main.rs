//! Integration tests for the engine: shader validation (no GPU needed), every kernel against its
//! CPU reference on the adapter found here, and bad input turned into errors.

mod bad_input;
mod bert;
mod kernels;
mod llama;
mod shaders;
mod tokenizer;

use std::sync::OnceLock;

use tessera_engine::Gpu;

/// The adapter shared by all GPU tests. With `CI` set a missing adapter fails the test; elsewhere
/// the test says loudly that it did not run.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| match pollster::block_on(Gpu::request()) {
        Ok(gpu) => Some(gpu),
        Err(error) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but no GPU adapter is available ({error}); install mesa-vulkan-drivers")
        }
        Err(error) => {
            eprintln!("NOT RUN: GPU tests need an adapter ({error}); install mesa-vulkan-drivers");
            None
        }
    });
    gpu.as_ref()
}

/// A fresh seed per run (printed with any failure, so it can be replayed with `TESSERA_SEED`).
pub fn seed() -> u64 {
    if let Some(seed) = std::env::var("TESSERA_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_nanos() as u64
}
