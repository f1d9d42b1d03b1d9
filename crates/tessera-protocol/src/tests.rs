//! Tests of `decode`: control messages round-trip, bad ones get precise errors, and no input
//! (random or mutated) makes it panic.

use super::*;

fn caps() -> Capabilities {
    Capabilities {
        adapter: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
        backend: "vulkan".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: 128 << 20,
            max_buffer_size: 256 << 20,
            max_compute_workgroup_storage_size: 16384,
            max_compute_invocations_per_workgroup: 256,
        },
        memory_budget_bytes: 1 << 30,
        benchmark_score: 12.5,
        max_concurrent_units: 2,
        lends_blobs: true,
    }
}

fn forward(then: Vec<NextHop>) -> Forward {
    Forward {
        shard: "bafkreishard".into(),
        session: 7,
        step: 12,
        start: 37,
        capacity: 64,
        payload: PayloadRef { stream: 2, bytes: 2320 },
        then,
        shadow: false,
    }
}

fn contributor_messages() -> Vec<ContributorMessage> {
    vec![
        ContributorMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            capabilities: caps(),
        },
        ContributorMessage::Heartbeat,
        ContributorMessage::Leave,
        ContributorMessage::UnitResult {
            unit: UnitId(9),
            payload: PayloadRef {
                stream: 3,
                bytes: 1536,
            },
        },
        ContributorMessage::BlobRequest {
            cid: "bafkreiabc".into(),
            offset: 0,
            length: 4096,
            stream: 4,
        },
        ContributorMessage::BlobHave {
            cids: vec!["bafkreiabc".into()],
        },
        ContributorMessage::Signal {
            from: ContributorId(1),
            to: ContributorId(2),
            payload: SignalPayload::Candidate {
                candidate: "candidate:1 1 UDP 1 127.0.0.1 5000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
            },
        },
        ContributorMessage::SpanReady {
            shard: "bafkreishard".into(),
            fetched_from: Some(ContributorId(4)),
        },
        ContributorMessage::Forwarded {
            session: 7,
            step: 12,
            payload: PayloadRef {
                stream: 5,
                bytes: 2320,
            },
            ms: 0.0,
        },
        ContributorMessage::Passed {
            session: 7,
            step: 12,
            to: ContributorId(3),
            ms: 4.5,
        },
        ContributorMessage::BorrowFailed {
            lender: ContributorId(2),
            cid: "bafkreishard".into(),
            corrupt: true,
            message: "content does not match its CID".into(),
        },
        ContributorMessage::Error {
            code: ErrorCode::SpanFailed,
            message: "bad".into(),
        },
    ]
}

fn coordinator_messages() -> Vec<CoordinatorMessage> {
    vec![
        CoordinatorMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            contributor: ContributorId(5),
            heartbeat_interval_ms: 5000,
        },
        CoordinatorMessage::Assign {
            job: JobId(1),
            unit: UnitId(2),
            deadline_ms: 30_000,
            work: Work::Embedding {
                model: "bafkreimodel".into(),
                inputs: vec![vec![101, 2023, 102], vec![101, 102]],
            },
        },
        CoordinatorMessage::Cancel { unit: UnitId(2) },
        CoordinatorMessage::Verdict { unit: UnitId(2), accepted: false },
        CoordinatorMessage::BlobRequest {
            cid: "bafkreiabc".into(),
            offset: 10,
            length: 20,
            stream: 1,
        },
        CoordinatorMessage::BlobHave { cids: vec![] },
        CoordinatorMessage::Signal {
            from: ContributorId(1),
            to: ContributorId(2),
            payload: SignalPayload::Offer { sdp: "v=0".into(), purpose: ChannelPurpose::Blobs },
        },
        CoordinatorMessage::LoadSpan {
            model: "smollm2".into(),
            shard: "bafkreishard".into(),
            blocks: Blocks { start: 10, end: 20 },
            max_sessions: 8,
            peers: vec![ContributorId(2), ContributorId(4)],
        },
        CoordinatorMessage::Forward(forward(vec![NextHop {
            contributor: ContributorId(3),
            shard: "bafkreinext".into(),
            standbys: vec![Standby { contributor: ContributorId(4), shard: "bafkreinext".into() }],
        }])),
        CoordinatorMessage::EndSession { session: 7 },
        CoordinatorMessage::UnloadSpan { shard: "bafkreia".into() },
        CoordinatorMessage::Prefetch {
            blobs: vec!["bafkreia".into(), "bafkreib".into()],
            lenders: [("bafkreib".to_string(), vec![ContributorId(2)])].into(),
        },
        CoordinatorMessage::Link { peer: ContributorId(3), offer: true },
        CoordinatorMessage::Unlink { peer: ContributorId(3) },
        CoordinatorMessage::Lend { peer: ContributorId(6), blobs: vec!["bafkreishard".into()] },
        CoordinatorMessage::Error {
            code: ErrorCode::UnsupportedVersion,
            message: "x".into(),
        },
    ]
}

