//! Model manifests: what a model identifier names. A manifest is a small JSON blob giving the
//! model's architecture and the CID of each of its files; the manifest's own CID is the `model`
//! of a unit of work, so one identifier pins every byte a contributor runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// The largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// A BERT sentence encoder: `config.json` and `model.safetensors`.
    Bert,
    /// A llama-family GGUF: `model.gguf`.
    Llama,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Always [`ModelManifest::FORMAT`].
    pub format: String,
    /// A human name (`minilm`); not part of the identity beyond being in the manifest.
    pub name: String,
    pub architecture: Architecture,
    /// File name to CID. A `BTreeMap`, so the serialised manifest (and its CID) is canonical.
    pub files: BTreeMap<String, String>,
}

impl ModelManifest {
    pub const FORMAT: &'static str = "tessera-model/1";

    pub fn new(name: impl Into<String>, architecture: Architecture, files: BTreeMap<String, String>) -> ModelManifest {
        ModelManifest { format: Self::FORMAT.into(), name: name.into(), architecture, files }
    }

    /// The canonical bytes (their CID is the model's identifier).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest of strings always serialises")
    }

    /// Parses and checks a manifest: its format, and file names that are plain names (no paths)
    /// with a CID each.
    pub fn parse(bytes: &[u8]) -> Result<ModelManifest, ProtocolError> {
        let invalid = |detail: String| ProtocolError::InvalidMessage { kind: "model manifest".into(), detail };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("{} bytes, over the limit of {MAX_MANIFEST_BYTES}", bytes.len())));
        }
        let manifest: ModelManifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if manifest.format != Self::FORMAT {
            return Err(invalid(format!("format {:?} is not supported: this peer reads {:?}", manifest.format, Self::FORMAT)));
        }
        if manifest.files.is_empty() {
            return Err(invalid("it lists no files".into()));
        }
        for (name, cid) in &manifest.files {
            let plain = !name.is_empty() && name.len() <= 255 && !name.contains(['/', '\\']) && name != "." && name != "..";
            if !plain {
                return Err(invalid(format!("file name {name:?} is not a plain file name")));
            }
            if !cid.starts_with('b') || cid.len() > 128 || !cid.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
                return Err(invalid(format!("file {name:?} has {cid:?}, which is not a base32 CID")));
            }
        }
        Ok(manifest)
    }

    /// The CID of file `name`, or an error naming the file the architecture needs.
    pub fn file(&self, name: &str) -> Result<&str, ProtocolError> {
        self.files.get(name).map(String::as_str).ok_or_else(|| ProtocolError::InvalidMessage {
            kind: "model manifest".into(),
            detail: format!("model {:?} ({:?}) lists no {name:?}", self.name, self.architecture),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ModelManifest {
        let files = [("config.json", "bafkreia"), ("model.safetensors", "bafkreib")].map(|(n, c)| (n.to_string(), c.to_string()));
        ModelManifest::new("minilm", Architecture::Bert, files.into_iter().collect())
    }

    #[test]
    fn manifests_round_trip_canonically() {
        let bytes = manifest().to_bytes();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"format":"tessera-model/1","name":"minilm","architecture":"bert","files":{"config.json":"bafkreia","model.safetensors":"bafkreib"}}"#
        );
        assert_eq!(ModelManifest::parse(&bytes).unwrap(), manifest());
        assert_eq!(manifest().file("config.json").unwrap(), "bafkreia");
        assert!(manifest().file("model.gguf").unwrap_err().to_string().contains("lists no \"model.gguf\""));
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value = serde_json::to_value(manifest()).unwrap();
            edit(&mut value);
            ModelManifest::parse(&serde_json::to_vec(&value).unwrap()).unwrap_err().to_string()
        };
        assert!(with(&|v| v["format"] = "tessera-model/9".into()).contains("not supported"));
        assert!(with(&|v| v["files"] = serde_json::json!({})).contains("no files"));
        assert!(with(&|v| v["files"]["../../etc/passwd"] = "bafkreic".into()).contains("not a plain file name"));
        assert!(with(&|v| v["files"]["config.json"] = "QmNotBase32".into()).contains("not a base32 CID"));
        assert!(with(&|v| v["architecture"] = "gpt".into()).contains("unknown variant"));
        assert!(with(&|v| v["extra"] = 1.into()).contains("unknown field"));
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(ModelManifest::parse(&huge).unwrap_err().to_string().contains("over the limit"));
        assert!(ModelManifest::parse(b"{").is_err());
    }
}
