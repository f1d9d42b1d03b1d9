//! Content identifiers for weight blobs: CIDv1 with the raw codec and a sha2-256 multihash,
//! written in multibase base32 (`bafkrei...`). That is the identifier IPFS gives the same bytes,
//! so anyone can pin a model's shards there. Every blob is checked against its CID before use.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// CID version 1, the `raw` codec (0x55), the sha2-256 multihash (0x12) of 32 bytes (0x20).
const PREFIX: [u8; 4] = [0x01, 0x55, 0x12, 0x20];
/// Multibase's prefix for lowercase RFC 4648 base32 without padding.
const BASE32_PREFIX: char = 'b';
const BASE32_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The identifier of a blob of bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    sha256: [u8; 32],
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    #[error("{text:?} is not a CID: {problem}")]
    Malformed { text: String, problem: &'static str },
    #[error("{name}: content does not match its CID: expected {expected}, got {got}")]
    Mismatch { name: String, expected: Cid, got: Cid },
    #[error("{name}: reading it failed: {reason}")]
    Read { name: String, reason: String },
}

impl Cid {
    /// The CID of `bytes`.
    pub fn of(bytes: &[u8]) -> Cid {
        Cid { sha256: Sha256::digest(bytes).into() }
    }

    /// The CID of everything `reader` yields, hashed as it streams (`name` is for errors).
    pub fn of_reader(name: &str, reader: &mut impl Read) -> Result<Cid, CidError> {
        let mut hasher = Sha256::new();
        std::io::copy(reader, &mut hasher).map_err(|e| CidError::Read { name: name.into(), reason: e.to_string() })?;
        Ok(Cid { sha256: hasher.finalize().into() })
    }

    /// The CID of the blob whose sha256 is `digest`.
    pub fn from_sha256(digest: [u8; 32]) -> Cid {
        Cid { sha256: digest }
    }

    /// The blob's sha256.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// Checks that `bytes` (called `name` in the error) are the blob this CID names.
    pub fn verify(&self, name: &str, bytes: &[u8]) -> Result<(), CidError> {
        let got = Cid::of(bytes);
        if got == *self {
            Ok(())
        } else {
            Err(CidError::Mismatch { name: name.into(), expected: *self, got })
        }
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = PREFIX.to_vec();
        bytes.extend_from_slice(&self.sha256);
        let mut text = String::with_capacity(1 + (bytes.len() * 8).div_ceil(5));
        text.push(BASE32_PREFIX);
        let (mut buffer, mut bits) = (0u32, 0u32);
        for byte in bytes {
            buffer = (buffer << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                text.push(BASE32_ALPHABET[((buffer >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            text.push(BASE32_ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
        }
        f.write_str(&text)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl FromStr for Cid {
    type Err = CidError;

    fn from_str(text: &str) -> Result<Cid, CidError> {
        let malformed = |problem| CidError::Malformed { text: text.chars().take(80).collect(), problem };
        let body = text.strip_prefix(BASE32_PREFIX).ok_or_else(|| malformed("it must start with 'b' (multibase base32)"))?;
        if body.len() != (36 * 8usize).div_ceil(5) {
            return Err(malformed("a CIDv1 raw sha2-256 has 58 base32 characters after the 'b'"));
        }
        let mut bytes = Vec::with_capacity(36);
        let (mut buffer, mut bits) = (0u32, 0u32);
        for c in body.bytes() {
            let value = BASE32_ALPHABET.iter().position(|&a| a == c).ok_or_else(|| malformed("it has a character outside base32's a-z2-7"))?;
            buffer = (buffer << 5) | value as u32;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                bytes.push((buffer >> bits) as u8);
                buffer &= (1 << bits) - 1;
            }
        }
        if buffer != 0 {
            return Err(malformed("its last character has stray bits"));
        }
        if bytes[..4] != PREFIX {
            return Err(malformed("only CIDv1 with the raw codec and a sha2-256 multihash is accepted"));
        }
        let mut sha256 = [0; 32];
        sha256.copy_from_slice(&bytes[4..]);
        Ok(Cid { sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What IPFS (`ipfs add --cid-version 1 --raw-leaves`) gives these contents.
    const EMPTY: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
    const HELLO_WORLD: &str = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e";

    #[test]
    fn cids_are_the_ones_ipfs_gives() {
        assert_eq!(Cid::of(b"").to_string(), EMPTY);
        assert_eq!(Cid::of(b"hello world").to_string(), HELLO_WORLD);
        let parsed: Cid = HELLO_WORLD.parse().unwrap();
        assert_eq!(parsed, Cid::of(b"hello world"));
        let streamed = Cid::of_reader("hello", &mut &b"hello world"[..]).unwrap();
        assert_eq!(streamed, parsed);
    }

    #[test]
    fn content_that_does_not_match_is_refused_by_name() {
        let cid = Cid::of(b"hello world");
        assert!(cid.verify("shard 3", b"hello world").is_ok());
        let error = cid.verify("shard 3", b"hello worle").unwrap_err().to_string();
        assert!(error.starts_with("shard 3: content does not match its CID: expected bafkrei"), "{error}");
    }

    #[test]
    fn malformed_cids_say_what_is_wrong() {
        let cases = [
            ("", "must start with 'b'"),
            ("Qmabc", "must start with 'b'"),
            ("bafkrei", "58 base32 characters"),
            (&HELLO_WORLD.replace('z', "1"), "outside base32"),
            // CIDv1 dag-pb (0x70) instead of raw.
            ("bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", "raw codec"),
            (&format!("{}f", &HELLO_WORLD[..HELLO_WORLD.len() - 1]), "stray bits"),
        ];
        for (text, expected) in cases {
            let error = text.parse::<Cid>().unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
