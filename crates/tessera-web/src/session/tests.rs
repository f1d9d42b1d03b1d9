//! The session machine driven by hand: messages in, outputs checked, time passed in.

#![allow(clippy::unwrap_used)]

use tessera_protocol::{AdapterLimits, Reassembler, SignalPayload, decode_control};

use super::*;

const BIG: usize = 256 << 10;

fn capabilities() -> Capabilities {
    Capabilities {
        adapter: "SwiftShader".into(),
        backend: "webgpu".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: 1 << 27,
            max_buffer_size: 1 << 28,
            max_compute_workgroup_storage_size: 16384,
            max_compute_invocations_per_workgroup: 256,
        },
        memory_budget_bytes: 1 << 28,
        benchmark_score: 3.5,
        max_concurrent_units: 1,
    }
}

fn drain(session: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| session.poll()).collect()
}

fn text(message: &CoordinatorMessage) -> String {
    encode_control(message)
}

fn handle(session: &mut Session, now: Millis, message: &CoordinatorMessage) -> Vec<Output> {
    session.handle(now, Incoming::Text(&text(message)));
    drain(session)
}

fn sent(output: &Output) -> ContributorMessage {
    match output {
        Output::Send(Outgoing::Text(text)) => decode_control(text.as_bytes(), usize::MAX).unwrap(),
        other => panic!("expected a control message, got {other:?}"),
    }
}

fn status(status: Status) -> Output {
    Output::Event(Event::Status { status, detail: None })
}

fn welcome(contributor: u64, heartbeat_interval_ms: u64) -> CoordinatorMessage {
    CoordinatorMessage::Welcome { protocol_version: PROTOCOL_VERSION, contributor: ContributorId(contributor), heartbeat_interval_ms }
}

fn assign(unit: u64, inputs: usize) -> CoordinatorMessage {
    let inputs = (0..inputs).map(|i| vec![101, 7 + i as u32, 102]).collect();
    CoordinatorMessage::Assign { job: JobId(9), unit: UnitId(unit), deadline_ms: 60_000, work: Work::Embedding { model: "bafkmodel".into(), inputs } }
}

fn run(unit: u64, inputs: usize) -> Output {
    let CoordinatorMessage::Assign { job, unit, work: Work::Embedding { model, inputs }, .. } = assign(unit, inputs) else { unreachable!() };
    Output::Run(Assignment { job, unit, model, inputs })
}

/// A session that said hello and was welcomed at time 0.
fn joined(budget: f64, max_message: usize) -> Session {
    let mut session = Session::new(capabilities(), budget, max_message);
    drain(&mut session);
    handle(&mut session, 0.0, &welcome(1, 2_000));
    session
}

fn rows(count: usize, width: usize) -> Vec<Vec<f32>> {
    (0..count).map(|r| (0..width).map(|c| (r * width + c) as f32 * 0.25).collect()).collect()
}

#[test]
fn says_hello_then_beats_at_the_interval_it_is_welcomed_with() {
    let mut session = Session::new(capabilities(), 1.0, BIG);
    let hello = drain(&mut session);
    assert_eq!(hello.len(), 1);
    assert_eq!(sent(&hello[0]), ContributorMessage::Hello { protocol_version: PROTOCOL_VERSION, capabilities: capabilities() });
    assert_eq!(session.poll_timeout(), None);

    let out = handle(&mut session, 500.0, &welcome(42, 2_000));
    assert_eq!(out, [Output::Event(Event::Joined { contributor: ContributorId(42) }), status(Status::Idle)]);
    assert_eq!(session.poll_timeout(), Some(2_500.0));
    session.handle_timeout(2_499.0);
    assert_eq!(drain(&mut session), []);
    session.handle_timeout(2_600.0);
    let beat = drain(&mut session);
    assert_eq!(beat.iter().map(sent).collect::<Vec<_>>(), [ContributorMessage::Heartbeat]);
    assert_eq!(session.poll_timeout(), Some(4_600.0));

    // Intervals outside [100 ms, 60 s] are clamped; a second welcome only moves the beat.
    for (interval, next) in [(5, 100.0), (10_000_000, 60_000.0), (3_000, 3_000.0)] {
        assert_eq!(handle(&mut session, 0.0, &welcome(42, interval)), []);
        assert_eq!(session.poll_timeout(), Some(next));
    }
}

