//! The real `tessera serve` and `tessera contribute` processes over WebRTC on loopback:
//! embeddings (`network`) and generation split into spans across contributors (`generation`).
//! Each test runs a swarm of processes, so they take turns (`heavy`): lavapipe on a two-core
//! machine has no room for two swarms at once.

mod generation;
mod network;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");
/// Long enough for lavapipe on a busy two-core machine; a deadline, never a sleep.
pub const DEADLINE: Duration = Duration::from_secs(600);

static HEAVY: Mutex<()> = Mutex::new(());

/// One swarm at a time (a test that failed while holding the turn still passes it on).
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request_head(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the coordinator");
    stream.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).expect("send the request");
    stream.write_all(body).expect("send the body");
    stream
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status line");
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    (status, headers)
}

/// A minimal HTTP/1.1 exchange (one request per connection): status, headers, body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = request_head(addr, method, path, body.unwrap_or_default());
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let (status, headers) = parse_head(&String::from_utf8_lossy(&raw[..split]));
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v == "chunked") {
        body = dechunk(&mut BufReader::new(body.as_slice()), |_| {});
    }
    (status, headers, body)
}

/// Reads a chunked body, handing each chunk to `each` as it arrives; returns the whole body.
fn dechunk(reader: &mut impl BufRead, mut each: impl FnMut(&[u8])) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size).expect("read a chunk size") == 0 {
            return body;
        }
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).expect("a hexadecimal chunk size");
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).expect("read a chunk");
        chunk.truncate(size);
        if size == 0 {
            return body;
        }
        each(&chunk);
        body.extend_from_slice(&chunk);
    }
}

/// A streamed exchange: `headers` hears the status and headers, `each` every piece of the body
/// as it arrives; returns the whole body.
pub fn http_stream(addr: SocketAddr, path: &str, body: &[u8], headers: impl FnOnce(u16, &[(String, String)]), each: impl FnMut(&[u8])) -> Vec<u8> {
    let stream = request_head(addr, "POST", path, body);
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the response head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let (status, fields) = parse_head(&head);
    headers(status, &fields);
    assert!(fields.iter().any(|(k, v)| k == "transfer-encoding" && v == "chunked"), "a streamed response is chunked: {fields:?}");
    dechunk(&mut reader, each)
}

pub fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, _, body) = http(addr, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("a JSON body")
}

/// Polls `check` (an HTTP query, not a sleep standing in for an event) until it holds.
pub fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn contributor_ids(addr: SocketAddr) -> Vec<u64> {
    let list = get_json(addr, "/api/contributors");
    list["contributors"].as_array().expect("a list").iter().map(|c| c["id"].as_u64().expect("an id")).collect()
}

pub fn serve(data: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tessera serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc(child);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read serve's stdout");
        if let Some(url) = line.strip_prefix("tessera coordinator listening on http://") {
            return (proc, url.parse().expect("host:port"));
        }
    }
    panic!("tessera serve exited without listening");
}

pub fn contribute(addr: SocketAddr, cache: &Path, extra: &[&str]) -> Proc {
    let child = Command::new(BIN)
        .args(["contribute", "--coordinator", &format!("http://{addr}"), "--cache"])
        .arg(cache)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start tessera contribute");
    Proc(child)
}
