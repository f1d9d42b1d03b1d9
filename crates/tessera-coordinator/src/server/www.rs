//! The web pages the coordinator hands to browsers, from its `www` folder: `/` the volunteer
//! page, `/swarm` the swarm's live view (over `/api/swarm`), `/embed` the page the widget frames,
//! `/widget.js` the loader other sites embed, and the files those load (`/pkg/*`: the wasm
//! contributor that `cargo run -p xtask -- build-web` builds).
//!
//! Only plain names are served (letters, digits, `.`, `-`, `_`; no leading dot; a known
//! extension), at most one folder deep, and only if the file, symlinks resolved, lies inside the
//! folder. Pages and the wasm revalidate on every load (`no-cache` with an `ETag`, since
//! `wasm-bindgen`'s file names carry no hash); `/widget.js` may be cached for five minutes, as
//! other sites load it on every page view. Only `/widget.js` may be loaded by other origins
//! (`Cross-Origin-Resource-Policy: cross-origin`; a `<script>` tag needs no CORS); only `/embed`
//! may be framed by them.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

const BUILD_HINT: &str = "run `cargo run -p xtask -- build-web` in the Tessera repository";
/// What the framed page may load: its own origin only (`/ws` and the blobs included), wasm
/// compiled from it, nothing inline. Any site may frame it.
const EMBED_CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'";
/// The volunteer page's: the same, and no site may frame it (a framed page could be
/// dressed up to trick a click on "Start").
const VOLUNTEER_CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'; frame-ancestors 'none'";
/// The swarm page's: its own scripts and `/api/swarm` only, no wasm, and no site may frame it.
const SWARM_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'; frame-ancestors 'none'";
/// How long other sites' visitors may keep `/widget.js` without asking again.
const WIDGET_MAX_AGE: &str = "public, max-age=300";

/// The `www` folder, if the coordinator has one (canonical, so containment checks compare like with like).
#[derive(Debug, Clone)]
pub struct Www {
    root: Option<PathBuf>,
}

impl Www {
    /// `dir` as given; a folder that does not exist is kept as none, and every page request
    /// answers 503 with how to fix it.
    pub fn new(dir: Option<&Path>) -> Www {
        Www { root: dir.and_then(|d| d.canonicalize().ok()).filter(|d| d.is_dir()) }
    }

    /// The response for a `GET` or `HEAD` of `url_path`, or `None` when the path names no page
    /// or asset (the API's own 404 answers it).
    pub async fn respond(&self, method: &Method, url_path: &str, headers: &HeaderMap) -> Option<Response> {
        let relative = relative_path(url_path)?;
        let Some(root) = &self.root else {
            return Some(unavailable(format!(
                "This coordinator serves no web pages: it found no www folder. Start it with `tessera serve --www DIR` \
                 (DIR: the repository's www/), then {BUILD_HINT}."
            )));
        };
        let file = root.join(&relative);
        if relative.starts_with("pkg") && !root.join("pkg").is_dir() {
            return Some(unavailable(format!("The browser contributor is not built (no {}): {BUILD_HINT}.", root.join("pkg").display())));
        }
        // Symlinks are resolved and the result must still lie inside the folder.
        let Some(file) = tokio::fs::canonicalize(&file).await.ok().filter(|f| f.starts_with(root)) else {
            return Some(not_found(url_path));
        };
        let Ok(meta) = tokio::fs::metadata(&file).await else {
            return Some(not_found(url_path));
        };
        if !meta.is_file() {
            return Some(not_found(url_path));
        }
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let etag = format!("\"{:x}-{mtime:x}\"", meta.len());
        let mut response = if headers.get(header::IF_NONE_MATCH).is_some_and(|v| etag_matches(v, &etag)) {
            StatusCode::NOT_MODIFIED.into_response()
        } else if *method == Method::HEAD {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
            r
        } else {
            match tokio::fs::read(&file).await {
                Ok(bytes) => (StatusCode::OK, Body::from(bytes)).into_response(),
                Err(_) => return Some(not_found(url_path)),
            }
        };
        for (name, value) in asset_headers(&relative) {
            response.headers_mut().insert(name, HeaderValue::from_static(value));
        }
        if let Ok(value) = HeaderValue::from_str(&etag) {
            response.headers_mut().insert(header::ETAG, value);
        }
        Some(response)
    }
}

