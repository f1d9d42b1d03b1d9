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
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Prefetch { blobs: vec!["bafkx".into()] }), []);
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

/// The frames of an F32 tensor `dims` on `stream`, as the coordinator sends before a `Forward`.
fn tensor_frames(stream: u64, dims: Vec<u64>, values: &[f32]) -> (Vec<Vec<u8>>, PayloadRef) {
    let bytes = Tensor::from_f32(dims, values).unwrap().encode();
    let frames = Chunker::new(stream, PayloadKind::Tensor, &bytes).unwrap().collect();
    (frames, PayloadRef { stream, bytes: bytes.len() as u64 })
}

fn forward(session: u64, step: u64, start: u32, payload: PayloadRef) -> CoordinatorMessage {
    CoordinatorMessage::Forward { shard: "bafkshard".into(), session, step, start, capacity: 64, payload }
}

fn send_frames(session: &mut Session, frames: &[Vec<u8>]) {
    for frame in frames {
        session.handle(0.0, Incoming::Binary(frame));
    }
}

fn span_failed(output: &Output) -> String {
    match sent(output) {
        ContributorMessage::Error { code: ErrorCode::SpanFailed, message } => message,
        other => panic!("expected SpanFailed, got {other:?}"),
    }
}

#[test]
fn spans_load_and_report_ready_or_failed() {
    let mut session = joined(1.0, BIG);
    let load = |start, end, max_sessions| CoordinatorMessage::LoadSpan {
        model: "smollm2".into(),
        shard: "bafkshard".into(),
        blocks: tessera_protocol::Blocks { start, end },
        max_sessions,
    };
    let out = handle(&mut session, 10.0, &load(0, 10, 4));
    assert_eq!(out, [Output::Span(SpanJob::Load { shard: "bafkshard".into(), blocks: 0..10, max_sessions: 4 })]);
    session.span_loaded("bafkshard".into(), 0..10, Ok(()));
    let out = drain(&mut session);
    assert_eq!(out[0], Output::Event(Event::SpanLoaded { shard: "bafkshard".into(), start: 0, end: 10 }));
    assert_eq!(sent(&out[1]), ContributorMessage::SpanReady { shard: "bafkshard".into() });

    session.span_loaded("bafkother".into(), 10..20, Err("the GPU is out of memory".into()));
    let out = drain(&mut session);
    assert_eq!(out[1], Output::Event(Event::SpanDropped { shard: "bafkother".into() }));
    assert_eq!(span_failed(&out[2]), "span 10..20 (bafkother): the GPU is out of memory");

    // No blocks, or no sessions, is no span: refused without a job.
    assert_eq!(span_failed(&handle(&mut session, 11.0, &load(5, 5, 4))[0]), "span bafkshard: blocks 5..5 for 4 sessions is no span");
    assert!(span_failed(&handle(&mut session, 11.0, &load(0, 3, 0))[0]).contains("for 0 sessions"));

    // Ends and unloads are jobs in the same queue, so they follow the forwards before them.
    assert_eq!(handle(&mut session, 12.0, &CoordinatorMessage::EndSession { session: 3 }), [Output::Span(SpanJob::End { session: 3 })]);
    let unload = CoordinatorMessage::UnloadSpan { shard: "bafkshard".into() };
    assert_eq!(
        handle(&mut session, 12.0, &unload),
        [Output::Event(Event::SpanDropped { shard: "bafkshard".into() }), Output::Span(SpanJob::Unload { shard: "bafkshard".into() })]
    );
}

#[test]
fn forwards_take_their_tensor_and_answer_with_frames_then_forwarded() {
    let mut session = joined(1.0, BIG);
    // 2 rows of 9000: 72 KB, two frames in, two frames out.
    let hidden: Vec<f32> = rows(2, 9000).concat();
    let (frames, payload) = tensor_frames(40, vec![2, 9000], &hidden);
    send_frames(&mut session, &frames);
    assert_eq!(drain(&mut session), []);
    let out = handle(&mut session, 20.0, &forward(5, 1, 0, payload));
    let expected = SpanJob::Forward { shard: "bafkshard".into(), session: 5, step: 1, start: 0, capacity: 64, rows: 2, hidden: hidden.clone() };
    assert_eq!(out, [Output::Span(expected)]);

    let output: Vec<f32> = hidden.iter().map(|v| v * 2.0).collect();
    session.forwarded(30.0, 5, 1, 12.5, Ok((output.clone(), 9000)));
    let out = drain(&mut session);
    let mut reassembler = Reassembler::default();
    let mut answer = None;
    for output in &out[..2] {
        let Output::Send(Outgoing::Binary(frame)) = output else { panic!("expected a frame, got {output:?}") };
        let Ok(Decoded::Chunk(chunk)) = decode::<CoordinatorMessage>(Incoming::Binary(frame)) else { panic!("a bad frame") };
        answer = reassembler.push(chunk).unwrap();
    }
    let answer = answer.unwrap();
    let tensor = Tensor::decode(&answer.bytes, usize::MAX).unwrap();
    assert_eq!(tensor.dims(), [2, 9000]);
    assert_eq!(tensor.f32_values().unwrap().collect::<Vec<_>>(), output);
    let payload = PayloadRef { stream: answer.stream, bytes: answer.bytes.len() as u64 };
    assert_eq!(sent(&out[2]), ContributorMessage::Forwarded { session: 5, step: 1, payload });
    assert_eq!(out[3], Output::Event(Event::Forwarded { rows: 2, ms: 12.5 }));

    // A step that failed on the GPU, or gave no whole rows, is a SpanFailed for that step.
    session.forwarded(31.0, 5, 2, 1.0, Err("span bafkshard is not loaded here".into()));
    assert_eq!(span_failed(&drain(&mut session)[1]), "session 5 step 2: span bafkshard is not loaded here");
    session.forwarded(32.0, 5, 3, 1.0, Ok((vec![1.0; 7], 4)));
    assert_eq!(span_failed(&drain(&mut session)[1]), "session 5 step 3: the span gave 7 values, not rows of 4");
}

