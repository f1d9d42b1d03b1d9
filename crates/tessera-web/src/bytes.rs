//! A model file the page fetched, read in place: `Read + Seek` over a JavaScript `Uint8Array`,
//! copying only the ranges the loaders ask for into wasm memory, so a 100 MB model is never
//! copied whole into the module's heap (which cannot shrink).

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use js_sys::Uint8Array;

/// Reads of the header are small and many; tensors bypass this buffer.
const BUFFER: usize = 64 << 10;

pub struct JsBytes {
    array: Uint8Array,
    len: u64,
    position: u64,
}

impl JsBytes {
    /// A buffered reader over `array`.
    pub fn reader(array: &Uint8Array) -> BufReader<JsBytes> {
        BufReader::with_capacity(BUFFER, JsBytes { array: array.clone(), len: u64::from(array.length()), position: 0 })
    }
}

impl Read for JsBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = self.position.min(self.len);
        let count = (buf.len() as u64).min(self.len - start);
        if count == 0 {
            return Ok(0);
        }
        // Both ends fit a u32: they are at most the array's length.
        self.array.subarray(start as u32, (start + count) as u32).copy_to(&mut buf[..count as usize]);
        self.position = start + count;
        Ok(count as usize)
    }
}

impl Seek for JsBytes {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        self.position = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the bytes"))?;
        Ok(self.position)
    }
}
