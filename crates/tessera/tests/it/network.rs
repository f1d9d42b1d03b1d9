//! Embeddings over the network end to end: the real `tessera serve` and `tessera contribute` processes over
//! WebRTC on loopback. One coordinator runs three scenarios in turn: three honest contributors
//! (while a raw client sends junk on the DataChannel, the WebSocket and the UDP port), one
//! contributor SIGKILLed mid-job, and one contributor that perturbs its vectors. Each embeds
//! the same 48 sentences (12 units) through `POST /v1/embeddings` and compares them with
//! `tessera embed`. Every wait is on an event (a count in `/metrics` or `/api`), with a deadline
//! only for reporting a failure; the throughput of large jobs is `tessera bench network`'s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use tessera_protocol::{ContributorMessage, CoordinatorMessage, ErrorCode, decode_control, encode_control};
use tessera_rtc::{Message, Peer, PeerEvent};

use crate::{BIN, DEADLINE, Proc, contribute, contributor_ids, get_json, heavy, http, serve, wait_until};

/// Inputs per unit (`serve --unit-inputs`): small units, so that few sentences make many units.
const UNIT_INPUTS: usize = 4;
/// Every scenario embeds all of them: 12 units, 24 replicas at least. That is about the least
/// that proves each point: in the first job each of the three contributors runs several units;
/// the second still has most of its units to go when a contributor is killed (once two are
/// accepted and all three contributors hold one), so the victim's unit is reissued and the two
/// survivors do the rest; in the third, the perturbing contributor (last in the queue) gets a
/// replica as soon as the job starts and more after it, and each of its units needs a third
/// replica to outvote it. (With 500 sentences, 25 units of 20, a scenario took 456-545 s on a
/// busy two-core machine, close to the coordinator's 600 s request timeout.)
const SENTENCES: usize = 48;
const MIN_COSINE: f32 = 0.9999;

fn sentences() -> Vec<String> {
    let subjects = ["The cat", "A scientist", "My neighbour", "The old train", "A small bird", "The committee", "Our teacher", "The river", "A tired runner", "The city council"];
    let verbs = ["watches", "builds", "forgets", "paints", "questions", "follows", "repairs", "describes", "ignores", "celebrates"];
    let objects = ["the quiet harbour", "a broken clock", "the morning news", "an ancient map", "the new bridge"];
    (0..SENTENCES)
        .map(|i| format!("{} {} {} on day {}.", subjects[i % 10], verbs[(i / 10) % 10], objects[(i / 7) % 5], i))
        .collect()
}

/// How many units each contributor connected holds now (`/api/contributors`).
fn units_held(addr: SocketAddr) -> Vec<u64> {
    let list = get_json(addr, "/api/contributors");
    list["contributors"].as_array().expect("a list").iter().map(|c| c["units_held"].as_u64().expect("a count")).collect()
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, _, body) = http(addr, "GET", "/metrics", None);
    let text = String::from_utf8(body).expect("metrics are text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or_else(|| panic!("no metric {name}"))
}

/// The same model on this machine, through `tessera embed`.
fn reference(texts: &[String]) -> Vec<Vec<f32>> {
    let out = Command::new(BIN).args(["embed", "--model", "minilm"]).args(texts).output().expect("run tessera embed");
    assert!(out.status.success(), "tessera embed failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Vec<f32>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["embedding"].as_array().expect("an embedding").iter().map(|v| v.as_f64().expect("a number") as f32).collect())
        .collect();
    assert_eq!(rows.len(), texts.len());
    rows
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Posts the sentences; returns the job id and the vectors.
fn embed(addr: SocketAddr, texts: &[String]) -> (u64, Vec<Vec<f32>>) {
    let request = json!({ "model": "minilm", "input": texts }).to_string();
    let (status, headers, body) = http(addr, "POST", "/v1/embeddings", Some(request.as_bytes()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let job = headers.iter().find(|(k, _)| k == "x-tessera-job").and_then(|(_, v)| v.parse().ok()).expect("an x-tessera-job header");
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    let data = body["data"].as_array().expect("data");
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"].as_u64(), Some(i as u64));
            d["embedding"].as_array().expect("a float embedding").iter().map(|v| v.as_f64().expect("a number") as f32).collect()
        })
        .collect();
    (job, vectors)
}

fn check_against(reference: &[Vec<f32>], got: &[Vec<f32>], scenario: &str) {
    assert_eq!(got.len(), reference.len(), "{scenario}: vector count");
    for (i, (r, g)) in reference.iter().zip(got).enumerate() {
        assert_eq!(r.len(), g.len(), "{scenario}: input {i} width");
        let c = cosine(r, g);
        assert!(c >= MIN_COSINE, "{scenario}: input {i} has cosine {c} against the local run");
    }
}

/// Opens a raw DataChannel to the coordinator; returns it and the coordinator's UDP address
/// (from the SDP answer's host candidate).
async fn raw_peer(addr: SocketAddr) -> (Peer, SocketAddr) {
    let url = format!("ws://{addr}/ws");
    let answer = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stash = answer.clone();
    // Opening the channel waits on the coordinator, however busy the machine is.
    let config = tessera_rtc::Config { connect_timeout: DEADLINE, ..tessera_rtc::Config::default() };
    let mut peer = tessera_rtc::connect("127.0.0.1:0".parse().expect("an address"), config, |offer| async move {
        let sdp = tessera_rtc::signal::offer_over_websocket(&url, offer).await?;
        *stash.lock().expect("not poisoned") = sdp.clone();
        Ok::<_, tessera_rtc::RtcError>(sdp)
    })
    .await
    .expect("connect a raw peer");
    peer.opened().await.expect("the DataChannel opens");
    let sdp = answer.lock().expect("not poisoned").clone();
    let udp = sdp
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.strip_prefix("a=candidate:")?.split(' ').collect();
            format!("{}:{}", fields.get(4)?, fields.get(5)?).parse().ok()
        })
        .expect("a host candidate in the answer");
    (peer, udp)
}

