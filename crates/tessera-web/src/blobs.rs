//! Blobs by CID over HTTP: `GET {coordinator}/blobs/{cid}`, kept in Cache Storage under that URL
//! so a revisit does not download again. Every blob, from the network or from the cache, is
//! hashed against its CID before anything uses it; only checked bytes enter the cache, and a
//! cached copy that no longer matches is dropped.

use js_sys::Uint8Array;
use tessera_engine::cid::{Cid, CidError};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, Response};

use crate::bytes::JsBytes;
use crate::js_detail;

/// The Cache Storage cache blobs live in; a new layout gets a new name.
pub const CACHE_NAME: &str = "tessera-blobs-v1";
/// The largest blob fetched (a model file).
const MAX_BLOB_BYTES: f64 = (1u64 << 30) as f64;

/// A checked blob, still in JavaScript memory.
pub struct Fetched {
    pub bytes: Uint8Array,
    /// From Cache Storage rather than the network.
    pub cached: bool,
}

/// The blob `cid` names, at `url`.
pub async fn fetch(url: &str, cid: &Cid) -> Result<Fetched, String> {
    let window = web_sys::window().ok_or("fetching blobs needs a window")?;
    let cache = open_cache(&window).await;
    if let Some(cache) = &cache
        && let Some(response) = JsFuture::from(cache.match_with_str(url)).await.ok().and_then(|r| r.dyn_into::<Response>().ok())
    {
        let bytes = body(url, &response).await?;
        if let Err(e) = verify(cid, url, &bytes) {
            let _ = JsFuture::from(cache.delete_with_str(url)).await;
            return Err(format!("the cached copy is damaged and was dropped: {e}"));
        }
        return Ok(Fetched { bytes, cached: true });
    }
    let response = JsFuture::from(window.fetch_with_str(url)).await.map_err(|e| format!("GET {url}: {}", js_detail(&e)))?;
    let response: Response = response.dyn_into().map_err(|_| format!("GET {url}: not a Response"))?;
    if !response.ok() {
        return Err(format!("GET {url}: {} {}", response.status(), response.status_text()));
    }
    let bytes = body(url, &response).await?;
    verify(cid, url, &bytes).map_err(|e| e.to_string())?;
    if let Some(cache) = &cache {
        let stored = match Response::new_with_opt_buffer_source(Some(&bytes)) {
            Ok(copy) => JsFuture::from(cache.put_with_str(url, &copy)).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            crate::log(&format!("{url} is not kept in Cache Storage: {}", js_detail(&e)));
        }
    }
    Ok(Fetched { bytes, cached: false })
}

/// The blob cache, or `None` where the page has none (an opaque origin, storage turned off).
async fn open_cache(window: &web_sys::Window) -> Option<Cache> {
    let storage = window.caches().ok()?;
    JsFuture::from(storage.open(CACHE_NAME)).await.ok()?.dyn_into().ok()
}

async fn body(url: &str, response: &Response) -> Result<Uint8Array, String> {
    let length = response.headers().get("content-length").ok().flatten().and_then(|l| l.parse::<f64>().ok());
    if let Some(length) = length.filter(|&l| l > MAX_BLOB_BYTES) {
        return Err(format!("{url}: {length} bytes, over the limit of {MAX_BLOB_BYTES}"));
    }
    let promise = response.array_buffer().map_err(|e| format!("{url}: {}", js_detail(&e)))?;
    let buffer = JsFuture::from(promise).await.map_err(|e| format!("reading {url}: {}", js_detail(&e)))?;
    Ok(Uint8Array::new(&buffer))
}

/// Hashes `bytes` where they are, a range at a time, and compares with `cid`.
fn verify(cid: &Cid, name: &str, bytes: &Uint8Array) -> Result<(), CidError> {
    let got = Cid::of_reader(name, &mut JsBytes::reader(bytes))?;
    if got == *cid { Ok(()) } else { Err(CidError::Mismatch { name: name.into(), expected: *cid, got }) }
}