#[test]
fn units_run_one_at_a_time_and_results_go_out_as_tensor_frames() {
    let mut session = joined(1.0, BIG);
    assert_eq!(handle(&mut session, 10.0, &assign(1, 2)), [status(Status::Working), run(1, 2)]);
    assert_eq!(handle(&mut session, 11.0, &assign(2, 3)), []);

    // 2 x 9000 floats: 72 KB, two frames.
    let result = rows(2, 9000);
    session.finished(500.0, UnitId(1), 400.0, Ok(result.clone()));
    let out = drain(&mut session);
    let mut reassembler = Reassembler::default();
    let mut payload = None;
    for output in &out[..2] {
        let Output::Send(Outgoing::Binary(frame)) = output else { panic!("expected a frame, got {output:?}") };
        assert!(frame.len() <= tessera_protocol::MAX_FRAME_LEN);
        let Ok(Decoded::Chunk(chunk)) = decode::<CoordinatorMessage>(Incoming::Binary(frame)) else { panic!("a bad frame") };
        assert_eq!(chunk.header.kind, PayloadKind::Tensor);
        payload = reassembler.push(chunk).unwrap();
    }
    let payload = payload.unwrap();
    let tensor = Tensor::decode(&payload.bytes, usize::MAX).unwrap();
    assert_eq!(tensor.dims(), [2, 9000]);
    assert_eq!(tensor.f32_values().unwrap().collect::<Vec<_>>(), result.concat());
    assert_eq!(
        sent(&out[2]),
        ContributorMessage::UnitResult { unit: UnitId(1), payload: PayloadRef { stream: payload.stream, bytes: payload.bytes.len() as u64 } }
    );
    assert_eq!(
        out[3..],
        [
            Output::Event(Event::Unit { unit: UnitId(1), job: JobId(9), inputs: 2, ms: 400.0 }),
            status(Status::Idle),
            status(Status::Working),
            run(2, 3)
        ]
    );

    // Each result has a stream of its own.
    session.finished(900.0, UnitId(2), 10.0, Ok(rows(3, 4)));
    let out = drain(&mut session);
    let ContributorMessage::UnitResult { payload: second, .. } = sent(&out[1]) else { panic!("{out:?}") };
    assert_ne!(second.stream, payload.stream);
    // A report for a unit that is not running changes nothing.
    session.finished(950.0, UnitId(2), 10.0, Ok(rows(3, 4)));
    assert_eq!(drain(&mut session), []);
}

#[test]
fn the_gpu_rests_after_each_unit_for_the_rest_of_its_budget() {
    // (budget, busy ms of a unit finished at 1000): when the next queued unit starts.
    for (budget, busy, starts) in [(1.0, 300.0, 1000.0), (0.5, 300.0, 1300.0), (0.25, 100.0, 1300.0), (0.1, 50.0, 1450.0)] {
        let mut session = joined(budget, BIG);
        handle(&mut session, 0.0, &assign(1, 1));
        handle(&mut session, 0.0, &assign(2, 1));
        session.finished(1000.0, UnitId(1), busy, Ok(rows(1, 4)));
        let started = |out: &[Output]| out.contains(&run(2, 1));
        assert_eq!(started(&drain(&mut session)), starts == 1000.0, "budget {budget}");
        if starts > 1000.0 {
            assert_eq!(session.poll_timeout(), Some(starts), "budget {budget}");
            session.handle_timeout(starts - 1.0);
            assert!(!started(&drain(&mut session)), "budget {budget}");
            session.handle_timeout(starts);
            assert!(started(&drain(&mut session)), "budget {budget}");
        }
    }
    // A bigger budget takes effect during the rest.
    let mut session = joined(0.1, BIG);
    handle(&mut session, 0.0, &assign(1, 1));
    handle(&mut session, 0.0, &assign(2, 1));
    session.finished(1000.0, UnitId(1), 100.0, Ok(rows(1, 4)));
    drain(&mut session);
    session.set_budget(1100.0, 1.0);
    assert_eq!(drain(&mut session), [status(Status::Working), run(2, 1)]);
}

#[test]
fn units_wait_for_the_welcome_and_the_queue_is_bounded() {
    let mut session = Session::new(capabilities(), 1.0, BIG);
    drain(&mut session);
    assert_eq!(handle(&mut session, 0.0, &assign(1, 1)), []);
    assert_eq!(session.poll_timeout(), None);
    let out = handle(&mut session, 0.0, &welcome(1, 2_000));
    assert_eq!(out[2..], [status(Status::Working), run(1, 1)]);
    for unit in 2..2 + MAX_QUEUED_UNITS as u64 {
        assert_eq!(handle(&mut session, 0.0, &assign(unit, 1)), []);
    }
    let out = handle(&mut session, 0.0, &assign(100, 1));
    assert_eq!(out, [Output::Log(format!("unit 100 dropped: {MAX_QUEUED_UNITS} units are queued already"))]);
    let out = handle(&mut session, 0.0, &assign(1, 1));
    assert_eq!(out, [Output::Log("unit 1 was assigned twice; the second is ignored".into())]);
}

