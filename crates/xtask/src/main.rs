//! Project automation, called by the npm scripts: `cargo run -p xtask -- <verb>`.
//!
//! - `setup`: installs what a fresh Debian machine with Rust and Node lacks (skipping what is
//!   there): Chromium and Mesa's Vulkan drivers (lavapipe), the wasm32 target, the
//!   `wasm-bindgen` CLI at the crate's pinned version, the npm packages, and the default models
//!   (`tessera models fetch`, which needs Python 3 with pip).
//! - `test`: set-up, then every test: the Rust tests (GPU tests on whatever adapter is found,
//!   lavapipe in CI), clippy natively and for wasm32, the wasm build, and the browser tests.
//! - `build-web`: the wasm module and its JS bindings into `www/pkg`.
//! - `bench`, `start`: set-up, then `tessera bench kernels` (the main job until the coordinator).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

const DEBIAN_PACKAGES: [&str; 2] = ["chromium", "mesa-vulkan-drivers"];
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Crates that must build for the browser; checked with clippy for wasm32.
const PORTABLE_CRATES: [&str; 2] = ["tessera-engine", "tessera-web"];

fn main() -> anyhow::Result<()> {
    let verb = std::env::args().nth(1).unwrap_or_default();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match verb.as_str() {
        "setup" => setup(),
        "build-web" => build_web(),
        "test" => {
            setup()?;
            test()
        }
        "bench" | "start" => {
            setup()?;
            run(cargo().args(["run", "--release", "--package", "tessera", "--", "bench", "kernels"]))
        }
        _ => bail!("usage: cargo run -p xtask -- <setup|test|build-web|bench|start>"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("crates/xtask sits two levels down").to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command, echoing it, and fails if it fails.
fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {}", describe(command));
    let status = command.status().with_context(|| format!("starting {}", describe(command)))?;
    ensure!(status.success(), "{} failed ({status})", describe(command));
    Ok(())
}

/// Runs a command quietly and returns its stdout, or `None` if it could not run or failed.
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{} {}", command.get_program().to_string_lossy(), args.join(" "))
}

fn setup() -> anyhow::Result<()> {
    install_debian_packages()?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !targets.lines().any(|t| t.trim() == WASM_TARGET) {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    install_wasm_bindgen()?;
    if !Path::new("node_modules/playwright-core/package.json").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]))?;
    }
    // The default models (skipped when present and intact).
    run(cargo().args(["run", "--quiet", "--package", "tessera", "--", "models", "fetch"]))
}

fn install_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .into_iter()
        .filter(|p| {
            let status = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])).unwrap_or_default();
            !status.contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output(Command::new("apt-get").arg("--version")).is_none() {
        bail!("please install {} (and a Vulkan driver) with your system's package manager", missing.join(", "));
    }
    let root = output(Command::new("id").arg("-u")).is_some_and(|id| id.trim() == "0");
    let apt = |args: &[&str]| {
        let mut command = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            command.arg("apt-get");
        }
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))
}

/// The `wasm-bindgen` version pinned in the workspace manifest (`wasm-bindgen = "=X"`).
fn pinned_wasm_bindgen() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).context("reading Cargo.toml")?;
    manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("wasm-bindgen = \"=")?.strip_suffix('"').map(str::to_string))
        .context("Cargo.toml pins no `wasm-bindgen = \"=X\"`")
}

fn install_wasm_bindgen() -> anyhow::Result<()> {
    let version = pinned_wasm_bindgen()?;
    let installed = output(Command::new("wasm-bindgen").arg("--version")).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(version.as_str()) {
        return Ok(());
    }
    let locked = run(cargo().args(["install", "wasm-bindgen-cli", "--version", &version, "--locked"]));
    if let Err(error) = locked {
        // The CLI's lock file can name a dependency version the registry no longer serves.
        eprintln!("{error:#}; retrying without --locked");
        run(cargo().args(["install", "wasm-bindgen-cli", "--version", &version]))?;
    }
    Ok(())
}

fn build_web() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--package", "tessera-web", "--target", WASM_TARGET]))?;
    run(Command::new("wasm-bindgen").args([
        "--target",
        "web",
        "--no-typescript",
        "--out-dir",
        "www/pkg",
        "target/wasm32-unknown-unknown/release/tessera_web.wasm",
    ]))
}

fn test() -> anyhow::Result<()> {
    run(cargo().args(["test", "--workspace"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    let mut wasm_clippy = cargo();
    wasm_clippy.args(["clippy", "--target", WASM_TARGET]);
    for krate in PORTABLE_CRATES {
        wasm_clippy.args(["--package", krate]);
    }
    run(wasm_clippy.args(["--", "-D", "warnings"]))?;
    build_web()?;
    run(Command::new("node").args(["--test", "tests/browser/"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Rust file says what it is for in its first line (`//!`), as ARCHITECTURE.md promises.
    #[test]
    fn every_rust_file_opens_with_a_doc_line() {
        fn visit(dir: &Path, missing: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("readable source tree").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    visit(&path, missing);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if !text.starts_with("//!") {
                        missing.push(path);
                    }
                }
            }
        }
        let mut missing = Vec::new();
        visit(&workspace_root().join("crates"), &mut missing);
        assert!(missing.is_empty(), "these files do not open with a //! line: {missing:?}");
    }

    #[test]
    fn the_wasm_bindgen_pin_is_found() {
        let version = pinned_wasm_bindgen().unwrap();
        assert!(version.split('.').count() == 3, "{version}");
    }
}
