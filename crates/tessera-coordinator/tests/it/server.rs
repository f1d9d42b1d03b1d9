//! The coordinator's async shell on loopback, without a GPU: a `Server` with a stand-in model
//! (a real BERT config and tokenizer; weights that are only hashed, never loaded) and raw
//! contributors that speak the protocol over real WebRTC and answer units with made-up
//! vectors. Verdicts after a vote, signals relayed between contributors, a flood of
//! connections while a contributor works, and request bodies over their limit.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_coordinator::server::{Server, ServerConfig};
use tessera_protocol::{
    Chunker, ContributorId, ContributorMessage, CoordinatorMessage, ErrorCode, PROTOCOL_VERSION,
    PayloadKind, PayloadRef, SignalPayload, Tensor, UnitId, Work, decode_control, encode_control,
};
use tessera_rtc::{Message, Peer, PeerEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::common::caps;

/// The stand-in model's width.
const HIDDEN: usize = 8;
/// Heartbeats in these tests: a contributor starved by a flood for a few beats is lost.
const HEARTBEAT_MS: u64 = 250;
const HEARTBEAT_TIMEOUT_MS: u64 = 3_000;
/// How long any one message may take to arrive; a deadline, never a sleep.
const PATIENCE: Duration = Duration::from_secs(30);
/// The coordinator's relay budget (`server/peer.rs`): a burst, then a rate.
const RELAY_BURST: usize = 64;
const RELAY_PER_SECOND: f64 = 16.0;

/// A model folder the coordinator can publish: a BERT config, a word-level tokenizer, and
/// weights that are hashed into the blob store but never read (no contributor here loads them).
fn stand_in_model(dir: &Path) {
    let config = json!({
        "model_type": "bert", "hidden_act": "gelu", "hidden_size": HIDDEN,
        "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16,
        "max_position_embeddings": 32, "vocab_size": 8, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    });
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null,
        "decoder": null,
        "model": {
            "type": "WordLevel", "unk_token": "[UNK]",
            "vocab": { "[UNK]": 0, "hello": 1, "world": 2, "again": 3, "one": 4, "two": 5 },
        },
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"stand-in weights, never loaded").unwrap();
}

/// A coordinator serving on loopback until dropped.
struct Coordinator {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start(replicas: u8) -> Coordinator {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    stand_in_model(&model);
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("data"),
        model,
    );
    config.inputs_per_unit = 2;
    config.replicas = replicas;
    config.scheduler.heartbeat_interval_ms = HEARTBEAT_MS;
    config.scheduler.heartbeat_timeout_ms = HEARTBEAT_TIMEOUT_MS;
    let server = Server::start(config).await.expect("start the coordinator");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    Coordinator {
        addr,
        _stop: stop,
        _dir: dir,
    }
}

/// The vectors a unit's inputs "embed" to here: any fixed function of the tokens does.
fn made_up(work: &Work, lie: bool) -> Tensor {
    let Work::Embedding { inputs, .. } = work;
    let sign = if lie { -1.0 } else { 1.0 };
    let values: Vec<f32> = inputs
        .iter()
        .flat_map(|tokens| {
            let seed: u32 = tokens.iter().sum();
            (0..HIDDEN as u32).map(move |k| sign * (1 + (seed * 7 + k * 3) % 11) as f32)
        })
        .collect();
    Tensor::from_f32(vec![inputs.len() as u64, HIDDEN as u64], &values).unwrap()
}

/// A DataChannel to the coordinator over its `/ws` signalling, opened, nothing said yet.
async fn channel(addr: SocketAddr) -> Peer {
    let url = format!("ws://{addr}/ws");
    let mut peer = tessera_rtc::connect(
        "127.0.0.1:0".parse().unwrap(),
        tessera_rtc::Config::default(),
        move |offer| async move { tessera_rtc::signal::offer_over_websocket(&url, offer).await },
    )
    .await
    .expect("connect to the coordinator");
    peer.opened().await.expect("the DataChannel opens");
    peer
}

async fn send(peer: &Peer, message: &ContributorMessage) {
    peer.send(Message::Text(encode_control(message)))
        .await
        .expect("send to the coordinator");
}