#[test]
fn cancelled_units_are_not_run_and_their_results_not_sent() {
    let mut session = joined(1.0, BIG);
    handle(&mut session, 0.0, &assign(1, 1));
    handle(&mut session, 0.0, &assign(2, 1));
    handle(&mut session, 0.0, &assign(3, 1));
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Cancel { unit: UnitId(2) }), []);
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Cancel { unit: UnitId(1) }), []);
    session.finished(10.0, UnitId(1), 5.0, Ok(rows(1, 4)));
    assert_eq!(
        drain(&mut session),
        [Output::Log("unit 1: cancelled while it ran; its result is dropped".into()), status(Status::Idle), status(Status::Working), run(3, 1)]
    );
}

#[test]
fn failed_units_are_reported_to_the_coordinator() {
    // (rows the model gave, the channel's max message size, the error's text)
    let cases = [
        (Err("the GPU reported errors: [lost]".to_string()), BIG, "unit 1: the GPU reported errors: [lost]"),
        (Ok(rows(1, 4)), BIG, "unit 1: the model gave rows of widths [4] for 2 inputs"),
        (Ok(vec![vec![1.0; 4], vec![1.0; 3]]), BIG, "unit 1: the model gave rows of widths [4, 3] for 2 inputs"),
        (Ok(rows(2, 300)), 1000, "unit 1: a result frame of 2452 bytes exceeds the DataChannel's maxMessageSize of 1000"),
    ];
    for (result, max_message, expected) in cases {
        let mut session = joined(1.0, max_message);
        handle(&mut session, 0.0, &assign(1, 2));
        session.finished(10.0, UnitId(1), 5.0, result);
        let out = drain(&mut session);
        assert!(matches!(&out[0], Output::Log(line) if line.starts_with("unit 1 failed: ")), "{out:?}");
        assert_eq!(sent(&out[1]), ContributorMessage::Error { code: ErrorCode::Internal, message: expected.into() });
        assert_eq!(out[2..], [status(Status::Idle)]);
    }
}

#[test]
fn coordinator_messages_that_need_no_work() {
    let mut session = joined(1.0, BIG);
    let blob_request = CoordinatorMessage::BlobRequest { cid: "bafkx".into(), offset: 0, length: 10, stream: 4 };
    let out = handle(&mut session, 0.0, &blob_request);
    let message = "bafkx (stream 4): this contributor does not serve blobs".to_string();
    assert_eq!(out.iter().map(sent).collect::<Vec<_>>(), [ContributorMessage::Error { code: ErrorCode::BlobNotFound, message }]);
    let signal = CoordinatorMessage::Signal { from: ContributorId(2), to: ContributorId(1), payload: SignalPayload::Offer { sdp: "v=0".into() } };
    assert_eq!(handle(&mut session, 0.0, &signal), []);
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::BlobHave { cids: vec!["bafkx".into()] }), []);
    let verdict = CoordinatorMessage::Verdict { unit: UnitId(3), accepted: false };
    assert_eq!(handle(&mut session, 0.0, &verdict), [Output::Event(Event::Verdict { unit: UnitId(3), accepted: false })]);
    let error = CoordinatorMessage::Error { code: ErrorCode::UnknownUnit, message: "unit 5".into() };
    assert_eq!(handle(&mut session, 0.0, &error), [Output::Log("the coordinator says UnknownUnit: unit 5".into())]);
    let frame = Chunker::new(3, PayloadKind::Blob, b"abc").unwrap().next().unwrap();
    session.handle(0.0, Incoming::Binary(&frame));
    assert_eq!(drain(&mut session), [Output::Log("ignoring an unrequested Blob frame (stream 3, chunk 0 of 1)".into())]);
}

fn check_restart(incoming: Incoming<'_>, expected: &str) {
    let mut session = joined(1.0, BIG);
    handle(&mut session, 0.0, &assign(1, 1));
    session.handle(1.0, incoming);
    let out = drain(&mut session);
    let shown: String = format!("{incoming:?}").chars().take(100).collect();
    assert!(matches!(&out[..], [Output::Restart(reason)] if reason.contains(expected)), "{shown}: {out:?}");
    // Nothing more comes out of an ended session.
    assert_eq!(session.poll_timeout(), None);
    session.handle_timeout(1e9);
    session.handle(2.0, Incoming::Text(&text(&assign(2, 1))));
    session.finished(3.0, UnitId(1), 1.0, Ok(rows(1, 4)));
    session.leave();
    assert_eq!(drain(&mut session), []);
}

