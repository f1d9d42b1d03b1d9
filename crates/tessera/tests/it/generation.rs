//! Generation split across contributors, end to end: `tessera serve` and three `tessera
//! contribute` processes whose memory budgets let each hold about half the model, so the
//! placement splits SmolLM2's 30 blocks into three spans of ten. A chat completion at
//! temperature 0, whole and streamed, through the official OpenAI client, gives exactly the
//! text of `tessera run --chat` on this machine, the hops going straight from one contributor to
//! the next; then a fourth contributor stands by for a span, that span's holder is killed
//! mid-stream, and the stream still completes with the same text (the standby takes over, the
//! sessions replay; its shard came from the holder, not the coordinator). Bad requests get
//! OpenAI-shaped 4xx errors and the coordinator keeps serving. A contributor that lends a
//! corrupted shard is caught by its borrower's CID check and lends no more.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{BIN, DEADLINE, Proc, contribute, get_json, heavy, http, http_stream, serve, wait_until};

const PROMPT: &str = "Write a short poem about the sea.";
const MAX_TOKENS: usize = 16;
/// Each contributor lets the coordinator use this much, in MiB: with the coordinator's
/// reservation of KV cache for its sessions, 15 blocks (of 30). The last digit tells the
/// processes apart in `/api/contributors`.
const BUDGETS_MIB: [u64; 3] = [420, 421, 422];
/// The fourth contributor's, which joins as a standby.
const SPARE_MIB: u64 = 423;
/// `serve --stage-floor-ms` and `--stage-deadline-ms` for the swarm of three: a holder is late
/// only after 10 s at least (2 minutes before its time for a step is measured), not after the
/// default 1 s, which a busy machine's pauses reach. A late hop is not a harmless delay here: it
/// moves spans, and it counts as a drop, so the coordinator names that holder to lend its shard
/// to nobody for ten minutes (`serving.rs`: `lenders`). A killed holder is still noticed in
/// about 10 s, by its missed deadline or by its missing heartbeats.
const STAGE_FLOOR_MS: &str = "10000";
const STAGE_DEADLINE_MS: &str = "120000";

/// `tessera run --chat` on this machine: the text greedy decoding gives.
fn reference() -> String {
    let out = Command::new(BIN)
        .args(["run", "--model", "smollm2", "--chat", "--json", "--prompt", PROMPT, "--max-tokens", &MAX_TOKENS.to_string()])
        .output()
        .expect("run tessera run");
    assert!(out.status.success(), "tessera run failed: {}", String::from_utf8_lossy(&out.stderr));
    let value: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    value["text"].as_str().expect("a text").to_string()
}

