//! The session machine driven by hand: messages in, outputs checked, time passed in.

#![allow(clippy::unwrap_used)]

use tessera_protocol::{AdapterLimits, Reassembler, SignalPayload, Standby, decode_control};

use super::*;

const BIG: usize = 256 << 10;
/// The engine's `EXACT_BATCH_ROWS`, which the glue hands `next_span_jobs`.
const EXACT_BATCH_ROWS: usize = 8;

/// A tab's adapter, as a page reports it (the blob tests use it too).
pub(super) fn capabilities() -> Capabilities {
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
        lends_blobs: false,
    }
}

pub(super) fn drain(session: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| session.poll()).collect()
}

fn text(message: &CoordinatorMessage) -> String {
    encode_control(message)
}

pub(super) fn handle(session: &mut Session, now: Millis, message: &CoordinatorMessage) -> Vec<Output> {
    session.handle(now, Incoming::Text(&text(message)));
    drain(session)
}

pub(super) fn sent(output: &Output) -> ContributorMessage {
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
    let mut session = Session::new(capabilities(), Policy::TAB, budget, max_message);
    drain(&mut session);
    handle(&mut session, 0.0, &welcome(1, 2_000));
    session
}

fn rows(count: usize, width: usize) -> Vec<Vec<f32>> {
    (0..count).map(|r| (0..width).map(|c| (r * width + c) as f32 * 0.25).collect()).collect()
}

#[test]
fn says_hello_then_beats_at_the_interval_it_is_welcomed_with() {
    let mut session = Session::new(capabilities(), Policy::TAB, 1.0, BIG);
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
        [Output::Event(Event::Unit { unit: UnitId(1), job: JobId(9), inputs: 2, ms: 400.0 }), status(Status::Idle), status(Status::Working), run(2, 3)]
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
    let mut session = Session::new(capabilities(), Policy::TAB, 1.0, BIG);
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
        (Ok(rows(2, 300)), 1000, "unit 1: a frame of 2452 bytes exceeds the DataChannel's maxMessageSize of 1000"),
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
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::BlobHave { cids: vec!["bafkx".into()] }), []);
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Prefetch { blobs: vec!["bafkx".into()], lenders: Default::default() }), []);
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
        (Event::Links { open: 2 }, serde_json::json!({"type": "links", "open": 2})),
        (Event::Passed { to: ContributorId(7) }, serde_json::json!({"type": "passed", "to": 7})),
    ];
    for (event, expected) in cases {
        assert_eq!(serde_json::to_value(&event).unwrap(), expected);
    }
}

/// The frames of an F32 tensor `dims` on `stream`, as the coordinator sends before a `Forward`.
fn tensor_frames(stream: u64, dims: Vec<u64>, values: &[f32]) -> (Vec<Vec<u8>>, PayloadRef) {
    let bytes = Tensor::from_f32(dims, values).unwrap().encode();
    let frames = Chunker::new(stream, PayloadKind::Tensor, &bytes).unwrap().collect();
    (frames, PayloadRef { stream, bytes: bytes.len() as u64 })
}

fn forward(session: u64, step: u64, start: u32, payload: PayloadRef) -> CoordinatorMessage {
    CoordinatorMessage::Forward(Forward { shard: "bafkshard".into(), session, step, start, capacity: 64, payload, then: Vec::new(), shadow: false })
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
        peers: Vec::new(),
    };
    let out = handle(&mut session, 10.0, &load(0, 10, 4));
    assert_eq!(out, [Output::Span(SpanJob::Load { shard: "bafkshard".into(), blocks: 0..10, max_sessions: 4 })]);
    session.span_loaded(0.0, "bafkshard".into(), 0..10, Ok(()));
    let out = drain(&mut session);
    assert_eq!(out[0], Output::Event(Event::SpanLoaded { shard: "bafkshard".into(), start: 0, end: 10 }));
    assert_eq!(sent(&out[1]), ContributorMessage::SpanReady { shard: "bafkshard".into(), fetched_from: None });

    session.span_loaded(0.0, "bafkother".into(), 10..20, Err("the GPU is out of memory".into()));
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
    assert_eq!(sent(&out[2]), ContributorMessage::Forwarded { session: 5, step: 1, payload, ms: 12.5 });
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
    let sessions = |jobs: &[SpanJob]| -> Vec<u64> { jobs.iter().map(|j| if let SpanJob::Forward { session, .. } = j { *session } else { 0 }).collect() };
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
        batches.push(sessions(&next_span_jobs(&mut queue, EXACT_BATCH_ROWS)));
    }
    assert_eq!(batches, [vec![1, 2, 3], vec![4], vec![4], vec![5, 6], vec![0], vec![7], vec![8], vec![9]]);
    assert!(next_span_jobs(&mut queue, EXACT_BATCH_ROWS).is_empty());
}

fn link(peer: u64, offer: bool) -> CoordinatorMessage {
    CoordinatorMessage::Link { peer: ContributorId(peer), offer }
}

/// A signal relayed from contributor `from` to this one (contributor 1).
fn signal(from: u64, payload: SignalPayload) -> CoordinatorMessage {
    CoordinatorMessage::Signal { from: ContributorId(from), to: ContributorId(1), payload }
}