#[test]
fn a_forward_whose_tensor_is_missing_or_wrong_fails_that_step_only() {
    let mut session = joined(1.0, BIG);
    let refusal = |session: &mut Session, message: &CoordinatorMessage| span_failed(&handle(session, 0.0, message)[0]);
    assert_eq!(refusal(&mut session, &forward(1, 1, 0, PayloadRef { stream: 9, bytes: 10 })), "session 1 step 1: no tensor arrived on stream 9");

    let (frames, payload) = tensor_frames(10, vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
    send_frames(&mut session, &frames);
    let wrong = PayloadRef { bytes: payload.bytes + 1, ..payload };
    assert!(refusal(&mut session, &forward(1, 2, 0, wrong)).contains("stream 10 carried"));
    // The tensor was used up by the refused forward.
    assert!(refusal(&mut session, &forward(1, 3, 0, payload)).contains("no tensor arrived on stream 10"));

    let (frames, payload) = tensor_frames(11, vec![2, 2, 1], &[1.0, 2.0, 3.0, 4.0]);
    send_frames(&mut session, &frames);
    assert!(refusal(&mut session, &forward(1, 4, 0, payload)).contains("not [rows, dim]"));

    let bytes = Tensor::new(tessera_protocol::DType::U32, vec![1, 2], vec![0; 8]).unwrap().encode();
    send_frames(&mut session, &Chunker::new(12, PayloadKind::Tensor, &bytes).unwrap().collect::<Vec<_>>());
    let payload = PayloadRef { stream: 12, bytes: bytes.len() as u64 };
    assert!(refusal(&mut session, &forward(1, 5, 0, payload)).contains("not F32"));

    // The session goes on: a good forward still becomes a job.
    let (frames, payload) = tensor_frames(13, vec![1, 2], &[0.5, 0.25]);
    send_frames(&mut session, &frames);
    assert!(matches!(&handle(&mut session, 0.0, &forward(1, 6, 0, payload))[..], [Output::Span(SpanJob::Forward { rows: 1, .. })]));
}

#[test]
fn tensors_beyond_the_bounds_restart_the_session() {
    // Too many tensors without their forwards.
    let mut session = joined(1.0, BIG);
    for stream in 0..=MAX_WAITING_TENSORS as u64 {
        send_frames(&mut session, &tensor_frames(stream, vec![1, 1], &[1.0]).0);
    }
    assert!(matches!(&drain(&mut session)[..], [Output::Restart(reason)] if reason.contains("others waiting for their forward")));

    // A tensor announced as larger than any hidden state is refused on its first frame.
    let mut session = joined(1.0, BIG);
    let mut frame = Chunker::new(1, PayloadKind::Tensor, &vec![0; 70_000]).unwrap().next().unwrap();
    let total = MAX_HIDDEN_BYTES + 1;
    frame[20..24].copy_from_slice(&(tessera_protocol::frame::chunk_count(total) as u32).to_le_bytes());
    frame[24..32].copy_from_slice(&total.to_le_bytes());
    session.handle(0.0, Incoming::Binary(&frame));
    let out = drain(&mut session);
    assert!(matches!(&out[..], [Output::Restart(reason)] if reason.contains("bad tensor frame")), "{out:?}");
}

#[test]
fn span_steps_count_against_the_rest_of_the_next_unit() {
    // Half the time: a 100 ms step owes 100 ms of rest, so a unit that arrives at once waits.
    let mut session = joined(0.5, BIG);
    session.forwarded(1000.0, 1, 1, 100.0, Ok((vec![1.0; 4], 4)));
    drain(&mut session);
    assert_eq!(handle(&mut session, 1000.0, &assign(1, 1)), []);
    assert_eq!(session.poll_timeout(), Some(1100.0));
    session.handle_timeout(1100.0);
    assert_eq!(drain(&mut session), [status(Status::Working), run(1, 1)]);
}

#[test]
fn forwards_through_one_span_for_other_sessions_batch_up_to_the_exact_rows() {
    let fwd = |shard: &str, session: u64, rows: usize| SpanJob::Forward {
        shard: shard.into(),
        session,
        step: session * 10,
        start: 0,
        capacity: 64,
        rows,
        hidden: vec![0.5; rows * 2],
    };
    let sessions = |jobs: &[SpanJob]| -> Vec<u64> {
        jobs.iter().map(|j| if let SpanJob::Forward { session, .. } = j { *session } else { 0 }).collect()
    };
    let mut queue: VecDeque<SpanJob> = VecDeque::from([
        fwd("a", 1, 1),
        fwd("a", 2, 3),
        fwd("a", 3, 4),
        // Over the eight rows: the next batch.
        fwd("a", 4, 1),
        // The same session twice: the next batch.
        fwd("a", 4, 1),
        // Another span.
        fwd("b", 5, 1),
        fwd("b", 6, 1),
        // A barrier: the end of session 6 waits for the forwards before it, and the one after.
        SpanJob::End { session: 6 },
        fwd("b", 7, 1),
        // Nine rows at once run alone.
        fwd("b", 8, 9),
        fwd("b", 9, 1),
    ]);
    let mut batches = Vec::new();
    while !queue.is_empty() {
        batches.push(sessions(&next_span_jobs(&mut queue)));
    }
    assert_eq!(batches, [vec![1, 2, 3], vec![4], vec![4], vec![5, 6], vec![0], vec![7], vec![8], vec![9]]);
    assert!(next_span_jobs(&mut queue).is_empty());
}