fn chat(max_tokens: usize, stream: bool) -> Value {
    let mut body = json!({ "model": "smollm2", "messages": [{ "role": "user", "content": PROMPT }], "temperature": 0, "max_tokens": max_tokens });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<(String, String)>, Value) {
    let (status, headers, body) = http(addr, "POST", path, Some(body));
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("POST {path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, headers, value)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// `0-10=3,10-20=5`: checks the spans cover blocks 0..30 with each span's holder named; returns
/// (blocks, contributor) per span.
fn spans(value: &str) -> Vec<(u32, u32, u64)> {
    let mut spans: Vec<(u32, u32, u64)> = value
        .split(',')
        .map(|span| {
            let (blocks, holder) = span.split_once('=').expect("blocks=holder");
            let (a, b) = blocks.split_once('-').expect("start-end");
            (a.parse().expect("a block"), b.parse().expect("a block"), holder.parse().expect("a contributor id"))
        })
        .collect();
    spans.sort_unstable();
    assert_eq!(spans.first().map(|s| s.0), Some(0), "{value}");
    assert_eq!(spans.last().map(|s| s.1), Some(30), "{value}");
    spans
}

/// The text of a stream of chat chunks; checks it ends with `[DONE]` after a usage chunk.
fn streamed_text(body: &[u8]) -> (String, Value) {
    let text = String::from_utf8(body.to_vec()).expect("UTF-8 events");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").expect("data events")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("a JSON chunk")).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "an error in the stream: {text}");
    let content: String = chunks.iter().flat_map(|c| c["choices"].as_array().into_iter().flatten()).filter_map(|c| c["delta"]["content"].as_str()).collect();
    let usage = chunks.last().expect("a usage chunk")["usage"].clone();
    (content, usage)
}

/// The official client, when the npm packages are installed (`npm ci`); `None` when they are
/// not and this is not CI, which must have them.
fn openai_client(addr: SocketAddr) -> Option<Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !root.join("node_modules/openai").is_dir() {
        assert!(std::env::var_os("CI").is_none(), "node_modules/openai is missing: run `npm ci`");
        println!("node_modules/openai is missing (run `npm ci`): the OpenAI client part is skipped");
        return None;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/openai_chat.mjs");
    let out = Command::new("node").arg(script).args([&format!("http://{addr}"), "smollm2", PROMPT, &MAX_TOKENS.to_string()]).output().expect("run node");
    assert!(out.status.success(), "the OpenAI client failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).expect("one JSON line"))
}

#[test]
fn chat_completions_across_three_contributors() {
    let _heavy = heavy();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let cache = dir.path().join("contributor-cache");
    let (_server, addr) = serve(&dir.path().join("data"), &["--stage-floor-ms", STAGE_FLOOR_MS, "--stage-deadline-ms", STAGE_DEADLINE_MS]);

    // No contributor: a 503 in OpenAI's shape, naming the model.
    let (status, _, error) = post(addr, "/v1/chat/completions", chat(4, false).to_string().as_bytes());
    assert_eq!(status, 503, "{error}");
    assert!(error["error"]["message"].as_str().expect("a message").contains("smollm2"), "{error}");

    let models = get_json(addr, "/v1/models");
    assert!(models["data"].as_array().expect("models").iter().any(|m| m["id"] == "smollm2"), "{models}");

    // Pinned scores: placement follows the memory budgets alone (three spans of ten blocks),
    // however busy the machine is while each measures itself.
    let mut contributors: Vec<(u64, Proc)> =
        BUDGETS_MIB.iter().map(|&mib| (mib, contribute(addr, &cache, &["--memory-budget-mib", &mib.to_string(), "--score", "1"]))).collect();
    let expected = reference();
    println!("reference: {expected:?} at {:?}", started.elapsed());
    wait_until("three contributors", DEADLINE, || crate::contributor_ids(addr).len() == 3);

    // Bad requests: 4xx, and the coordinator goes on. (The model loads in the background; a
    // check of the context needs it.)
    let too_long = chat(10_000_000, false).to_string();
    wait_until("the model to load", DEADLINE, || post(addr, "/v1/chat/completions", too_long.as_bytes()).0 != 503);
    let long_prompt = json!({ "model": "smollm2", "prompt": "sea ".repeat(9000), "max_tokens": 1 }).to_string();
    let cases: [(&str, &[u8], u16, &str); 5] = [
        ("/v1/chat/completions", b"{\"model\": ", 400, "not a JSON object"),
        ("/v1/chat/completions", br#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#, 404, "gpt-9"),
        ("/v1/chat/completions", too_long.as_bytes(), 400, "max_tokens is too large"),
        ("/v1/completions", long_prompt.as_bytes(), 400, "maximum context length"),
        ("/v1/chat/completions", br#"{"model":"smollm2","messages":[]}"#, 400, "messages"),
    ];
    for (path, body, code, says) in cases {
        let (status, _, error) = post(addr, path, body);
        assert_eq!(status, code, "{error}");
        assert!(error["error"]["message"].as_str().expect("a message").contains(says), "{error}");
    }

    // 1. Whole, then streamed: the text of the local run, through three spans.
    let t = Instant::now();
    let (status, headers, response) = post(addr, "/v1/chat/completions", chat(MAX_TOKENS, false).to_string().as_bytes());
    assert_eq!(status, 200, "{response}");
    let first = Duration::from_secs_f64(t.elapsed().as_secs_f64());
    assert_eq!(response["choices"][0]["message"]["content"], expected.as_str(), "{response}");
    let served = spans(header(&headers, "x-tessera-spans"));
    assert_eq!(served.len(), 3, "three spans: {served:?}");
    let request = header(&headers, "x-tessera-request").to_string();
    let record = get_json(addr, &format!("/api/requests/{request}"));
    assert_eq!(record["state"], "done", "{record}");
    assert_eq!(record["spans"].as_array().map(Vec::len), Some(3), "{record}");
    println!("whole: {:?} spans {served:?} in {first:?}", response["usage"]);

    let t = Instant::now();
    let body = http_stream(addr, "/v1/chat/completions", chat(MAX_TOKENS, true).to_string().as_bytes(), |status, _| assert_eq!(status, 200), |_| {});
    let (text, usage) = streamed_text(&body);
    assert_eq!(text, expected);
    assert_eq!(usage["completion_tokens"], response["usage"]["completion_tokens"], "{usage}");
    let completion_tokens = usage["completion_tokens"].as_u64().expect("a count");
    let elapsed = t.elapsed().as_secs_f64();
    println!("streamed: {completion_tokens} tokens in {elapsed:.1} s ({:.2} tokens/s with the prompt)", completion_tokens as f64 / elapsed);

    // The states went from stage to stage over direct channels: the two pairs of consecutive
    // holders are linked, and hops passed straight on.
    let swarm = get_json(addr, "/api/swarm");
    assert_eq!(swarm["links"].as_array().map(Vec::len), Some(2), "{swarm}");
    assert!(swarm["hops"]["direct"].as_u64() > Some(0), "no hop went directly: {}", swarm["hops"]);
    println!("hops: {}", swarm["hops"]);

    // 2. The official client, whole and streamed.
    if let Some(out) = openai_client(addr) {
        assert_eq!(out["whole"]["text"], expected.as_str(), "{out}");
        assert_eq!(out["stream"]["text"], expected.as_str(), "{out}");
        assert_eq!(out["stream"]["usage"]["completion_tokens"], completion_tokens, "{out}");
        assert_eq!(out["unknown"]["status"], 404, "{out}");
        assert_eq!(out["unknown"]["code"], "model_not_found", "{out}");
        spans(out["whole"]["spans"].as_str().expect("the spans header"));
        println!("the OpenAI client agrees");
    }

    // 3. A fourth contributor joins and stands by for a span, loaded and hot (it runs that
    // span's steps too); the span's holder is killed mid-stream: the standby takes over, and the
    // stream completes with the same text.
    // Its score is a quarter of the others': a fresh plan with it would not be worth moving to
    // (`Policy::replan_gain`), so it joins the plan as a standby even though no session runs.
    // It has a cache of its own, so its shard comes from the span's holder, which the
    // coordinator names to lend it (`Lend`), checked against the CID as from the coordinator.
    let spare_cache = dir.path().join("spare-cache");
    contributors.push((SPARE_MIB, contribute(addr, &spare_cache, &["--memory-budget-mib", &SPARE_MIB.to_string(), "--score", "0.25"])));
    let mut standing_by = None;
    wait_until("the fourth contributor to stand by, its span loaded", DEADLINE, || {
        let swarm = get_json(addr, "/api/swarm");
        let spans = swarm["plan"]["spans"].as_array().cloned().unwrap_or_default();
        standing_by = spans.iter().find(|s| s["standby_ready"] == true).map(|s| (s["holder"].as_u64().expect("a holder"), s["standby"][0].as_u64().expect("a standby")));
        standing_by.is_some()
    });
    let (victim, standby) = standing_by.expect("a standby");
    let shards = get_json(addr, "/api/swarm")["shards_loaded"].clone();
    assert!(shards["from_peers"].as_u64() >= Some(1), "the standby's shard came from the coordinator, not the holder: {shards}");
    println!("shards loaded: {shards}");
    let holders: Vec<(u64, u64)> = get_json(addr, "/api/contributors")["contributors"]
        .as_array()
        .expect("contributors")
        .iter()
        .map(|c| (c["id"].as_u64().expect("an id"), c["memory_budget_bytes"].as_u64().expect("a budget") >> 20))
        .collect();
    let victim_budget = holders.iter().find(|(id, _)| *id == victim).map(|(_, mib)| *mib).expect("the victim is connected");
    let (pieces, heard) = mpsc::channel::<usize>();
    let t = Instant::now();
    let streaming = std::thread::spawn(move || {
        let mut request = String::new();
        let body = http_stream(
            addr,
            "/v1/chat/completions",
            chat(MAX_TOKENS, true).to_string().as_bytes(),
            |status, headers| {
                assert_eq!(status, 200);
                request = header(headers, "x-tessera-request").to_string();
            },
            |piece| {
                let _ = pieces.send(piece.len());
            },
        );
        (request, body)
    });
    // The role chunk and two pieces of text: the stream is under way.
    for _ in 0..3 {
        heard.recv_timeout(DEADLINE).expect("the stream goes on");
    }
    let at = contributors.iter().position(|(mib, _)| *mib == victim_budget).expect("the victim's process");
    let (_, mut killed) = contributors.remove(at);
    killed.0.kill().expect("SIGKILL a contributor");
    println!("killed contributor {victim} after {:?}", t.elapsed());
    let (request, body) = streaming.join().expect("the streaming thread");
    let (text, _) = streamed_text(&body);
    assert_eq!(text, expected, "the stream after the kill");
    let record = get_json(addr, &format!("/api/requests/{request}"));
    assert!(record["replans"].as_u64() >= Some(1), "{record}");
    let served_by: Vec<u64> = record["spans"].as_array().expect("spans").iter().map(|s| s["contributor"].as_u64().expect("an id")).collect();
    assert!(served_by.contains(&standby), "the standby {standby} took over: {record}");
    println!("failover: {:?} in {:?} ({})", record["x_tessera_spans"], t.elapsed(), record);
    drop(killed);
    println!("total {:?}", started.elapsed());
}

/// A lender that sends a corrupted shard is caught: the borrower checks the bytes against the
/// CID, keeps none of them, loads the shard from the coordinator instead and reports the lender,
/// which the coordinator names as a lender no more.
#[test]
fn a_lender_of_a_corrupted_shard_is_caught() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().expect("a temporary folder");
    // No step may be late, however slow: a late one would count as a drop against the liar, and
    // the coordinator names no holder that dropped a span lately as a lender (`serving.rs`:
    // `lenders`), so the honest contributor would never borrow from it. With one holder, no
    // deadline has anything to recover.
    let patience = DEADLINE.as_millis().to_string();
    let (_server, addr) = serve(&dir.path().join("data"), &["--stage-floor-ms", &patience, "--stage-deadline-ms", &patience]);
    // The whole model on one dishonest contributor: `--perturb` corrupts every shard it lends.
    let _liar = contribute(addr, &dir.path().join("liar-cache"), &["--memory-budget-mib", "1000", "--score", "1", "--perturb"]);
    wait_until("the contributor", DEADLINE, || crate::contributor_ids(addr).len() == 1);
    let request = chat(2, false).to_string();
    wait_until("the model placed and answering", DEADLINE, || post(addr, "/v1/chat/completions", request.as_bytes()).0 == 200);
    // An honest contributor with a cache of its own stands by for the span: its `LoadSpan`
    // names the liar as the lender.
    let _honest = contribute(addr, &dir.path().join("honest-cache"), &["--memory-budget-mib", "1001", "--score", "0.25"]);
    wait_until("the standby's span loaded", DEADLINE, || get_json(addr, "/api/swarm")["plan"]["spans"][0]["standby_ready"] == true);
    let swarm = get_json(addr, "/api/swarm");
    assert_eq!(swarm["shards_loaded"], json!({ "from_peers": 0, "from_coordinator": 2, "corrupt_lends": 1 }), "{swarm}");
}