/// The file a URL path names, relative to the folder: `/` is `index.html`, `/embed` is
/// `embed.html`, `/swarm` is `swarm.html`; anything else is itself, if every segment is a plain
/// name and the last has a type we serve. `None` for anything else, traversal included.
fn relative_path(url_path: &str) -> Option<PathBuf> {
    let path = match url_path {
        "/" => "index.html",
        "/embed" => "embed.html",
        "/swarm" => "swarm.html",
        other => other.strip_prefix('/')?,
    };
    let segments: Vec<&str> = path.split('/').collect();
    let plain = |s: &&str| !s.is_empty() && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if segments.len() > 2 || !segments.iter().all(plain) {
        return None;
    }
    content_type(path)?;
    Some(segments.iter().collect())
}

fn content_type(path: &str) -> Option<&'static str> {
    let extension = path.rsplit_once('.')?.1;
    Some(match extension {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// Type, caching, who may load or frame it.
fn asset_headers(relative: &Path) -> Vec<(header::HeaderName, &'static str)> {
    let name = relative.to_str().unwrap_or_default();
    let mut headers = vec![
        (header::CONTENT_TYPE, content_type(name).unwrap_or("application/octet-stream")),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    if name == "widget.js" {
        headers.push((header::CACHE_CONTROL, WIDGET_MAX_AGE));
        headers.push((header::HeaderName::from_static("cross-origin-resource-policy"), "cross-origin"));
        return headers;
    }
    headers.push((header::CACHE_CONTROL, "no-cache"));
    headers.push((header::HeaderName::from_static("cross-origin-resource-policy"), "same-origin"));
    headers.push((header::REFERRER_POLICY, "no-referrer"));
    match name {
        "embed.html" => headers.push((header::CONTENT_SECURITY_POLICY, EMBED_CSP)),
        "index.html" => {
            headers.push((header::CONTENT_SECURITY_POLICY, VOLUNTEER_CSP));
            headers.push((header::X_FRAME_OPTIONS, "DENY"));
        }
        "swarm.html" => {
            headers.push((header::CONTENT_SECURITY_POLICY, SWARM_CSP));
            headers.push((header::X_FRAME_OPTIONS, "DENY"));
        }
        _ if name.ends_with(".html") => headers.push((header::X_FRAME_OPTIONS, "DENY")),
        _ => {}
    }
    headers
}

fn etag_matches(if_none_match: &HeaderValue, etag: &str) -> bool {
    if_none_match.to_str().is_ok_and(|v| v.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == etag
    }))
}

fn text(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], message + "\n").into_response()
}

fn unavailable(message: String) -> Response {
    text(StatusCode::SERVICE_UNAVAILABLE, message)
}