fn offer_from(from: u64) -> CoordinatorMessage {
    signal(from, SignalPayload::Offer { sdp: format!("v=0 offer of {from}"), purpose: ChannelPurpose::Forwards })
}

fn answer_from(from: u64) -> CoordinatorMessage {
    signal(from, SignalPayload::Answer { sdp: format!("v=0 answer of {from}") })
}

fn links_open(open: usize) -> Output {
    Output::Event(Event::Links { open })
}

fn logged(output: &Output, part: &str) -> bool {
    matches!(output, Output::Log(line) if line.contains(part))
}

/// Opens a link with `peer` (this side offering or answering) through every step, checking
/// each; returns its number.
fn open_link(session: &mut Session, peer: u64, offer: bool, max_message: usize) -> u64 {
    let own = ContributorId(1);
    let (link, sdp) = if offer {
        let out = handle(session, 0.0, &link(peer, true));
        let [Output::Offer { link, peer: to }] = out[..] else { panic!("{out:?}") };
        assert_eq!(to, ContributorId(peer));
        (link, "v=0 our offer")
    } else {
        assert_eq!(handle(session, 0.0, &link(peer, false)), []);
        let out = handle(session, 0.0, &offer_from(peer));
        let [Output::Answer { link, peer: from, ref sdp }] = out[..] else { panic!("{out:?}") };
        assert_eq!((from, sdp.as_str()), (ContributorId(peer), format!("v=0 offer of {peer}").as_str()));
        (link, "v=0 our answer")
    };
    session.described(0.0, link, Ok(sdp.into()));
    let payload = if offer { SignalPayload::Offer { sdp: sdp.into(), purpose: ChannelPurpose::Forwards } } else { SignalPayload::Answer { sdp: sdp.into() } };
    assert_eq!(drain(session).iter().map(sent).collect::<Vec<_>>(), [ContributorMessage::Signal { from: own, to: ContributorId(peer), payload }]);
    if offer {
        assert_eq!(handle(session, 0.0, &answer_from(peer)), [Output::Accept { link, sdp: format!("v=0 answer of {peer}") }]);
    }
    let before = session.open_links();
    session.link_open(0.0, link, max_message);
    let out = drain(session);
    assert!(logged(&out[0], &format!("contributor {peer} open")), "{out:?}");
    assert_eq!(out[1..], [links_open(before + 1)]);
    link
}

/// A tab lends no shards: a `Lend` changes nothing, an offer of a channel to fetch blobs is not
/// answered (even from its upstream peer), and a blob request on a link closes that link.
#[test]
fn a_tab_lends_no_shards() {
    let mut session = joined(1.0, BIG);
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(3), blobs: vec!["bafkshard".into()] }), []);
    assert_eq!(handle(&mut session, 0.0, &link(3, false)), []);
    let blobs = SignalPayload::Offer { sdp: "v=0".into(), purpose: ChannelPurpose::Blobs };
    let out = handle(&mut session, 0.0, &signal(3, blobs));
    assert!(matches!(&out[..], [output] if logged(output, "lends none")), "{out:?}");
    let up = open_link(&mut session, 3, false, BIG);
    let request = PeerMessage::BlobRequest { cid: "bafkshard".into(), offset: 0, length: 0, stream: 1 };
    session.link_message(0.0, up, Incoming::Text(&encode_control(&request)));
    let out = drain(&mut session);
    assert!(out.contains(&Output::Close { link: up }), "{out:?}");
    assert_eq!(session.open_links(), 0);
}

#[test]
fn links_open_as_the_coordinator_says_and_close_on_unlink() {
    let mut session = joined(1.0, BIG);
    let down = open_link(&mut session, 7, true, BIG);
    let up = open_link(&mut session, 3, false, BIG);
    assert_ne!(down, up);
    // Asked again for a link it has: nothing new.
    assert_eq!(handle(&mut session, 0.0, &link(7, true)), []);
    assert_eq!(handle(&mut session, 0.0, &link(3, false)), []);
    // The same peer the other way round is another link.
    let out = handle(&mut session, 0.0, &link(3, true));
    assert!(matches!(out[..], [Output::Offer { peer: ContributorId(3), .. }]), "{out:?}");

    let out = handle(&mut session, 0.0, &CoordinatorMessage::Unlink { peer: ContributorId(7) });
    assert!(logged(&out[0], "to contributor 7 closed: the coordinator unlinked it"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: down }, links_open(1)]);
    // Both links with contributor 3 go; the one still being made has nothing open to count.
    let out = handle(&mut session, 0.0, &CoordinatorMessage::Unlink { peer: ContributorId(3) });
    assert_eq!(out.iter().filter(|o| matches!(o, Output::Close { .. })).count(), 2, "{out:?}");
    assert_eq!(out.iter().filter(|o| matches!(o, Output::Event(_))).collect::<Vec<_>>(), [&links_open(0)]);
    // Its offer is no longer awaited.
    assert!(logged(&handle(&mut session, 0.0, &offer_from(3))[0], "not linked here as upstream"));
}