/// The next control message from the coordinator, or `None` once the channel closed.
async fn next_control(peer: &mut Peer) -> Option<CoordinatorMessage> {
    loop {
        match tokio::time::timeout(DEADLINE, peer.recv()).await.expect("the coordinator answers") {
            Some(PeerEvent::Message(Message::Text(text))) => return Some(decode_control(text.as_bytes(), usize::MAX).expect("a coordinator message")),
            Some(PeerEvent::Closed(_)) | None => return None,
            Some(_) => {}
        }
    }
}

async fn expect_error(peer: &mut Peer, code: ErrorCode) {
    match next_control(peer).await {
        Some(CoordinatorMessage::Error { code: got, .. }) => assert_eq!(got, code),
        other => panic!("expected an {code:?} error, got {other:?}"),
    }
}

async fn expect_closed(peer: &mut Peer) {
    assert_eq!(next_control(peer).await, None, "the coordinator closes a peer after a fatal error");
}

/// Junk on every surface: each offender gets an error and (for fatal ones) a close.
async fn abuse(addr: SocketAddr) {
    // Garbage text, then a message before hello, then one too large: error, error, close.
    let (mut peer, udp) = raw_peer(addr).await;
    peer.send(Message::Text("this is not json".into())).await.expect("send");
    expect_error(&mut peer, ErrorCode::Malformed).await;
    peer.send(Message::Text(encode_control(&ContributorMessage::Heartbeat))).await.expect("send");
    expect_error(&mut peer, ErrorCode::NotJoined).await;
    peer.send(Message::Text(format!("{{\"type\":\"heartbeat\",\"pad\":\"{}\"}}", "x".repeat(100 << 10)))).await.expect("send");
    expect_error(&mut peer, ErrorCode::TooLarge).await;
    expect_closed(&mut peer).await;

    // An unknown protocol version: error and close.
    let (mut peer, _) = raw_peer(addr).await;
    peer.send(Message::Text(r#"{"type":"hello","protocol_version":99,"capabilities":{}}"#.into())).await.expect("send");
    expect_error(&mut peer, ErrorCode::UnsupportedVersion).await;
    expect_closed(&mut peer).await;

    // A binary frame that is not one: error and close.
    let (mut peer, _) = raw_peer(addr).await;
    peer.send(Message::Binary(vec![0xff; 100])).await.expect("send");
    expect_error(&mut peer, ErrorCode::Malformed).await;
    expect_closed(&mut peer).await;

    // Garbage datagrams on the WebRTC port are counted and dropped.
    let garbage_before = metric(addr, "tessera_rtc_garbage_datagrams_total");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    for i in 0..50u8 {
        socket.send_to(&[i.wrapping_mul(7) | 0x80; 64], udp).expect("send a datagram");
    }
    wait_until("garbage datagrams to be counted", DEADLINE, || metric(addr, "tessera_rtc_garbage_datagrams_total") > garbage_before);

    // A garbage offer on the WebSocket is refused by name.
    let refused = tessera_rtc::signal::offer_over_websocket(&format!("ws://{addr}/ws"), "v=garbage".into()).await;
    assert!(matches!(&refused, Err(e) if e.to_string().contains("Malformed")), "{refused:?}");
    // Garbage on the HTTP port gets a 4xx, not a crash.
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.write_all(b"\x00\x01garbage\r\n\r\n").expect("send garbage");
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply);
    assert!(reply.is_empty() || reply.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&reply));
}