/// The next control message, or `None` once the channel closed.
async fn next_control(peer: &mut Peer) -> Option<CoordinatorMessage> {
    loop {
        let event = tokio::time::timeout(PATIENCE, peer.recv())
            .await
            .expect("the coordinator says something in time");
        match event {
            Some(PeerEvent::Message(Message::Text(text))) => {
                return Some(decode_control(text.as_bytes(), usize::MAX).expect("a coordinator message"));
            }
            Some(PeerEvent::Closed(_)) | None => return None,
            Some(_) => {}
        }
    }
}

async fn expect_error(peer: &mut Peer, code: ErrorCode) -> String {
    match next_control(peer).await {
        Some(CoordinatorMessage::Error { code: got, message }) if got == code => message,
        other => panic!("expected a {code:?} error, got {other:?}"),
    }
}

/// A contributor made of protocol messages: hello, results, heartbeats, signals.
struct Raw {
    peer: Peer,
    id: ContributorId,
    streams: u64,
}

impl Raw {
    async fn join(addr: SocketAddr) -> Raw {
        let mut peer = channel(addr).await;
        let hello = ContributorMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            capabilities: caps(1),
        };
        send(&peer, &hello).await;
        match next_control(&mut peer).await {
            Some(CoordinatorMessage::Welcome { contributor, .. }) => Raw {
                peer,
                id: contributor,
                streams: 1,
            },
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    async fn send(&self, message: &ContributorMessage) {
        send(&self.peer, message).await;
    }

    async fn next(&mut self) -> Option<CoordinatorMessage> {
        next_control(&mut self.peer).await
    }

    /// A signal from this contributor to `to`.
    async fn signal(&self, to: ContributorId, payload: SignalPayload) {
        let from = self.id;
        self.send(&ContributorMessage::Signal { from, to, payload }).await;
    }

    /// Sends a unit's result as a native contributor does: tensor frames, then `unit_result`.
    async fn answer(&mut self, unit: UnitId, work: &Work, lie: bool) {
        let bytes = made_up(work, lie).encode();
        let stream = self.streams;
        self.streams += 1;
        for frame in Chunker::new(stream, PayloadKind::Tensor, &bytes).unwrap() {
            self.peer
                .send(Message::Binary(frame))
                .await
                .expect("send a frame");
        }
        let payload = PayloadRef {
            stream,
            bytes: bytes.len() as u64,
        };
        self.send(&ContributorMessage::UnitResult { unit, payload })
            .await;
    }

    /// Answers what it is assigned until its first verdict, and returns it.
    async fn until_verdict(mut self, lie: bool) -> (ContributorId, UnitId, bool) {
        loop {
            match self.next().await {
                Some(CoordinatorMessage::Assign { unit, work, .. }) => {
                    self.answer(unit, &work, lie).await;
                }
                Some(CoordinatorMessage::Verdict { unit, accepted }) => {
                    return (self.id, unit, accepted);
                }
                Some(CoordinatorMessage::Error { code, message }) => {
                    panic!("contributor {}: refused ({code:?}): {message}", self.id)
                }
                Some(_) => {}
                None => panic!("contributor {}: closed before its verdict", self.id),
            }
        }
    }
}

/// One HTTP/1.1 exchange: the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect over HTTP");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("the response comes in time")
        .expect("read the response");
    let text = String::from_utf8(raw).expect("a text response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

/// `POST /v1/embeddings`: the vectors, in input order.
async fn embed(addr: SocketAddr, texts: &[&str]) -> Vec<Vec<f32>> {
    let request = json!({ "model": "minilm", "input": texts }).to_string();
    let (status, body) = http(addr, "POST", "/v1/embeddings", &request).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("a JSON body");
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("an embedding")
                .iter()
                .map(|v| v.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect()
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (status, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The unit's outvoted contributor hears `accepted: false`, the two that agreed hear `true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_contributor_that_reported_on_a_unit_gets_its_verdict() {
    let coordinator = start(2).await;
    let addr = coordinator.addr;
    // Joined in this order, the liar and `first` get the unit's two replicas; their results
    // disagree, so `second` gets a third.
    let liar = Raw::join(addr).await;
    let first = Raw::join(addr).await;
    let second = Raw::join(addr).await;
    let ids = (liar.id, first.id, second.id);
    let texts = ["hello world", "one two again"];
    let posting = tokio::spawn(async move { embed(addr, &texts).await });
    let (l, f, s) = tokio::join!(
        liar.until_verdict(true),
        first.until_verdict(false),
        second.until_verdict(false)
    );
    let unit = l.1;
    assert_eq!(
        [l, f, s],
        [(ids.0, unit, false), (ids.1, unit, true), (ids.2, unit, true)]
    );
    let vectors = posting.await.expect("the request task");
    assert_eq!(metric(addr, "tessera_results_rejected_total").await, 1);
    let inputs = vec![vec![1, 2], vec![4, 5, 3]];
    let honest = made_up(
        &Work::Embedding {
            model: String::new(),
            inputs,
        },
        false,
    );
    let expected: Vec<Vec<f32>> = honest
        .f32_values()
        .unwrap()
        .collect::<Vec<_>>()
        .chunks(HIDDEN)
        .map(<[f32]>::to_vec)
        .collect();
    assert_eq!(vectors, expected, "the liar's vectors were not the ones returned");
}

/// Signals go from one joined contributor to another with the sender's id; a signal from a
/// peer that has not joined, with someone else's `from`, to itself, to nobody, or over the
/// size limit is refused without closing the sender; a sender over its budget is refused,
/// then closed like any peer that keeps erring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_relayed_between_contributors_within_bounds() {
    let coordinator = start(2).await;
    let addr = coordinator.addr;
    let offer = |sdp: &str| SignalPayload::Offer { sdp: sdp.into(), purpose: Default::default() };

    let mut stranger = channel(addr).await;
    let from_stranger = ContributorMessage::Signal {
        from: ContributorId(1),
        to: ContributorId(2),
        payload: offer("v=0"),
    };
    send(&stranger, &from_stranger).await;
    expect_error(&mut stranger, ErrorCode::NotJoined).await;

    let mut a = Raw::join(addr).await;
    let mut b = Raw::join(addr).await;
    a.signal(b.id, offer("v=0 from a")).await;
    assert_eq!(
        b.next().await,
        Some(CoordinatorMessage::Signal {
            from: a.id,
            to: b.id,
            payload: offer("v=0 from a")
        })
    );
    let candidate = SignalPayload::Candidate {
        candidate: "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host".into(),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
    };
    b.signal(a.id, candidate.clone()).await;
    assert_eq!(
        a.next().await,
        Some(CoordinatorMessage::Signal {
            from: b.id,
            to: a.id,
            payload: candidate
        })
    );

    // Refusals. Two are protocol errors (a peer is closed at its third); a contributor that
    // has just left is not the sender's fault, so those never count.
    let forged = ContributorMessage::Signal {
        from: b.id,
        to: b.id,
        payload: offer("v=0"),
    };
    a.send(&forged).await;
    let message = expect_error(&mut a.peer, ErrorCode::Malformed).await;
    assert!(message.contains("must be your own id"), "{message}");
    for _ in 0..3 {
        a.signal(ContributorId(999), offer("v=0")).await;
        let message = expect_error(&mut a.peer, ErrorCode::UnknownPeer).await;
        assert_eq!(message, "no contributor 999 is connected; the signal was dropped");
    }
    a.signal(b.id, offer(&"x".repeat(17 * 1024))).await;
    expect_error(&mut a.peer, ErrorCode::TooLarge).await;
    b.signal(b.id, offer("v=0")).await;
    let message = expect_error(&mut b.peer, ErrorCode::Malformed).await;
    assert_eq!(message, format!("a signal to contributor {}: that is you", b.id));
    a.signal(b.id, offer("v=0 still here")).await;
    assert_eq!(
        b.next().await,
        Some(CoordinatorMessage::Signal {
            from: a.id,
            to: b.id,
            payload: offer("v=0 still here")
        })
    );

    // A flood: the budget passes a burst and refuses the rest until the flooder is closed.
    let flooder = Raw::join(addr).await;
    let sent = RELAY_BURST + 16;
    let started = Instant::now();
    for i in 0..sent {
        flooder.signal(b.id, offer(&format!("v=0 flood {i}"))).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut flooder = flooder.peer;
    for _ in 0..3 {
        expect_error(&mut flooder, ErrorCode::TooLarge).await;
    }
    assert_eq!(next_control(&mut flooder).await, None, "the flooder is closed");
    // Relays keep their order through the coordinator: count the flood up to a marker.
    a.signal(b.id, offer("v=0 marker")).await;
    let mut relayed = 0;
    loop {
        match b.next().await {
            Some(CoordinatorMessage::Signal { payload, .. }) if payload == offer("v=0 marker") => break,
            Some(CoordinatorMessage::Signal { .. }) => relayed += 1,
            other => panic!("expected relayed signals, got {other:?}"),
        }
    }
    let refilled = (elapsed * RELAY_PER_SECOND).ceil() as usize;
    assert!(
        relayed >= RELAY_BURST && relayed <= RELAY_BURST + refilled,
        "{relayed} of {sent} signals relayed in {elapsed:.3} s"
    );
}

/// Opens `/ws` by hand: the socket if the coordinator switched protocols, else the status.
async fn upgrade(addr: SocketAddr) -> Result<TcpStream, u16> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    if status == 101 { Ok(stream) } else { Err(status) }
}

/// Heartbeats and answers every unit until told to stop; returns the accepted verdicts.
async fn work(mut raw: Raw, mut stop: oneshot::Receiver<()>) -> usize {
    let mut beat = tokio::time::interval(Duration::from_millis(HEARTBEAT_MS));
    let mut accepted = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return accepted,
            _ = beat.tick() => raw.send(&ContributorMessage::Heartbeat).await,
            event = raw.peer.recv() => match event {
                Some(PeerEvent::Message(Message::Text(text))) => {
                    match decode_control(text.as_bytes(), usize::MAX).expect("a coordinator message") {
                        CoordinatorMessage::Assign { unit, work, .. } => raw.answer(unit, &work, false).await,
                        CoordinatorMessage::Verdict { accepted: true, .. } => accepted += 1,
                        other @ (CoordinatorMessage::Verdict { .. } | CoordinatorMessage::Error { .. }) => {
                            panic!("the working contributor was refused: {other:?}")
                        }
                        _ => {}
                    }
                }
                Some(PeerEvent::Closed(reason)) => panic!("the working contributor was closed: {reason}"),
                None => panic!("the working contributor's channel ended"),
                Some(_) => {}
            },
        }
    }
}

/// Hundreds of signalling sessions held open, hundreds of offers that never connect, and
/// DataChannels that never say hello, while a contributor heartbeats and computes: each
/// excess is refused or closed by name, and the contributor's units go through throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_leaves_a_working_contributor_working() {
    let coordinator = start(1).await;
    let addr = coordinator.addr;
    let (stop, stopped) = oneshot::channel();
    let worker = tokio::spawn(work(Raw::join(addr).await, stopped));
    let texts = ["hello world", "again"];
    let started = Instant::now();