fn check_signal(links: &[(u64, bool)], message: &CoordinatorMessage, expected: &str) {
    let mut session = joined(1.0, BIG);
    for &(peer, offer) in links {
        handle(&mut session, 0.0, &link(peer, offer));
    }
    let out = handle(&mut session, 0.0, message);
    if expected.is_empty() {
        assert_eq!(out, [], "{message:?}");
    } else {
        assert!(matches!(&out[..], [Output::Log(line)] if line.contains(expected)), "{message:?}: {out:?}");
    }
}

#[test]
fn signals_from_contributors_not_linked_so_are_ignored() {
    let to_another = CoordinatorMessage::Signal {
        from: ContributorId(3),
        to: ContributorId(2),
        payload: SignalPayload::Offer { sdp: "v=0".into(), purpose: ChannelPurpose::Forwards },
    };
    let candidate = signal(3, SignalPayload::Candidate { candidate: "candidate:1".into(), sdp_mid: None, sdp_m_line_index: Some(0) });
    check_signal(&[], &offer_from(2), "an offer from contributor 2, which is not linked here as upstream, ignored");
    // Linked, but downstream: this side offers to it, never answers it.
    check_signal(&[(7, true)], &offer_from(7), "not linked here as upstream");
    check_signal(&[(3, false)], &offer_from(4), "not linked here as upstream");
    // An answer to an offer this side did not make, or has not sent yet.
    check_signal(&[(3, false)], &answer_from(3), "an answer from contributor 3, which was not offered a channel here, ignored");
    check_signal(&[(7, true)], &answer_from(7), "was not offered a channel here");
    check_signal(&[(3, false)], &to_another, "a signal from contributor 3 for contributor 2 ignored");
    // Every candidate is in the SDP.
    check_signal(&[(3, false)], &candidate, "");

    // Links to itself, or before the welcome, are not made.
    let mut session = joined(1.0, BIG);
    assert!(logged(&handle(&mut session, 0.0, &link(1, true))[0], "this is contributor Some(ContributorId(1))"));
    let mut session = Session::new(capabilities(), Policy::TAB, 1.0, BIG);
    drain(&mut session);
    assert!(logged(&handle(&mut session, 0.0, &link(4, false))[0], "ignored"));
}

#[test]
fn a_new_offer_from_an_upstream_peer_replaces_its_connection() {
    let mut session = joined(1.0, BIG);
    let first = open_link(&mut session, 3, false, BIG);
    let out = handle(&mut session, 0.0, &offer_from(3));
    assert!(logged(&out[0], "contributor 3 offered again"), "{out:?}");
    let [_, Output::Close { link }, ref count, Output::Answer { link: second, .. }] = out[..] else { panic!("{out:?}") };
    assert_eq!((link, count), (first, &links_open(0)));
    assert_ne!(second, first);
    // The old connection's late reports close it again and change nothing else.
    session.link_open(0.0, first, BIG);
    session.described(0.0, first, Ok("v=0".into()));
    assert_eq!(drain(&mut session), [Output::Close { link: first }, Output::Close { link: first }]);
}

#[test]
fn links_that_fail_or_do_not_open_in_time_close() {
    let mut session = Session::new(capabilities(), Policy::TAB, 1.0, BIG);
    drain(&mut session);
    handle(&mut session, 0.0, &welcome(1, 60_000));
    // Offering: thirty seconds from the `Link`; answering: from the offer, none before it.
    handle(&mut session, 1_000.0, &link(7, true));
    handle(&mut session, 2_000.0, &link(3, false));
    assert_eq!(session.poll_timeout(), Some(31_000.0));
    handle(&mut session, 5_000.0, &offer_from(3));
    session.handle_timeout(30_999.0);
    assert_eq!(drain(&mut session), []);
    session.handle_timeout(31_000.0);
    let out = drain(&mut session);
    assert!(logged(&out[0], "to contributor 7 closed: did not open within 30 s; offering again in 2 s"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: 1 }]);
    // The offering side offers again after a pause, under a new number.
    assert_eq!(session.poll_timeout(), Some(33_000.0));
    session.handle_timeout(33_000.0);
    assert_eq!(drain(&mut session), [Output::Offer { link: 3, peer: ContributorId(7) }]);
    assert_eq!(session.poll_timeout(), Some(35_000.0));
    // The answering side gives up on that connection but still expects the peer: it may offer
    // again, and that connection is made.
    session.handle_timeout(35_000.0);
    let out = drain(&mut session);
    assert!(logged(&out[0], "from contributor 3 closed: did not open within 30 s"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: 2 }]);
    assert!(matches!(handle(&mut session, 36_000.0, &offer_from(3))[..], [Output::Answer { link: 2, .. }]));
    session.link_open(36_500.0, 2, BIG);
    drain(&mut session);
    assert_eq!(session.poll_timeout(), Some(60_000.0));
    // The second try fails too: a third after 10 s, and after that the link is forgotten.
    session.handle_timeout(63_000.0);
    let out = drain(&mut session);
    assert!(out.iter().any(|o| logged(o, "offering again in 10 s")), "{out:?}");
    session.handle_timeout(73_000.0);
    assert_eq!(drain(&mut session), [Output::Offer { link: 4, peer: ContributorId(7) }]);
    session.described(73_100.0, 4, Err("no route".into()));
    let out = drain(&mut session);
    assert!(logged(&out[0], "to contributor 7 closed: could not be set up: no route") && !logged(&out[0], "again"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: 4 }]);
    assert_eq!(session.poll_timeout(), Some(123_000.0), "only the beat is left");

    // A connection that could not be made is made again (above); one that closed once open is
    // forgotten; a report on a link the session does not know closes whatever the glue holds
    // for it.
    let mut session = joined(1.0, BIG);
    handle(&mut session, 0.0, &link(7, true));
    session.described(0.0, 1, Err("creating the offer: no".into()));
    let out = drain(&mut session);
    assert!(logged(&out[0], "could not be set up: creating the offer: no; offering again in 2 s"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: 1 }]);
    let open = open_link(&mut session, 8, true, BIG);
    session.link_closed(0.0, open, "contributor 8 closed the DataChannel".into());
    let out = drain(&mut session);
    assert!(logged(&out[0], "to contributor 8 closed: contributor 8 closed the DataChannel"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: open }, links_open(0)]);
    for report in [
        |s: &mut Session| s.link_closed(0.0, 99, "gone".into()),
        |s: &mut Session| s.link_open(0.0, 99, BIG),
        |s: &mut Session| s.link_message(0.0, 99, Incoming::Text("{}")),
        |s: &mut Session| s.described(0.0, 99, Ok("v=0".into())),
    ] {
        report(&mut session);
        assert_eq!(drain(&mut session), [Output::Close { link: 99 }]);
    }
    // A link the coordinator asks for again while it waits to offer again is offered at once.
    assert!(matches!(handle(&mut session, 0.0, &link(7, true))[..], [Output::Offer { .. }]));
}