#[test]
fn control_messages_round_trip() {
    for m in contributor_messages() {
        let text = encode_control(&m);
        match decode::<ContributorMessage>(Incoming::Text(&text)).unwrap() {
            Decoded::Control(back) => assert_eq!(back, m, "{text}"),
            Decoded::Chunk(_) => panic!("text decoded as a chunk"),
        }
    }
    for m in coordinator_messages() {
        let text = encode_control(&m);
        assert_eq!(
            decode::<CoordinatorMessage>(Incoming::Text(&text)).unwrap(),
            Decoded::Control(m)
        );
    }
    // Every variant's tag is listed in TYPES, so errors name them all.
    let tags: Vec<String> = contributor_messages()
        .iter()
        .map(|m| {
            serde_json::to_value(m).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tags, ContributorMessage::TYPES);
    let tags: Vec<String> = coordinator_messages()
        .iter()
        .map(|m| {
            serde_json::to_value(m).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tags, CoordinatorMessage::TYPES);
}

#[test]
fn wire_shape_is_stable() {
    let text = encode_control(&ContributorMessage::UnitResult {
        unit: UnitId(9),
        payload: PayloadRef {
            stream: 3,
            bytes: 1536,
        },
    });
    assert_eq!(
        text,
        r#"{"type":"unit_result","unit":9,"payload":{"stream":3,"bytes":1536}}"#
    );
    // A `Forward` with no further hops reads as version 3's did.
    let text = encode_control(&CoordinatorMessage::Forward(forward(vec![])));
    assert_eq!(
        text,
        r#"{"type":"forward","shard":"bafkreishard","session":7,"step":12,"start":37,"capacity":64,"payload":{"stream":2,"bytes":2320}}"#
    );
    let then = vec![NextHop { contributor: ContributorId(3), shard: "bafkreinext".into(), standbys: vec![] }];
    let text = encode_control(&PeerMessage::Forward(forward(then.clone())));
    assert_eq!(
        text,
        r#"{"type":"forward","shard":"bafkreishard","session":7,"step":12,"start":37,"capacity":64,"payload":{"stream":2,"bytes":2320},"then":[{"contributor":3,"shard":"bafkreinext"}]}"#
    );
    assert_eq!(decode_control::<PeerMessage>(text.as_bytes(), 1024).unwrap(), PeerMessage::Forward(forward(then)));
    // A standby's shadow copy says so; an ordinary step leaves the flag out.
    let shadow = PeerMessage::Forward(Forward { shadow: true, ..forward(vec![]) });
    let text = encode_control(&shadow);
    assert!(text.ends_with(r#""payload":{"stream":2,"bytes":2320},"shadow":true}"#), "{text}");
    assert_eq!(decode_control::<PeerMessage>(text.as_bytes(), 1024).unwrap(), shadow);
    // A lending peer is asked for blob ranges, and refuses by code.
    for message in [
        PeerMessage::BlobRequest { cid: "bafkreishard".into(), offset: 0, length: 0, stream: 1 },
        PeerMessage::Error { code: ErrorCode::BlobNotFound, message: "not lent".into() },
    ] {
        assert_eq!(decode_control::<PeerMessage>(encode_control(&message).as_bytes(), 1024).unwrap(), message);
    }
    // A peer never speaks for the coordinator: its messages from a peer are refused by name.
    let err = decode_control::<PeerMessage>(br#"{"type":"load_span"}"#, 1024).unwrap_err();
    assert!(err.to_string().contains("load_span"), "{err}");
    // A `LoadSpan` with no peers to fetch from, and an offer for `Forward`s, read as version 4's.
    let offer = SignalPayload::Offer { sdp: "v=0".into(), purpose: ChannelPurpose::Forwards };
    assert_eq!(serde_json::to_string(&offer).unwrap(), r#"{"kind":"offer","sdp":"v=0"}"#);
    let text = encode_control(&CoordinatorMessage::LoadSpan {
        model: "smollm2".into(),
        shard: "bafkreishard".into(),
        blocks: Blocks { start: 10, end: 20 },
        max_sessions: 8,
        peers: vec![],
    });
    assert_eq!(
        text,
        r#"{"type":"load_span","model":"smollm2","shard":"bafkreishard","blocks":{"start":10,"end":20},"max_sessions":8}"#
    );
    let unknown_code = r#"{"type":"error","code":"from_the_future","message":"m"}"#;
    assert_eq!(
        decode_control::<CoordinatorMessage>(unknown_code.as_bytes(), 1024).unwrap(),
        CoordinatorMessage::Error {
            code: ErrorCode::Unknown,
            message: "m".into()
        }
    );
}

fn check(text: &str, expected: &str) {
    let err = decode::<ContributorMessage>(Incoming::Text(text)).unwrap_err();
    assert_eq!(
        err.to_string(),
        expected,
        "for {}",
        &text[..text.len().min(120)]
    );
}

#[test]
fn bad_control_messages_say_what_is_wrong() {
    check(
        "{\"type\": \"heartbeat\"",
        "malformed control message: EOF while parsing an object at line 1 column 20",
    );
    check(
        "[1, 2]",
        "malformed control message: expected a JSON object",
    );
    check("", "malformed control message: expected a JSON object");
    check("{}", "control message has no \"type\" field");
    check(
        "{\"type\": 3}",
        "malformed control message: \"type\" must be a string, got 3",
    );
    check(
        "{\"type\": \"welcome\"}",
        "unknown message type \"welcome\"; expected one of [\"hello\", \"heartbeat\", \"leave\", \"unit_result\", \"blob_request\", \"blob_have\", \"signal\", \"span_ready\", \"forwarded\", \"passed\", \"borrow_failed\", \"error\"]",
    );
    check(
        "{\"type\": \"forward\"}",
        "unknown message type \"forward\"; expected one of [\"hello\", \"heartbeat\", \"leave\", \"unit_result\", \"blob_request\", \"blob_have\", \"signal\", \"span_ready\", \"forwarded\", \"passed\", \"borrow_failed\", \"error\"]",
    );
    check(
        "{\"type\": \"hello\", \"protocol_version\": 1, \"capabilities\": {\"shape\": \"of the past\"}}",
        "protocol version 1 is not supported: this peer speaks version 5",
    );
    check(
        "{\"type\": \"hello\", \"protocol_version\": \"3\"}",
        "protocol version \"3\" is not supported: this peer speaks version 5",
    );
    check(
        "{\"type\": \"hello\", \"protocol_version\": 5}",
        "invalid \"hello\" message: missing field `capabilities`",
    );
    check(
        "{\"type\": \"unit_result\", \"unit\": -1, \"payload\": {\"stream\": 1, \"bytes\": 2}}",
        "invalid \"unit_result\" message: invalid value: integer `-1`, expected u64",
    );
    check(
        "{\"type\": \"forwarded\", \"session\": 1, \"step\": 2}",
        "invalid \"forwarded\" message: missing field `payload`",
    );
    check(
        "{\"type\": \"forwarded\", \"session\": 1, \"step\": -2, \"payload\": {\"stream\": 1, \"bytes\": 2}}",
        "invalid \"forwarded\" message: invalid value: integer `-2`, expected u64",
    );
    check(
        "{\"type\": \"span_ready\", \"shard\": 5}",
        "invalid \"span_ready\" message: invalid type: integer `5`, expected a string",
    );
    let load = |blocks: &str| {
        let text = format!("{{\"type\":\"load_span\",\"model\":\"m\",\"shard\":\"b\",\"blocks\":{blocks},\"max_sessions\":1}}");
        decode_control::<CoordinatorMessage>(text.as_bytes(), MAX_TEXT_MESSAGE).map_err(|e| e.to_string())
    };
    assert!(load(r#"{"start":0,"end":10}"#).is_ok());
    assert_eq!(
        load(r#"{"start":0,"end":4294967296}"#).unwrap_err(),
        "invalid \"load_span\" message: invalid value: integer `4294967296`, expected u32"
    );
    assert_eq!(
        load("[0,10,20]").unwrap_err(),
        "invalid \"load_span\" message: invalid length 3, expected 2 elements in sequence"
    );
    let long = format!(
        "{{\"type\": \"blob_have\", \"cids\": [\"{}\"]}}",
        "a".repeat(MAX_TEXT_MESSAGE)
    );
    check(
        &long,
        "control message of 65571 bytes exceeds the limit of 65536 bytes",
    );
}

#[test]
fn large_control_messages_travel_as_chunks() {
    let inputs = vec![vec![7u32; 512]; 64];
    let m = CoordinatorMessage::Assign {
        job: JobId(1),
        unit: UnitId(1),
        deadline_ms: 1000,
        work: Work::Embedding {
            model: "m".into(),
            inputs,
        },
    };
    let json = encode_control(&m);
    assert!(json.len() > MAX_TEXT_MESSAGE);
    let mut r = Reassembler::default();
    let mut out = None;
    for frame in Chunker::new(11, PayloadKind::Control, json.as_bytes()).unwrap() {
        let Decoded::Chunk(chunk) = decode::<CoordinatorMessage>(Incoming::Binary(&frame)).unwrap()
        else {
            panic!("binary decoded as control");
        };
        out = r.push(chunk).unwrap();
    }
    let payload = out.unwrap();
    assert_eq!(payload.kind, PayloadKind::Control);
    assert_eq!(
        decode_control::<CoordinatorMessage>(&payload.bytes, 1 << 20).unwrap(),
        m
    );
}

/// SplitMix64: a small deterministic generator, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            1 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            2 => bytes.truncate(rng.below(bytes.len() + 1)),
            3 => {
                let i = rng.below(bytes.len() + 1);
                let b = [b'"', b'{', b'}', b'[', b']', b',', b':', b'0', b'-', 0xff][rng.below(10)];
                bytes.insert(i, b);
            }
            _ => {
                // Overwrite a header field with an extreme value.
                if bytes.len() >= HEADER_LEN {
                    let at = [16, 20, 24][rng.below(3)];
                    let v = [0u8, 0xff][rng.below(2)];
                    bytes[at..at + 4].fill(v);
                }
            }
        }
    }
    bytes
}

/// Feeds thousands of random and mutated inputs through `decode`, a `Reassembler` and
/// `Tensor::decode`. The assertion is that nothing panics, and that whatever is accepted
/// re-encodes consistently.
#[test]
fn decode_never_panics() {
    let mut rng = Rng(0x7e55_e7a0);
    let mut seeds: Vec<Vec<u8>> = contributor_messages()
        .iter()
        .map(|m| encode_control(m).into_bytes())
        .collect();
    let tensor = Tensor::from_f32(vec![3, 5], &[0.5; 15]).unwrap().encode();
    seeds.push(tensor.clone());
    let big: Vec<u8> = (0..MAX_CHUNK_PAYLOAD + 100).map(|i| i as u8).collect();
    seeds.extend(Chunker::new(1, PayloadKind::Tensor, &tensor).unwrap());
    seeds.extend(Chunker::new(2, PayloadKind::Blob, &big).unwrap());
    let limits = ReassemblyLimits {
        max_message_bytes: 1 << 20,
        max_partial_messages: 4,
        max_buffered_bytes: 2 << 20,
    };
    let mut reassembler = Reassembler::new(limits);
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..5000 {
        let input = if i % 5 == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, seed)
        };
        if let Ok(text) = std::str::from_utf8(&input) {
            match decode::<ContributorMessage>(Incoming::Text(text)) {
                Ok(Decoded::Control(m)) => {
                    accepted += 1;
                    let again = encode_control(&m);
                    assert_eq!(
                        decode_control::<ContributorMessage>(again.as_bytes(), usize::MAX).ok(),
                        Some(m)
                    );
                }
                Ok(Decoded::Chunk(_)) => unreachable!(),
                Err(_) => rejected += 1,
            }
        }
        match decode::<ContributorMessage>(Incoming::Binary(&input)) {
            Ok(Decoded::Chunk(chunk)) => {
                accepted += 1;
                if let Ok(Some(payload)) = reassembler.push(chunk)
                    && let Ok(t) = Tensor::decode(&payload.bytes, 1 << 20)
                {
                    assert_eq!(Tensor::decode(&t.encode(), 1 << 20).ok(), Some(t));
                }
                assert!(reassembler.buffered_bytes() <= limits.max_buffered_bytes);
                assert!(reassembler.partial_messages() <= limits.max_partial_messages);
            }
            Ok(Decoded::Control(_)) => unreachable!(),
            Err(_) => rejected += 1,
        }
        let _ = Tensor::decode(&input, 1 << 20);
    }
    // The corpus exercises both paths, or the test proves nothing.
    assert!(
        accepted > 200 && rejected > 2000,
        "accepted {accepted}, rejected {rejected}"
    );
}
