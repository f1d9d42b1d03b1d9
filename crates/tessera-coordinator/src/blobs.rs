//! The blob store: model weights and shards as content-addressed files, `<dir>/<cid>`, written
//! once and checked against their CID on the way in, so what the coordinator serves at
//! `/blobs/<cid>` (and contributors cache) is always the bytes the CID names.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_engine::cid::Cid;
use tessera_protocol::ErrorCode;

/// Largest blob range served in one request (a whole model file fits).
pub const MAX_BLOB_RANGE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob {0} is not in the store")]
    Missing(Cid),
    #[error(transparent)]
    Cid(#[from] tessera_engine::cid::CidError),
}

/// A folder of blobs named by their CIDs.
pub struct BlobStore {
    dir: PathBuf,
}

/// One blob opened for reading.
pub struct Blob {
    pub file: File,
    pub len: u64,
}

impl BlobStore {
    /// Opens (creating it if needed) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<BlobStore, BlobError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io { path: dir.clone(), source })?;
        Ok(BlobStore { dir })
    }

    fn path(&self, cid: &Cid) -> PathBuf {
        self.dir.join(cid.to_string())
    }

    /// Adds the contents of `source` (called `name` in errors) and returns its CID. The bytes
    /// are hashed as they are copied into a temporary file, which is renamed into place only
    /// once complete, so a crash never leaves a blob whose name lies.
    pub fn insert(&self, name: &str, source: &mut impl Read) -> Result<Cid, BlobError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BlobError::Io { path, source }
        };
        static INCOMING: AtomicU64 = AtomicU64::new(0);
        let temporary = self.dir.join(format!(".incoming-{}-{}", std::process::id(), INCOMING.fetch_add(1, Ordering::Relaxed)));
        let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
        let mut hashing = HashingWriter { inner: &mut file, hasher: Default::default() };
        if let Err(e) = io::copy(source, &mut hashing) {
            let _ = std::fs::remove_file(&temporary);
            return Err(BlobError::Io { path: PathBuf::from(name), source: e });
        }
        let cid = Cid::from_sha256(hashing.finish());
        file.sync_all().map_err(io_error(&temporary))?;
        let target = self.path(&cid);
        std::fs::rename(&temporary, &target).map_err(io_error(&target))?;
        Ok(cid)
    }

    /// Adds a blob that must have CID `expected` (a shard fetched from elsewhere): refused, and
    /// not kept, if its bytes do not match.
    pub fn insert_expecting(&self, expected: &Cid, name: &str, source: &mut impl Read) -> Result<(), BlobError> {
        let got = self.insert(name, source)?;
        if got != *expected {
            let _ = std::fs::remove_file(self.path(&got));
            return Err(tessera_engine::cid::CidError::Mismatch { name: name.into(), expected: *expected, got }.into());
        }
        Ok(())
    }

    pub fn contains(&self, cid: &Cid) -> bool {
        self.path(cid).is_file()
    }

    /// Opens a blob for reading.
    pub fn get(&self, cid: &Cid) -> Result<Blob, BlobError> {
        let path = self.path(cid);
        let file = File::open(&path).map_err(|e| if e.kind() == io::ErrorKind::NotFound { BlobError::Missing(*cid) } else { BlobError::Io { path: path.clone(), source: e } })?;
        let len = file.metadata().map_err(|source| BlobError::Io { path, source })?.len();
        Ok(Blob { file, len })
    }

    /// Bytes `[offset, offset + length)` of blob `cid` (`length` 0: to the end), as a
    /// `BlobRequest` asks for them, or the error to answer it with.
    pub fn request(&self, cid: &str, offset: u64, length: u64) -> Result<Vec<u8>, (ErrorCode, String)> {
        let parsed: Cid = cid.parse().map_err(|e| (ErrorCode::BlobNotFound, format!("{cid:?} is not a CID: {e}")))?;
        let mut blob = self.get(&parsed).map_err(|e| (ErrorCode::BlobNotFound, e.to_string()))?;
        let end = if length == 0 { blob.len } else { offset.saturating_add(length) };
        if offset > blob.len || end > blob.len || (offset == blob.len && blob.len > 0) {
            return Err((ErrorCode::Malformed, format!("blob {cid}: range {offset}+{length} is outside its {} bytes", blob.len)));
        }
        if end - offset > MAX_BLOB_RANGE {
            return Err((ErrorCode::TooLarge, format!("blob {cid}: {} bytes asked at once; at most {MAX_BLOB_RANGE}", end - offset)));
        }
        blob.read_range(offset..end).map_err(|e| (ErrorCode::Internal, format!("blob {cid}: {e}")))
    }
}