#[test]
fn embeddings_over_the_network() {
    let _heavy = heavy();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let cache = dir.path().join("contributor-cache");
    let texts = sentences();

    let (_server, addr) = serve(&dir.path().join("data"), &["--unit-inputs", &UNIT_INPUTS.to_string()]);
    // No contributor yet: a clear 503 in OpenAI's shape.
    let (status, _, body) = http(addr, "POST", "/v1/embeddings", Some(br#"{"model":"minilm","input":"hello"}"#));
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let error: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(error["error"]["message"].as_str().expect("a message").contains("No contributor"));
    let (status, _, _) = http(addr, "POST", "/v1/embeddings", Some(br#"{"model":"gpt-9","input":"hello"}"#));
    assert_eq!(status, 404);

    let mut contributors: Vec<Proc> = (0..3).map(|_| contribute(addr, &cache, &[])).collect();
    let expected = reference(&texts);
    println!("reference run done at {:?}", started.elapsed());
    wait_until("three contributors", DEADLINE, || contributor_ids(addr).len() == 3);

    // 1. Three honest contributors, and junk from a raw peer meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let t = Instant::now();
    let posting = std::thread::spawn({
        let texts = texts.clone();
        move || embed(addr, &texts)
    });
    runtime.block_on(abuse(addr));
    let (job, got) = posting.join().expect("the request thread");
    check_against(&expected, &got, "three contributors");
    println!("scenario 1 (job {job}): {SENTENCES} sentences in {:?}", t.elapsed());
    let status = get_json(addr, &format!("/api/jobs/{job}"));
    assert_eq!(status["state"], "done");
    assert_eq!(status["units_done"], status["units_total"]);

    // 2. One contributor SIGKILLed once the job is under way: nothing is lost. The kill waits
    // for two accepted units and for every contributor to hold one, so it lands mid-job and
    // mid-unit however fast the machine is.
    let t = Instant::now();
    let accepted_before = metric(addr, "tessera_units_accepted_total");
    let reissued_before = metric(addr, "tessera_units_reissued_total");
    let posting = std::thread::spawn({
        let texts = texts.clone();
        move || embed(addr, &texts)
    });
    wait_until("the second job to get going, every contributor holding a unit", DEADLINE, || {
        metric(addr, "tessera_units_accepted_total") >= accepted_before + 2 && units_held(addr).iter().filter(|&&n| n > 0).count() == 3
    });
    let mut victim = contributors.pop().expect("three contributors");
    victim.0.kill().expect("SIGKILL a contributor");
    let (job, got) = posting.join().expect("the request thread");
    check_against(&expected, &got, "one contributor killed");
    let reissued = metric(addr, "tessera_units_reissued_total") - reissued_before;
    println!("scenario 2 (job {job}): {SENTENCES} sentences in {:?}, {reissued} assignment(s) reissued", t.elapsed());
    drop(victim);

    // 3. A contributor that perturbs its vectors: none of its results is accepted.
    wait_until("the killed contributor to be dropped", DEADLINE, || contributor_ids(addr).len() == 2);
    let honest = contributor_ids(addr);
    let _liar = contribute(addr, &cache, &["--perturb"]);
    wait_until("the perturbing contributor", DEADLINE, || contributor_ids(addr).len() == 3);
    let t = Instant::now();
    let (job, got) = embed(addr, &texts);
    check_against(&expected, &got, "one perturbing contributor");
    println!("scenario 3 (job {job}): {SENTENCES} sentences in {:?}", t.elapsed());
    let status = get_json(addr, &format!("/api/jobs/{job}"));
    assert_eq!(status["state"], "done");
    let units = status["units"].as_array().expect("units");
    assert_eq!(units.len() as u64, status["units_total"].as_u64().expect("a total"));
    for unit in units {
        let accepted: Vec<u64> = unit["accepted_from"].as_array().expect("a list").iter().filter_map(Value::as_u64).collect();
        // The liar may be excluded and reconnect under a new id: every id but the honest ones is it.
        assert!(accepted.iter().all(|id| honest.contains(id)), "unit {unit} accepted a result of the perturbing contributor (honest: {honest:?})");
        assert!(accepted.len() >= 2, "unit {unit} accepted with fewer than two agreeing results");
    }
    let caught = units.iter().any(|u| u["rejected_from"].as_array().is_some_and(|r| r.iter().any(|c| c.as_u64().is_some_and(|c| !honest.contains(&c)))));
    assert!(caught, "the perturbing contributor was never outvoted: did it get no work?");
    println!("total {:?}", started.elapsed());
}