    // Sessions that upgrade and say nothing hold their place: the excess gets 503.
    let held = tessera_rtc::signal::MAX_SESSIONS + 44;
    let attempts = futures::future::join_all((0..held).map(|_| upgrade(addr))).await;
    let refused: Vec<u16> = attempts.iter().filter_map(|a| a.as_ref().err().copied()).collect();
    assert_eq!(refused, vec![503; 44]);
    // During the flood a request goes through the working contributor.
    assert_eq!(embed(addr, &texts).await.len(), 2);
    drop(attempts);

    // Offers that are answered but never connect, many at once: each gets an answer or a
    // refusal (503 while the held sessions are still closing, or the endpoint's own limits).
    let offers = 300;
    let url = format!("ws://{addr}/ws");
    let ghost = tessera_rtc::connect(
        "127.0.0.1:0".parse().unwrap(),
        tessera_rtc::Config::default(),
        |offer| async move { Err::<String, _>(offer) },
    )
    .await;
    let Err(tessera_rtc::RtcError::Signalling(offer)) = ghost else {
        panic!("expected the offer back from the signalling function");
    };
    let replies = futures::future::join_all(
        (0..offers).map(|_| tessera_rtc::signal::offer_over_websocket(&url, offer.clone())),
    )
    .await;
    for reply in &replies {
        if let Err(e) = reply {
            let shown = e.to_string();
            assert!(
                shown.contains("503") || shown.contains("refused the offer"),
                "an offer was neither answered nor refused: {shown}"
            );
        }
    }
    assert_eq!(embed(addr, &texts).await.len(), 2);