fn not_found(url_path: &str) -> Response {
    text(StatusCode::NOT_FOUND, format!("No file {url_path} in this coordinator's web pages."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_path(url: &str, expected: Option<&str>) {
        assert_eq!(relative_path(url), expected.map(PathBuf::from), "{url}");
    }

    #[test]
    fn url_paths_name_plain_files_only() {
        let rows = [
            ("/", Some("index.html")),
            ("/embed", Some("embed.html")),
            ("/swarm", Some("swarm.html")),
            ("/swarm.js", Some("swarm.js")),
            ("/swarm/", None),
            ("/widget.js", Some("widget.js")),
            ("/tessera.css", Some("tessera.css")),
            ("/pkg/tessera_web_bg.wasm", Some("pkg/tessera_web_bg.wasm")),
            ("/pkg/tessera_web.js", Some("pkg/tessera_web.js")),
            ("/../Cargo.toml", None),
            ("/pkg/../../Cargo.toml", None),
            ("/pkg/..", None),
            ("/%2e%2e/Cargo.toml", None),
            ("/..%2fCargo.toml", None),
            ("/.git/config", None),
            ("/pkg/.hidden.js", None),
            ("//etc/passwd.txt", None),
            ("/pkg//x.js", None),
            ("/a/b/c.js", None),
            ("/embed/", None),
            ("/pkg\\..\\x.js", None),
            ("/x.js\0", None),
            ("/Cargo.toml", None),
            ("/README", None),
            ("/v1/embeddings", None),
            ("relative.js", None),
        ];
        for (url, expected) in rows {
            check_path(url, expected);
        }
    }

    /// A folder with pages, a pkg and a secret beside it (what traversal would reach).
    fn fixture() -> (tempfile::TempDir, Www) {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir_all(www.join("pkg")).unwrap();
        for (name, body) in [
            ("index.html", "<!doctype html>volunteer"),
            ("embed.html", "<!doctype html>embed"),
            ("swarm.html", "<!doctype html>swarm"),
            ("widget.js", "/* widget */"),
            ("tessera.css", "body{}"),
            ("pkg/tessera_web_bg.wasm", "\0asm"),
        ] {
            std::fs::write(www.join(name), body).unwrap();
        }
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), www.join("link.txt")).unwrap();
        let served = Www::new(Some(&www));
        (dir, served)
    }

    async fn get(www: &Www, path: &str, headers: &HeaderMap) -> Option<(StatusCode, HeaderMap, String)> {
        let response = www.respond(&Method::GET, path, headers).await?;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        Some((parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn check_response(got: &(StatusCode, HeaderMap, String), status: u16, expected: &[(&str, &str)], body: &str) {
        assert_eq!(got.0.as_u16(), status, "{got:?}");
        for (name, value) in expected {
            assert_eq!(got.1.get(*name).and_then(|v| v.to_str().ok()), Some(*value), "{name} in {got:?}");
        }
        assert!(got.2.contains(body), "{body:?} not in {got:?}");
    }

    #[tokio::test]
    async fn pages_and_assets_are_served_with_their_types_caching_and_origins() {
        let (_dir, www) = fixture();
        let none = HeaderMap::new();
        /// Path, status, headers it must carry, text its body holds.
        type Row = (&'static str, u16, &'static [(&'static str, &'static str)], &'static str);
        let rows: [Row; 8] = [
            ("/", 200, &[("content-type", "text/html; charset=utf-8"), ("cache-control", "no-cache"), ("x-frame-options", "DENY")], "volunteer"),
            ("/swarm", 200, &[("content-type", "text/html; charset=utf-8"), ("content-security-policy", SWARM_CSP), ("x-frame-options", "DENY")], "swarm"),
            ("/embed", 200, &[("content-type", "text/html; charset=utf-8"), ("cross-origin-resource-policy", "same-origin")], "embed"),
            ("/widget.js", 200, &[("content-type", "text/javascript; charset=utf-8"), ("cache-control", WIDGET_MAX_AGE), ("cross-origin-resource-policy", "cross-origin")], "widget"),
            ("/pkg/tessera_web_bg.wasm", 200, &[("content-type", "application/wasm"), ("cache-control", "no-cache"), ("x-content-type-options", "nosniff")], "asm"),
            ("/tessera.css", 200, &[("content-type", "text/css; charset=utf-8")], "body"),
            ("/pkg/missing.js", 404, &[("content-type", "text/plain; charset=utf-8")], "No file /pkg/missing.js"),
            ("/link.txt", 404, &[], "No file"),
        ];
        for (path, status, headers, body) in rows {
            let got = get(&www, path, &none).await.unwrap_or_else(|| panic!("{path} is not an asset"));
            check_response(&got, status, headers, body);
        }
        let embed = get(&www, "/embed", &none).await.unwrap();
        assert!(embed.1.get("x-frame-options").is_none(), "other sites must be able to frame /embed");
        assert!(get(&www, "/../secret.txt", &none).await.is_none());
        assert!(get(&www, "/v1/models", &none).await.is_none());
    }

    #[tokio::test]
    async fn an_unchanged_asset_revalidates_to_304() {
        let (_dir, www) = fixture();
        let first = get(&www, "/pkg/tessera_web_bg.wasm", &HeaderMap::new()).await.unwrap();
        let etag = first.1.get(header::ETAG).unwrap().clone();
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, etag.clone());
        let again = get(&www, "/pkg/tessera_web_bg.wasm", &headers).await.unwrap();
        check_response(&again, 304, &[("etag", etag.to_str().unwrap())], "");
        assert!(again.2.is_empty());
    }

    #[tokio::test]
    async fn a_missing_folder_or_build_says_how_to_build_it() {
        let none = HeaderMap::new();
        let absent = Www::new(None);
        check_response(&get(&absent, "/", &none).await.unwrap(), 503, &[], "xtask -- build-web");
        check_response(&get(&absent, "/widget.js", &none).await.unwrap(), 503, &[], "--www");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), "page").unwrap();
        let unbuilt = Www::new(Some(dir.path()));
        check_response(&get(&unbuilt, "/", &none).await.unwrap(), 200, &[], "page");
        check_response(&get(&unbuilt, "/pkg/tessera_web.js", &none).await.unwrap(), 503, &[], "xtask -- build-web");
    }
}