#[test]
fn bad_messages_from_the_coordinator_restart_the_session() {
    let mut long = vec![b' '; tessera_protocol::MAX_TEXT_MESSAGE + 1];
    long[0] = b'{';
    let long = String::from_utf8(long).unwrap();
    let wrong_version = r#"{"type":"welcome","protocol_version":99,"contributor":1,"heartbeat_interval_ms":2000}"#;
    let bad_work = r#"{"type":"assign","job":1,"unit":2,"deadline_ms":5,"work":{"kind":"generate"}}"#;
    let refused = text(&CoordinatorMessage::Error { code: ErrorCode::UnsupportedVersion, message: "speak version 2".into() });
    let cases: [(Incoming<'_>, &str); 9] = [
        (Incoming::Text("not json"), "does not decode: "),
        (Incoming::Text("[1, 2]"), "expected a JSON object"),
        (Incoming::Text(r#"{"type":"hello"}"#), "\"hello\""),
        (Incoming::Text(wrong_version), "version"),
        (Incoming::Text(bad_work), "generate"),
        (Incoming::Text(&long), "exceeds"),
        (Incoming::Text(&refused), "the coordinator refused this contributor: speak version 2"),
        (Incoming::Binary(&[1, 2, 3]), "shorter than the 32-byte header"),
        (Incoming::Binary(b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"), "magic"),
    ];
    for (incoming, expected) in cases {
        check_restart(incoming, expected);
    }
}

#[test]
fn leaving_sends_leave_once_and_ends_the_session() {
    let mut session = joined(1.0, BIG);
    session.leave();
    session.leave();
    assert_eq!(drain(&mut session).iter().map(sent).collect::<Vec<_>>(), [ContributorMessage::Leave]);
    assert_eq!(session.poll_timeout(), None);
    assert_eq!(handle(&mut session, 0.0, &assign(1, 1)), []);
}

#[test]
fn events_are_plain_objects_with_a_type() {
    let cases = [
        (Event::Status { status: Status::Error, detail: Some("gone".into()) }, serde_json::json!({"type": "status", "status": "error", "detail": "gone"})),
        (Event::Status { status: Status::Idle, detail: None }, serde_json::json!({"type": "status", "status": "idle", "detail": null})),
        (Event::Joined { contributor: ContributorId(3) }, serde_json::json!({"type": "joined", "contributor": 3})),
        (Event::Download { cid: "bafk".into(), bytes: 5, cached: true }, serde_json::json!({"type": "download", "cid": "bafk", "bytes": 5, "cached": true})),
        (Event::Unit { unit: UnitId(4), job: JobId(2), inputs: 8, ms: 1.5 }, serde_json::json!({"type": "unit", "unit": 4, "job": 2, "inputs": 8, "ms": 1.5})),
        (Event::Verdict { unit: UnitId(4), accepted: true }, serde_json::json!({"type": "verdict", "unit": 4, "accepted": true})),
    ];
    for (event, expected) in cases {
        assert_eq!(serde_json::to_value(&event).unwrap(), expected);
    }
}

#[test]
fn signalling_speaks_the_coordinators_messages() {
    use tessera_rtc::signal::SignalMessage;
    assert_eq!(CHANNEL_LABEL, tessera_rtc::CHANNEL_LABEL);
    assert_eq!(decode_control::<SignalMessage>(offer("v=0\r\n").as_bytes(), usize::MAX).unwrap(), SignalMessage::Offer { sdp: "v=0\r\n".into() });
    let reply = |message: &SignalMessage| answer(&encode_control(message));
    assert_eq!(reply(&SignalMessage::Answer { sdp: "v=0 answer".into() }), Ok("v=0 answer".into()));
    let refusal = reply(&SignalMessage::Error { code: ErrorCode::Internal, message: "not accepting peers".into() });
    assert_eq!(refusal, Err("the coordinator refused the offer (Internal): not accepting peers".into()));
    assert_eq!(reply(&SignalMessage::Offer { sdp: "x".into() }), Err("the coordinator answered with \"offer\" and no SDP".into()));
    assert_eq!(answer(r#"{"type":"answer"}"#), Err("the coordinator answered with \"answer\" and no SDP".into()));
    assert!(answer("<html>").unwrap_err().starts_with("the signalling answer does not decode: "));
    assert!(answer(&"x".repeat(70_000)).unwrap_err().contains("over the limit"));
}

#[test]
fn span_messages_are_refused_by_name() {
    let mut session = joined(1.0, BIG);
    let load = CoordinatorMessage::LoadSpan { model: "smollm2".into(), shard: "bafkshard".into(), blocks: tessera_protocol::Blocks { start: 0, end: 10 }, max_sessions: 4 };
    let out = handle(&mut session, 10.0, &load);
    assert_eq!(out.iter().map(sent).collect::<Vec<_>>(), [ContributorMessage::Error { code: ErrorCode::SpanFailed, message: "this contributor does not serve spans yet".into() }]);
    let out = handle(&mut session, 11.0, &CoordinatorMessage::EndSession { session: 3 });
    assert!(matches!(sent(&out[0]), ContributorMessage::Error { code: ErrorCode::SpanFailed, .. }));
}
