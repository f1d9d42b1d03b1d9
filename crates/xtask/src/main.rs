//! Project automation, called by the npm scripts: `cargo run -p xtask -- <verb>`.
//!
//! - `setup`: installs what a fresh Debian machine with Rust and Node lacks (skipping what is
//!   there): Chromium and Mesa's Vulkan drivers (lavapipe), the wasm32 target, the
//!   `wasm-bindgen` CLI at the crate's pinned version, the npm packages, and the default models
//!   (`tessera models fetch`, which needs Python 3 with pip).
//! - `test`: set-up, then every test: the Rust tests (GPU tests on whatever adapter is found,
//!   lavapipe in CI; every test binary runs even after one fails, so a run shows all that
//!   fails), clippy natively and for wasm32, the wasm build, the browser tests, and the
//!   end-to-end test (`e2e`).
//! - `e2e`: the debug `tessera` and the wasm build, then `tests/browser/e2e.test.mjs` (the
//!   coordinator, two volunteer pages and the widget on another site, in Chromium) inside a
//!   private network namespace (`netns`).
//! - `bench-web`: the release `tessera` and the wasm build, then `tests/browser/bench-contributor.mjs`
//!   in a private network namespace: time to a volunteer page's first accepted unit, the wasm's
//!   size, the widget's download before consent.
//! - `netns PROGRAM ARGS..`: runs a program in a network namespace of its own (`unshare --net`,
//!   so root) with `lo` up and a veth pair, 198.18.0.1/24: Chromium gathers no WebRTC candidates
//!   when loopback is its only interface, and the namespace has no route out, so nothing the
//!   browser tests do leaves this machine.
//! - `build-web`: the wasm module and its JS bindings into `www/pkg`.
//! - `build-peers`: builds what the benchmarks measure beside us, into `target/peers` (skipped when
//!   already there): llama.cpp's `llama-bench`, from the sources that the Python registry's
//!   `llama-cpp-python` source distribution vendors, and a venv with NumPy. Never part of `test`.
//! - `bench`: set-up, the peers, then `tessera bench kernels`, `decode`, `embed`, `scheduler`,
//!   `network`, and `bench-web`.
//! - `start`: set-up, then `tessera bench kernels` (the main job until the coordinator).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

const DEBIAN_PACKAGES: [&str; 3] = ["chromium", "mesa-vulkan-drivers", "iproute2"];
/// The `llama-cpp-python` source distribution whose vendored llama.cpp is the decode peer.
const LLAMA_CPP_PYTHON: &str = "0.3.36";
const LLAMA_CPP_PYTHON_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// Release, tuned for this CPU, without AMX (its path crashes on these machines; `-mno-amx-*`
/// keeps `-march=native` from turning it back on), without networking, nothing but the library.
const LLAMA_CPP_CMAKE: [&str; 14] = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
];
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The browser tests that need a private network namespace (WebRTC), run apart from the others
/// and one at a time: the contributor end to end, and a model split across a tab and natives.
const NETWORK_TESTS: [&str; 2] = ["tests/browser/e2e.test.mjs", "tests/browser/generation.test.mjs"];
/// The private namespace's veth pair and the address on its first end.
const NETNS_VETH: [&str; 2] = ["tessera0", "tessera1"];
const NETNS_ADDR: &str = "198.18.0.1/24";
/// Crates that must build for the browser; checked with clippy for wasm32.
const PORTABLE_CRATES: [&str; 4] = ["tessera-protocol", "tessera-engine", "tessera-contributor", "tessera-web"];

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
        "e2e" => e2e(std::env::args().skip(2).collect()),
        "bench-web" => bench_web(),
        "netns" => netns(std::env::args().skip(2).collect()),
        "build-peers" => build_peers(),
        "bench" => {
            setup()?;
            build_peers()?;
            for what in ["kernels", "decode", "embed", "scheduler", "network", "stage", "pipeline"] {
                run(cargo().args(["run", "--release", "--package", "tessera", "--", "bench", what]))?;
            }
            bench_web()
        }
        // The main job: a coordinator with the default models and an embedded database, ready
        // for contributors and requests (extra arguments go to `tessera serve`).
        "start" => {
            setup()?;
            run(cargo().args(["run", "--release", "--package", "tessera", "--", "serve"]).args(std::env::args().skip(2)))
        }
        _ => bail!("usage: cargo run -p xtask -- <setup|test|e2e [NAME..]|build-web|build-peers|bench|bench-web|start|netns PROGRAM ARGS..>"),
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
    // Every package the tests import; an older checkout may have some of them only.
    let installed = |package: &str| Path::new("node_modules").join(package).join("package.json").exists();
    if !["playwright-core", "openai"].into_iter().all(installed) {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]))?;
    }
    // The default models (skipped when present and intact).
    run(cargo().args(["run", "--quiet", "--package", "tessera", "--", "models", "fetch"]))
}