    // DataChannels that open and never say hello are closed, by name, and give back their
    // places among the endpoint's peers.
    let silent = futures::future::join_all((0..16).map(|_| channel(addr))).await;
    assert_eq!(embed(addr, &texts).await.len(), 2);
    for mut peer in silent {
        let message = expect_error(&mut peer, ErrorCode::NotJoined).await;
        assert_eq!(message, "no hello within 5 s of the channel opening");
        assert_eq!(next_control(&mut peer).await, None);
    }

    assert_eq!(metric(addr, "tessera_contributors_lost_total").await, 0);
    assert_eq!(metric(addr, "tessera_contributors_connected").await, 1);
    let _ = stop.send(());
    let accepted = worker.await.expect("the working contributor");
    assert_eq!(accepted, 3, "one unit a request, each accepted");
    let answered = replies.iter().filter(|r| r.is_ok()).count();
    println!(
        "flood: {held} sessions ({} refused with 503), {offers} offers ({answered} answered), \
         16 silent channels, in {:.1} s",
        refused.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Sends `head` and then `body_len` bytes of body without waiting for the server to read them
/// (it may answer and close first), and returns the status and body of its answer.
async fn http_oversized(addr: SocketAddr, path: &str, body_len: usize) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.expect("connect over HTTP");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n");
    let writing = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&vec![b' '; body_len]).await
    });
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, reader.read_to_end(&mut raw)).await.expect("the response comes in time").expect("read the response");
    // The server may close before reading it all: a failed write is expected then.
    let _ = writing.await;
    let text = String::from_utf8(raw).expect("a text response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line"), body.to_string())
}

