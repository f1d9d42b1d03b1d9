//! Where models live on disk. Only the path: the engine itself opens no files.

use std::path::PathBuf;

/// `$TESSERA_MODELS`, else `$XDG_CACHE_HOME/tessera/models`, else `~/.cache/tessera/models`.
pub fn model_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_MODELS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
    cache.join("tessera").join("models")
}