fn install_debian_packages() -> anyhow::Result<()> {
    install_debian(&DEBIAN_PACKAGES)
}

/// Installs those of `packages` that are missing, with apt-get (as root, or through sudo).
fn install_debian(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
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
    // Without the name section the module is about 15% smaller (gzip); panics still carry
    // their message. (Debian's `wasm-opt`, binaryen 108, cannot parse what rustc now emits.)
    run(Command::new("wasm-bindgen").args([
        "--target",
        "web",
        "--no-typescript",
        "--remove-name-section",
        "--out-dir",
        "www/pkg",
        "target/wasm32-unknown-unknown/release/tessera_web.wasm",
    ]))
}

/// The benchmarks' peers, under `target/peers`; each is skipped when already built.
fn build_peers() -> anyhow::Result<()> {
    let peers = workspace_root().join("target/peers");
    std::fs::create_dir_all(&peers).with_context(|| format!("creating {}", peers.display()))?;
    build_llama_bench(&peers).context("building llama.cpp's llama-bench (the decode peer)")?;
    numpy_venv(&peers).context("setting up NumPy (the embedding peer)")
}

/// `target/peers/llama.cpp/bin/llama-bench`, with a stamp beside it naming its sources.
fn build_llama_bench(peers: &Path) -> anyhow::Result<()> {
    let bin = peers.join("llama.cpp/bin");
    let stamp = format!("llama.cpp vendored by llama-cpp-python {LLAMA_CPP_PYTHON}, Release, native, AMX off");
    if bin.join("llama-bench").exists() && std::fs::read_to_string(bin.join("built-from.txt")).is_ok_and(|s| s.trim() == stamp) {
        eprintln!("llama-bench: already built ({stamp})");
        return Ok(());
    }
    let started = std::time::Instant::now();
    if output(Command::new("cmake").arg("--version")).is_none() {
        install_debian(&["cmake"])?;
    }
    // The source distribution, from the Python registry (its build dependencies come as wheels).
    let archive = peers.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"));
    if !archive.exists() {
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "--dest"])
            .arg(peers)
            .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}")))?;
    }
    let digest = output(Command::new("sha256sum").arg(&archive)).context("sha256sum failed")?;
    ensure!(
        digest.split_whitespace().next() == Some(LLAMA_CPP_PYTHON_SHA256),
        "{}: sha256 mismatch, expected {LLAMA_CPP_PYTHON_SHA256}, got {digest}",
        archive.display()
    );
    let dir = peers.join(format!("llama.cpp-{LLAMA_CPP_PYTHON}"));
    let (src, build) = (dir.join("src"), dir.join("build"));
    if !src.join("CMakeLists.txt").exists() {
        std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=3")
            .arg(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp")))?;
        // A submodule's `.git` file pointing nowhere: git commands in the tree would fail.
        let _ = std::fs::remove_file(src.join(".git"));
    }
    run(Command::new("cmake").arg("-S").arg(&src).arg("-B").arg(&build).args(LLAMA_CPP_CMAKE))?;
    run(Command::new("cmake").arg("--build").arg(&build).args(["--target", "llama-bench", "-j", "2"]))?;
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::copy(build.join("bin/llama-bench"), bin.join("llama-bench")).context("installing llama-bench")?;
    std::fs::write(bin.join("built-from.txt"), format!("{stamp}\n")).context("writing the stamp")?;
    eprintln!("llama-bench: built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `target/peers/venv`: a Python virtual environment with NumPy.
fn numpy_venv(peers: &Path) -> anyhow::Result<()> {
    let venv = peers.join("venv");
    let python = venv.join("bin/python3");
    if output(Command::new(&python).args(["-c", "import numpy"])).is_some() {
        eprintln!("numpy: already set up in {}", venv.display());
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "numpy"]))
}