/// Bodies over a route's limit and bodies that are not JSON get OpenAI-shaped errors, and the
/// coordinator goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_bodies_get_openai_errors_and_the_server_keeps_serving() {
    let coordinator = start(1).await;
    let addr = coordinator.addr;
    for (path, len) in [("/v1/embeddings", 17 << 20), ("/v1/chat/completions", 3 << 20)] {
        let (status, body) = http_oversized(addr, path, len).await;
        assert_eq!(status, 413, "{path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(error["error"]["type"], "invalid_request_error", "{path}: {body}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("could not be read") && m.contains("at most")), "{path}: {body}");
    }
    let (status, body) = http(addr, "POST", "/v1/embeddings", "{\"model\": ").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a JSON object of the expected shape"), "{body}");
    let (status, _) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "the coordinator still serves");
}

/// Before any generation request, `/api/swarm` lists the connected contributors with what they
/// reported, and no model (none is configured here), no plan and no requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_lists_contributors_and_no_plan_before_any_request() {
    let coordinator = start(1).await;
    let addr = coordinator.addr;
    let first = Raw::join(addr).await;
    let second = Raw::join(addr).await;
    let (status, body) = http(addr, "GET", "/api/swarm", "").await;
    assert_eq!(status, 200, "{body}");
    let swarm: Value = serde_json::from_str(&body).expect("a JSON body");
    let ids: Vec<u64> = swarm["contributors"].as_array().expect("contributors").iter().map(|c| c["id"].as_u64().expect("an id")).collect();
    assert_eq!(ids, vec![first.id.0, second.id.0], "{swarm:#}");
    let expected = caps(1);
    let contributor = &swarm["contributors"][0];
    assert_eq!(contributor["adapter"], expected.adapter.as_str());
    assert_eq!(contributor["backend"], "webgpu");
    assert_eq!(contributor["kind"], "browser");
    assert_eq!(contributor["memory_budget_bytes"], expected.memory_budget_bytes);
    assert_eq!(contributor["holds"], Value::Null);
    assert_eq!(swarm["model"], Value::Null, "{swarm:#}");
    assert_eq!(swarm["plan"], Value::Null, "{swarm:#}");
    assert_eq!(swarm["requests"], json!([]), "{swarm:#}");
    assert_eq!(swarm["rate"]["tokens_total"], 0, "{swarm:#}");
    assert_eq!(swarm["rate"]["tokens_per_second"], 0.0, "{swarm:#}");
}