#[test]
fn at_most_max_links_are_kept() {
    let mut session = joined(1.0, BIG);
    for peer in 0..MAX_LINKS as u64 {
        handle(&mut session, 0.0, &link(100 + peer, peer % 2 == 0));
    }
    let out = handle(&mut session, 0.0, &link(99, false));
    assert_eq!(out, [Output::Log(format!("no direct channel with contributor 99: {MAX_LINKS} are open or opening already"))]);
    assert!(logged(&handle(&mut session, 0.0, &offer_from(99))[0], "not linked here as upstream"));
    // One closes: there is room again.
    handle(&mut session, 0.0, &CoordinatorMessage::Unlink { peer: ContributorId(100) });
    assert_eq!(handle(&mut session, 0.0, &link(99, false)), []);
}

/// A step's hidden states, as an upstream peer sends them: frames, then its `PeerMessage`.
fn peer_forward(session: &mut Session, link: u64, stream: u64, hidden: &[f32], then: Vec<NextHop>) {
    let (frames, payload) = tensor_frames(stream, vec![1, hidden.len() as u64], hidden);
    for frame in &frames {
        session.link_message(0.0, link, Incoming::Binary(frame));
    }
    let forward = Forward { shard: "bafkshard".into(), session: 5, step: 1, start: 3, capacity: 64, payload, then, shadow: false };
    session.link_message(0.0, link, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
}

fn hop(contributor: u64, shard: &str) -> NextHop {
    NextHop { contributor: ContributorId(contributor), shard: shard.into(), standbys: Vec::new() }
}

/// The tensor a list of frames carries, and its reference.
fn reassemble(frames: &[Outgoing]) -> (Vec<f32>, PayloadRef) {
    let mut reassembler = Reassembler::default();
    let mut payload = None;
    for frame in frames {
        let Outgoing::Binary(frame) = frame else { panic!("expected a frame, got {frame:?}") };
        let Ok(Decoded::Chunk(chunk)) = decode::<PeerMessage>(Incoming::Binary(frame)) else { panic!("a bad frame") };
        payload = reassembler.push(chunk).unwrap();
    }
    let payload = payload.unwrap();
    let values = Tensor::decode(&payload.bytes, usize::MAX).unwrap().f32_values().unwrap().collect();
    (values, PayloadRef { stream: payload.stream, bytes: payload.bytes.len() as u64 })
}

#[test]
fn a_peers_forward_runs_as_the_coordinators_and_its_output_goes_on_directly() {
    let mut session = joined(1.0, BIG);
    let up = open_link(&mut session, 3, false, BIG);
    let down = open_link(&mut session, 7, true, BIG);
    let hidden: Vec<f32> = rows(1, 20_000).concat();
    peer_forward(&mut session, up, 4, &hidden, vec![hop(7, "bafknext"), hop(9, "bafklast")]);
    let job = SpanJob::Forward { shard: "bafkshard".into(), session: 5, step: 1, start: 3, capacity: 64, rows: 1, hidden: hidden.clone() };
    assert_eq!(drain(&mut session), [Output::Span(job)]);

    // 80 KB out: two frames on a stream of this side's, then the forward for the next stage,
    // naming the stage after it.
    let output: Vec<f32> = hidden.iter().map(|v| v + 1.0).collect();
    session.forwarded(10.0, 5, 1, 4.0, Ok((output.clone(), 20_000)));
    let out = drain(&mut session);
    let [Output::Pass { link, session: 5, step: 1, ref messages }, ref event] = out[..] else { panic!("{out:?}") };
    assert_eq!((link, event), (down, &Output::Event(Event::Forwarded { rows: 1, ms: 4.0 })));
    assert_eq!(messages.len(), 3);
    let (values, payload) = reassemble(&messages[..2]);
    assert_eq!(values, output);
    let Outgoing::Text(text) = &messages[2] else { panic!("{messages:?}") };
    let expected = Forward { shard: "bafknext".into(), session: 5, step: 1, start: 3, capacity: 64, payload, then: vec![hop(9, "bafklast")], shadow: false };
    assert_eq!(decode_control::<PeerMessage>(text.as_bytes(), usize::MAX).unwrap(), PeerMessage::Forward(expected));

    // Sent: the coordinator hears `Passed`, and the page counts it.
    session.passed(0.0, down, 5, 1, Ok(()));
    let out = drain(&mut session);
    assert_eq!(sent(&out[0]), ContributorMessage::Passed { session: 5, step: 1, to: ContributorId(7), ms: 4.0 });
    assert_eq!(out[1..], [Output::Event(Event::Passed { to: ContributorId(7) })]);
    // Reported twice, or for a step not handed out: nothing.
    session.passed(0.0, down, 5, 1, Ok(()));
    session.passed(0.0, down, 6, 1, Err("no".into()));
    assert_eq!(drain(&mut session), []);

    // A coordinator's forward names the next stage the same way.
    let (frames, payload) = tensor_frames(50, vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
    send_frames(&mut session, &frames);
    let message = CoordinatorMessage::Forward(Forward { then: vec![hop(7, "bafknext")], ..forward_fields(6, 2, payload) });
    assert!(matches!(handle(&mut session, 0.0, &message)[..], [Output::Span(SpanJob::Forward { session: 6, .. })]));
    session.forwarded(20.0, 6, 2, 1.0, Ok((vec![0.5; 4], 4)));
    let out = drain(&mut session);
    assert!(matches!(&out[..], [Output::Pass { session: 6, step: 2, messages, .. }, _] if messages.len() == 2), "{out:?}");
}

#[test]
fn a_peers_step_that_fails_here_is_not_this_spans_failure() {
    let mut session = joined(1.0, BIG);
    let up = open_link(&mut session, 3, false, BIG);
    peer_forward(&mut session, up, 4, &[1.0, 2.0], Vec::new());
    assert!(matches!(drain(&mut session)[..], [Output::Span(SpanJob::Forward { session: 5, step: 1, .. })]));
    // The span moved off this tab since, say: the coordinator hears it, but not `SpanFailed`,
    // which would take the span from its holder.
    session.forwarded(10.0, 5, 1, 1.0, Err("span bafkshard is not loaded here".into()));
    let out = drain(&mut session);
    let Some(ContributorMessage::Error { code, message }) = out.iter().find(|o| matches!(o, Output::Send(Outgoing::Text(_)))).map(sent) else {
        panic!("{out:?}")
    };
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    assert!(message.contains("from contributor 3"), "{message}");
    // The coordinator's own step failing is this span's failure.
    let (frames, payload) = tensor_frames(50, vec![1, 2], &[1.0, 2.0]);
    send_frames(&mut session, &frames);
    handle(&mut session, 0.0, &CoordinatorMessage::Forward(forward_fields(6, 2, payload)));
    session.forwarded(20.0, 6, 2, 1.0, Err("bad".into()));
    let out = drain(&mut session);
    assert!(
        out.iter().any(|o| matches!(o, Output::Send(Outgoing::Text(_))) && matches!(sent(o), ContributorMessage::Error { code: ErrorCode::SpanFailed, .. })),
        "{out:?}"
    );
}

fn forward_fields(session: u64, step: u64, payload: PayloadRef) -> Forward {
    Forward { shard: "bafkshard".into(), session, step, start: 0, capacity: 64, payload, then: Vec::new(), shadow: false }
}

/// Runs a coordinator's forward whose output should go to `then`, with the session's links
/// as `setup` left them, and checks that the output went to the coordinator in `Forwarded`
/// (after the outputs `before` says: a log line or a closed link).
fn check_fallback(setup: fn(&mut Session), then: Vec<NextHop>, pass_fails: bool, before: &[&str]) {
    let mut session = joined(1.0, BIG);
    setup(&mut session);
    let (frames, payload) = tensor_frames(50, vec![2, 4], &[1.0; 8]);
    send_frames(&mut session, &frames);
    handle(&mut session, 0.0, &CoordinatorMessage::Forward(Forward { then, ..forward_fields(6, 2, payload) }));
    let output = vec![0.25; 8];
    session.forwarded(20.0, 6, 2, 1.0, Ok((output.clone(), 4)));
    let mut out = drain(&mut session);
    if pass_fails {
        let [Output::Pass { link, session: 6, step: 2, .. }, _] = out[..] else { panic!("{out:?}") };
        session.passed(0.0, link, 6, 2, Err("contributor 7 took nothing for 30 s".into()));
        out = drain(&mut session);
    }
    let shown = format!("{out:?}");
    let (told, rest) = out.split_at(before.len());
    for (output, part) in told.iter().zip(before) {
        assert!(logged(output, part) || format!("{output:?}").contains(part), "{part:?} in {shown}");
    }
    let frames: Vec<Outgoing> = rest.iter().map_while(|o| if let Output::Send(m @ Outgoing::Binary(_)) = o { Some(m.clone()) } else { None }).collect();
    let (values, payload) = reassemble(&frames);
    assert_eq!(values, output);
    assert_eq!(sent(&rest[frames.len()]), ContributorMessage::Forwarded { session: 6, step: 2, payload, ms: 1.0 }, "{shown}");
}

#[test]
fn outputs_go_to_the_coordinator_when_no_link_to_the_next_stage_is_open() {
    fn nothing(_: &mut Session) {}
    fn offered(session: &mut Session) {
        handle(session, 0.0, &link(7, true));
        session.described(0.0, 1, Ok("v=0".into()));
        drain(session);
    }
    fn upstream(session: &mut Session) {
        open_link(session, 7, false, BIG);
    }
    fn small(session: &mut Session) {
        open_link(session, 7, true, 50);
    }
    fn open(session: &mut Session) {
        open_link(session, 7, true, BIG);
    }
    // No later stage named, or none linked.
    check_fallback(open, Vec::new(), false, &[]);
    check_fallback(nothing, vec![hop(7, "bafknext")], false, &[]);
    // Linked, but not open yet, or only as upstream.
    check_fallback(offered, vec![hop(7, "bafknext")], false, &[]);
    check_fallback(upstream, vec![hop(7, "bafknext")], false, &[]);
    // Its frames do not fit the channel.
    let too_big = "not passed on directly: a frame of 84 bytes exceeds the DataChannel's maxMessageSize of 50";
    check_fallback(small, vec![hop(7, "bafknext")], false, &[too_big]);
    // The send failed: the link closes, and the coordinator gets the output after all.
    let failed = "to contributor 7 closed: passing session 6 step 2 on failed: contributor 7 took nothing";
    check_fallback(open, vec![hop(7, "bafknext")], true, &[failed, "Close", "Links { open: 0 }"]);
}

fn check_bad_peer(send: impl Fn(&mut Session, u64), expected: &str) {
    let mut session = joined(1.0, BIG);
    let up = open_link(&mut session, 3, false, BIG);
    let down = open_link(&mut session, 7, true, BIG);
    let link = if expected.contains("this side offered") { down } else { up };
    send(&mut session, link);
    let out = drain(&mut session);
    let shown = format!("{out:?}");
    assert!(logged(&out[0], expected), "{expected:?} in {shown}");
    assert_eq!(out[1..3], [Output::Close { link }, links_open(1)], "{shown}");
    let ContributorMessage::Error { code: ErrorCode::Malformed, message } = sent(&out[3]) else { panic!("{shown}") };
    assert!(message.contains(expected) && message.ends_with("the direct channel is closed"), "{message}");
    assert_eq!(out.len(), 4, "{shown}");
    // Only that link: the other still carries forwards, and the coordinator's still run.
    let other = if link == up { down } else { up };
    assert!(session.links.iter().any(|l| l.number == other && matches!(l.state, LinkState::Open { .. })));
    let (frames, payload) = tensor_frames(50, vec![1, 2], &[1.0, 2.0]);
    send_frames(&mut session, &frames);
    assert!(matches!(handle(&mut session, 0.0, &forward(2, 2, 0, payload))[..], [Output::Span(_)]));
    // Its leftovers are closed again, and nothing more.
    session.link_message(0.0, link, Incoming::Text("x"));
    assert_eq!(drain(&mut session), [Output::Close { link }]);
}

#[test]
fn bad_messages_from_a_peer_close_its_link_only() {
    fn text(message: &'static str) -> impl Fn(&mut Session, u64) {
        move |session, link| session.link_message(0.0, link, Incoming::Text(message))
    }
    fn binary(frame: Vec<u8>) -> impl Fn(&mut Session, u64) {
        move |session, link| session.link_message(0.0, link, Incoming::Binary(&frame))
    }
    let blob = Chunker::new(3, PayloadKind::Blob, b"abc").unwrap().next().unwrap();
    let mut huge = Chunker::new(1, PayloadKind::Tensor, &vec![0; 70_000]).unwrap().next().unwrap();
    let total = MAX_HIDDEN_BYTES + 1;
    huge[20..24].copy_from_slice(&(tessera_protocol::frame::chunk_count(total) as u32).to_le_bytes());
    huge[24..32].copy_from_slice(&total.to_le_bytes());
    check_bad_peer(text("not json"), "sent a message that does not decode: ");
    check_bad_peer(text(r#"{"type":"welcome"}"#), "sent a message that does not decode: ");
    check_bad_peer(binary(vec![1, 2, 3]), "sent a message that does not decode: ");
    check_bad_peer(binary(blob), "sent a Blob frame (stream 3)");
    check_bad_peer(binary(huge), "sent a bad tensor frame");
    check_bad_peer(
        |session, link| {
            for stream in 0..=MAX_WAITING_TENSORS as u64 {
                for frame in tensor_frames(stream, vec![1, 1], &[1.0]).0 {
                    session.link_message(0.0, link, Incoming::Binary(&frame));
                }
            }
        },
        "others waiting for their forward",
    );
    check_bad_peer(
        |session, link| {
            let forward = forward_fields(5, 1, PayloadRef { stream: 9, bytes: 10 });
            session.link_message(0.0, link, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
        },
        "sent session 5 step 1: no tensor arrived on stream 9",
    );
    // Tensors that come on the coordinator's channel are not a peer's, nor the other way round.
    check_bad_peer(
        |session, link| {
            let (frames, payload) = tensor_frames(60, vec![1, 2], &[1.0, 2.0]);
            send_frames(session, &frames);
            let forward = forward_fields(5, 1, payload);
            session.link_message(0.0, link, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
        },
        "no tensor arrived on stream 60",
    );
    // A downstream peer sends nothing.
    check_bad_peer(text(r#"{"type":"forward"}"#), "on the channel this side offered");
}

fn standby(contributor: u64, shard: &str) -> Standby {
    Standby { contributor: ContributorId(contributor), shard: shard.into() }
}

/// The control messages a list of outputs sends the coordinator.
fn sent_all(out: &[Output]) -> Vec<ContributorMessage> {
    out.iter().filter(|o| matches!(o, Output::Send(Outgoing::Text(_)))).map(sent).collect()
}

#[test]
fn a_pass_sends_a_shadow_copy_to_each_standby_linked_and_open_after_the_real_one() {
    let mut session = joined(1.0, BIG);
    let down = open_link(&mut session, 7, true, BIG);
    let shadow_link = open_link(&mut session, 8, true, BIG);
    // Standby 10 is linked but its channel is not open yet; standby 11 is not linked; standby
    // 12 is linked only as upstream.
    handle(&mut session, 0.0, &link(10, true));
    open_link(&mut session, 12, false, BIG);
    drain(&mut session);
    let (frames, payload) = tensor_frames(50, vec![2, 4], &[1.0; 8]);
    send_frames(&mut session, &frames);
    let standbys = vec![standby(10, "bafkten"), standby(8, "bafkstandby"), standby(11, "bafkeleven"), standby(12, "bafktwelve")];
    let next = NextHop { standbys, ..hop(7, "bafknext") };
    let message = CoordinatorMessage::Forward(Forward { then: vec![next, hop(9, "bafklast")], ..forward_fields(6, 2, payload) });
    assert!(matches!(handle(&mut session, 0.0, &message)[..], [Output::Span(SpanJob::Forward { session: 6, step: 2, .. })]));

    let output = vec![0.25; 8];
    session.forwarded(20.0, 6, 2, 1.5, Ok((output.clone(), 4)));
    let out = drain(&mut session);
    let [Output::Pass { link, session: 6, step: 2, ref messages }, Output::SendOn { link: to_standby, messages: ref copy }, ref event] = out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((link, to_standby, event), (down, shadow_link, &Output::Event(Event::Forwarded { rows: 2, ms: 1.5 })));
    // The real pass names the rest of the route; the shadow copy, on its own stream, nothing.
    let (values, real) = reassemble(&messages[..messages.len() - 1]);
    assert_eq!(values, output);
    let Some(Outgoing::Text(text)) = messages.last() else { panic!("{messages:?}") };
    let Ok(PeerMessage::Forward(forward)) = decode_control::<PeerMessage>(text.as_bytes(), usize::MAX) else { panic!("{text}") };
    assert_eq!((forward.shard.as_str(), forward.then, forward.shadow, forward.payload), ("bafknext", vec![hop(9, "bafklast")], false, real));
    let (values, payload) = reassemble(&copy[..copy.len() - 1]);
    assert_eq!(values, output);
    assert_ne!(payload.stream, real.stream);
    let Some(Outgoing::Text(text)) = copy.last() else { panic!("{copy:?}") };
    let expected = Forward { shard: "bafkstandby".into(), session: 6, step: 2, start: 0, capacity: 64, payload, then: Vec::new(), shadow: true };
    assert_eq!(decode_control::<PeerMessage>(text.as_bytes(), usize::MAX).unwrap(), PeerMessage::Forward(expected));

    // The step is passed whatever becomes of the copy; a copy that fails only closes its link.
    session.passed(0.0, down, 6, 2, Ok(()));
    assert_eq!(sent_all(&drain(&mut session)), [ContributorMessage::Passed { session: 6, step: 2, to: ContributorId(7), ms: 1.5 }]);
    session.link_closed(0.0, shadow_link, "a shadow copy was not sent: gone".into());
    let out = drain(&mut session);
    assert!(logged(&out[0], "to contributor 8 closed: a shadow copy was not sent"), "{out:?}");
    assert_eq!(out[1..], [Output::Close { link: shadow_link }, links_open(2)]);

    // Output that goes to the coordinator instead sends no copy from here.
    let (frames, payload) = tensor_frames(51, vec![1, 4], &[1.0; 4]);
    send_frames(&mut session, &frames);
    let next = NextHop { standbys: vec![standby(12, "bafktwelve")], ..hop(11, "bafknext") };
    handle(&mut session, 0.0, &CoordinatorMessage::Forward(Forward { then: vec![next], ..forward_fields(6, 3, payload) }));
    session.forwarded(30.0, 6, 3, 1.0, Ok((vec![0.5; 4], 4)));
    let out = drain(&mut session);
    assert!(out.iter().all(|o| matches!(o, Output::Send(_) | Output::Event(_))), "{out:?}");
    assert!(matches!(sent_all(&out)[..], [ContributorMessage::Forwarded { session: 6, step: 3, .. }]), "{out:?}");
}

#[test]
fn a_shadow_forward_runs_as_any_other_and_answers_nothing() {
    let mut session = joined(1.0, BIG);
    let up = open_link(&mut session, 3, false, BIG);
    open_link(&mut session, 7, true, BIG);
    // The coordinator's own step for session 5 step 1 comes first, then a shadow copy of the
    // same step from upstream (through another span held here): both run, in order.
    let (frames, payload) = tensor_frames(50, vec![1, 2], &[1.0, 2.0]);
    send_frames(&mut session, &frames);
    let mut out = handle(&mut session, 0.0, &CoordinatorMessage::Forward(forward_fields(5, 1, payload)));
    let hidden = [3.0, 4.0];
    let (frames, payload) = tensor_frames(4, vec![1, 2], &hidden);
    for frame in &frames {
        session.link_message(0.0, up, Incoming::Binary(frame));
    }
    // A `then` on a shadow copy is ignored: nothing is passed on from a standby.
    let forward = Forward { shard: "bafkstandby".into(), session: 5, step: 1, start: 3, capacity: 64, payload, then: vec![hop(7, "bafknext")], shadow: true };
    session.link_message(0.0, up, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
    out.extend(drain(&mut session));
    let job = SpanJob::Forward { shard: "bafkstandby".into(), session: 5, step: 1, start: 3, capacity: 64, rows: 1, hidden: hidden.to_vec() };
    assert!(matches!(&out[..], [Output::Span(SpanJob::Forward { shard, .. }), Output::Span(shadow)] if shard == "bafkshard" && *shadow == job), "{out:?}");
    // Span jobs like any others: through two spans, two batches.
    let mut queue: VecDeque<SpanJob> = out.into_iter().map(|o| if let Output::Span(job) = o { job } else { unreachable!() }).collect();
    assert_eq!(next_span_jobs(&mut queue, EXACT_BATCH_ROWS).len(), 1);
    assert_eq!(next_span_jobs(&mut queue, EXACT_BATCH_ROWS), [job]);

    session.forwarded(10.0, 5, 1, 1.0, Ok((vec![0.5; 2], 2)));
    assert!(matches!(sent_all(&drain(&mut session))[..], [ContributorMessage::Forwarded { session: 5, step: 1, .. }]));
    // The shadow step's output goes nowhere; the page counts it.
    session.forwarded(11.0, 5, 1, 2.0, Ok((vec![0.5; 2], 2)));
    assert_eq!(drain(&mut session), [Output::Event(Event::Forwarded { rows: 1, ms: 2.0 })]);

    // A shadow copy from the coordinator that fails (its session started before this standby
    // did, say) is only logged.
    let (frames, payload) = tensor_frames(51, vec![1, 2], &[1.0, 2.0]);
    send_frames(&mut session, &frames);
    let message = CoordinatorMessage::Forward(Forward { shadow: true, ..forward_fields(6, 2, payload) });
    assert!(matches!(handle(&mut session, 0.0, &message)[..], [Output::Span(SpanJob::Forward { session: 6, step: 2, .. })]));
    session.forwarded(20.0, 6, 2, 1.0, Err("session 6 is not held here".into()));
    let out = drain(&mut session);
    assert!(matches!(&out[..], [o] if logged(o, "session 6 step 2 (a shadow copy) failed: session 6 is not held here")), "{out:?}");
    // And so is one whose tensor never came, from the coordinator; from a peer, its link closes.
    let message = CoordinatorMessage::Forward(Forward { shadow: true, ..forward_fields(6, 3, PayloadRef { stream: 99, bytes: 8 }) });
    let out = handle(&mut session, 0.0, &message);
    assert!(matches!(&out[..], [o] if logged(o, "no tensor arrived on stream 99")), "{out:?}");
    let forward = Forward { shadow: true, ..forward_fields(6, 4, PayloadRef { stream: 98, bytes: 8 }) };
    session.link_message(0.0, up, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
    let out = drain(&mut session);
    assert!(sent_all(&out).is_empty(), "{out:?}");
    assert!(logged(&out[0], "from contributor 3 closed: sent session 6 step 4 (a shadow copy): no tensor arrived on stream 98"), "{out:?}");
}