fn test() -> anyhow::Result<()> {
    // `--no-fail-fast`: every test binary runs, so one failure does not hide the others.
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    let mut wasm_clippy = cargo();
    wasm_clippy.args(["clippy", "--target", WASM_TARGET]);
    for krate in PORTABLE_CRATES {
        wasm_clippy.args(["--package", krate]);
    }
    run(wasm_clippy.args(["--", "-D", "warnings"]))?;
    build_web()?;
    run(Command::new("node").arg("--test").args(browser_tests()?))?;
    run_network_tests(&NETWORK_TESTS)
}

/// `tests/browser/*.test.mjs` but the network tests.
fn browser_tests() -> anyhow::Result<Vec<PathBuf>> {
    let mut tests: Vec<PathBuf> = std::fs::read_dir("tests/browser")
        .context("listing tests/browser")?
        .flatten()
        .map(|e| Path::new("tests/browser").join(e.file_name()))
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs") && !NETWORK_TESTS.iter().any(|t| p == Path::new(t)))
        .collect();
    tests.sort();
    Ok(tests)
}

/// The wasm build, then the network tests: those `names` give (`e2e`, `generation`), or all.
fn e2e(names: Vec<String>) -> anyhow::Result<()> {
    let tests: Vec<&str> = if names.is_empty() {
        NETWORK_TESTS.to_vec()
    } else {
        names
            .iter()
            .map(|name| {
                NETWORK_TESTS.iter().copied().find(|t| t.ends_with(&format!("/{name}.test.mjs"))).with_context(|| format!("no network test {name:?} (there are {NETWORK_TESTS:?})"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    build_web()?;
    run_network_tests(&tests)
}

/// Browser tests in a private network namespace, one file at a time, on the debug `tessera`.
fn run_network_tests(tests: &[&str]) -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "tessera"]))?;
    let mut command = vec!["node", "--test", "--test-concurrency=1", "--test-reporter=spec"];
    command.extend_from_slice(tests);
    run(&mut in_private_network(&command)?)
}

/// The volunteer page's benchmark, in a private network namespace, on the release `tessera`.
fn bench_web() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--package", "tessera"]))?;
    build_web()?;
    run(&mut in_private_network(&["node", "tests/browser/bench-contributor.mjs"])?)
}

/// `command` run by `xtask netns` in a network namespace of its own.
fn in_private_network(command: &[&str]) -> anyhow::Result<Command> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let mut unshare = Command::new("unshare");
    unshare.args(["--net", "--"]).arg(xtask).arg("netns").args(command);
    Ok(unshare)
}

/// Inside `unshare --net`: loopback up, the veth pair up with `NETNS_ADDR` on its first end,
/// then `command` (its exit status is ours).
fn netns(command: Vec<String>) -> anyhow::Result<()> {
    let [a, b] = NETNS_VETH;
    // A fresh namespace has loopback only; anything else means this is someone's real network.
    let devices = std::fs::read_to_string("/proc/net/dev").context("reading /proc/net/dev")?;
    let interfaces: Vec<&str> = devices.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    ensure!(interfaces == ["lo"], "xtask netns must run inside `unshare --net` (this network has {interfaces:?})");
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    run(Command::new("ip").args(["link", "add", a, "type", "veth", "peer", "name", b]))?;
    run(Command::new("ip").args(["addr", "add", NETNS_ADDR, "dev", a]))?;
    run(Command::new("ip").args(["link", "set", a, "up"]))?;
    run(Command::new("ip").args(["link", "set", b, "up"]))?;
    let (program, args) = command.split_first().context("usage: xtask netns PROGRAM ARGS..")?;
    run(Command::new(program).args(args))
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