impl Blob {
    /// Reads `range` of the blob (which the caller got from [`parse_range`]).
    pub fn read_range(&mut self, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.file.seek(SeekFrom::Start(range.start))?;
        let mut bytes = vec![0; (range.end - range.start) as usize];
        self.file.read_exact(&mut bytes)?;
        Ok(bytes)
    }
}

/// A `Range` header that cannot be served (HTTP 416).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("range {header:?} cannot be served from a blob of {len} bytes: {problem}")]
pub struct RangeError {
    pub header: String,
    pub len: u64,
    pub problem: &'static str,
}

/// The byte range an HTTP `Range` header asks of a blob of `len` bytes: one range in bytes,
/// `bytes=a-b`, `bytes=a-` or `bytes=-n` (RFC 9110 §14.1.2). Several ranges at once are refused.
pub fn parse_range(header: &str, len: u64) -> Result<Range<u64>, RangeError> {
    let error = |problem| RangeError { header: header.chars().take(100).collect(), len, problem };
    let spec = header.trim().strip_prefix("bytes=").ok_or_else(|| error("only byte ranges (bytes=...) are supported"))?;
    if spec.contains(',') {
        return Err(error("only one range per request is supported"));
    }
    let (first, last) = spec.split_once('-').ok_or_else(|| error("a range is first-last, first- or -suffix"))?;
    let number = |s: &str| s.trim().parse::<u64>().map_err(|_| error("range bounds must be decimal byte offsets"));
    let range = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => return Err(error("a range needs at least one bound")),
        (true, false) => {
            let suffix = number(last)?;
            if suffix == 0 {
                return Err(error("a suffix range of 0 bytes is empty"));
            }
            len.saturating_sub(suffix)..len
        }
        (false, true) => number(first)?..len,
        (false, false) => {
            let (start, end) = (number(first)?, number(last)?);
            if end < start {
                return Err(error("the last byte comes before the first"));
            }
            start..end.saturating_add(1).min(len)
        }
    };
    if range.start >= len {
        return Err(error("the range starts past the end"));
    }
    Ok(range)
}

/// A writer that hashes what passes through it.
struct HashingWriter<'a, W> {
    inner: &'a mut W,
    hasher: sha2::Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        sha2::Digest::update(&mut self.hasher, &bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> HashingWriter<'_, W> {
    fn finish(self) -> [u8; 32] {
        sha2::Digest::finalize(self.hasher).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_their_content_and_read_back_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let cid = store.insert("hello", &mut &b"hello world"[..]).unwrap();
        assert_eq!(cid.to_string(), "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e");
        assert!(store.contains(&cid));
        let mut blob = store.get(&cid).unwrap();
        assert_eq!(blob.len, 11);
        assert_eq!(blob.read_range(parse_range("bytes=6-", 11).unwrap()).unwrap(), b"world");
        assert_eq!(blob.read_range(parse_range("bytes=0-4", 11).unwrap()).unwrap(), b"hello");
        assert_eq!(blob.read_range(parse_range("bytes=-3", 11).unwrap()).unwrap(), b"rld");
        assert!(matches!(store.get(&Cid::of(b"other")), Err(BlobError::Missing(_))));
    }

    #[test]
    fn a_blob_that_does_not_match_its_cid_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let expected = Cid::of(b"the real shard");
        let error = store.insert_expecting(&expected, "shard 7", &mut &b"a forged shard"[..]).unwrap_err().to_string();
        assert!(error.contains("shard 7: content does not match its CID"), "{error}");
        assert!(!store.contains(&Cid::of(b"a forged shard")));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
        store.insert_expecting(&expected, "shard 7", &mut &b"the real shard"[..]).unwrap();
        assert!(store.contains(&expected));
    }

    #[test]
    fn ranges_that_cannot_be_served_say_why() {
        let cases = [
            ("items=0-1", "only byte ranges"),
            ("bytes=0-1,4-5", "one range"),
            ("bytes=5", "first-last"),
            ("bytes=-", "at least one bound"),
            ("bytes=a-3", "decimal"),
            ("bytes=4-2", "before the first"),
            ("bytes=11-", "past the end"),
            ("bytes=-0", "empty"),
        ];
        for (header, expected) in cases {
            let error = parse_range(header, 11).unwrap_err().to_string();
            assert!(error.contains(expected), "{header}: {error}");
        }
        assert_eq!(parse_range("bytes=5-100", 11).unwrap(), 5..11);
        assert_eq!(parse_range("bytes=-100", 11).unwrap(), 0..11);
    }
}
