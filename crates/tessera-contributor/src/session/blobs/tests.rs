//! Fetching, borrowing and lending driven by hand, with a native contributor's policy: each
//! way a lender can fail (or lie) is a row, and ends with the next source being tried.

#![allow(clippy::unwrap_used)]

use tessera_protocol::{Blocks, Chunker, CoordinatorMessage, PROTOCOL_VERSION, SignalPayload, decode_control};

use super::*;
use crate::session::tests::{drain, handle, sent};
use crate::session::{ChannelPurpose, Policy};

const BIG: usize = 256 << 10;
const SHARD: &str = "bafkshard";

fn with_policy(policy: Policy) -> Session {
    let capabilities = crate::session::tests::capabilities();
    let mut session = Session::new(capabilities, policy, 1.0, BIG);
    let hello = drain(&mut session);
    let ContributorMessage::Hello { capabilities, .. } = sent(&hello[0]) else { panic!("{hello:?}") };
    assert_eq!(capabilities.lends_blobs, policy.lends_blobs && policy.links, "the hello says what the policy lends");
    let welcome = CoordinatorMessage::Welcome { protocol_version: PROTOCOL_VERSION, contributor: ContributorId(1), heartbeat_interval_ms: 60_000 };
    handle(&mut session, 0.0, &welcome);
    session
}

fn native() -> Session {
    with_policy(Policy::NATIVE)
}

/// The control messages among `outputs`.
fn said(outputs: &[Output]) -> Vec<ContributorMessage> {
    outputs.iter().filter(|o| matches!(o, Output::Send(Outgoing::Text(_)))).map(sent).collect()
}

fn load_span(peers: &[u64]) -> CoordinatorMessage {
    CoordinatorMessage::LoadSpan {
        model: "smollm2".into(),
        shard: SHARD.into(),
        blocks: Blocks { start: 0, end: 10 },
        max_sessions: 4,
        peers: peers.iter().map(|&p| ContributorId(p)).collect(),
    }
}

fn check(cid: &str) -> Output {
    Output::Blob(BlobJob::Check { cid: cid.into() })
}

fn blob_frames(stream: u64, bytes: &[u8]) -> Vec<Vec<u8>> {
    Chunker::new(stream, PayloadKind::Blob, bytes).unwrap().collect()
}

/// The bytes of a shard: large enough for two frames.
fn shard_bytes() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 251) as u8).collect()
}

/// A `LoadSpan` naming `lenders`, with the cache not holding the shard: the offer to the first
/// lender, answered and open, and the request it sends. The borrowing link's number.
fn borrowing(session: &mut Session, now: Millis, lenders: &[u64]) -> u64 {
    assert_eq!(handle(session, now, &load_span(lenders)), [check(SHARD)]);
    session.blob_checked(now, SHARD, false);
    offered(session, now, lenders[0])
}

/// After an `Output::Offer` to `lender` for blobs: described, answered, open; the link.
fn offered(session: &mut Session, now: Millis, lender: u64) -> u64 {
    let out = drain(session);
    let [Output::Offer { link, peer }] = out[..] else { panic!("{out:?}") };
    assert_eq!(peer, ContributorId(lender));
    session.described(now, link, Ok("v=0 offer".into()));
    let offer = SignalPayload::Offer { sdp: "v=0 offer".into(), purpose: ChannelPurpose::Blobs };
    assert_eq!(said(&drain(session)), [ContributorMessage::Signal { from: ContributorId(1), to: peer, payload: offer }]);
    let answer = CoordinatorMessage::Signal { from: peer, to: ContributorId(1), payload: SignalPayload::Answer { sdp: "v=0 answer".into() } };
    assert_eq!(handle(session, now, &answer), [Output::Accept { link, sdp: "v=0 answer".into() }]);
    session.link_open(now, link, BIG);
    let out = drain(session);
    let request = PeerMessage::BlobRequest { cid: SHARD.into(), offset: 0, length: 0, stream: BORROW_STREAM };
    assert!(out.contains(&Output::SendOn { link, messages: vec![Outgoing::Text(encode_control(&request))] }), "{out:?}");
    link
}

fn lender_sends(session: &mut Session, now: Millis, link: u64, frames: &[Vec<u8>]) -> Vec<Output> {
    for frame in frames {
        session.link_message(now, link, Incoming::Binary(frame));
    }
    drain(session)
}

#[test]
fn a_shard_comes_from_its_lender_checked_and_the_span_loads() {
    let mut session = native();
    let link = borrowing(&mut session, 0.0, &[3, 4]);
    let bytes = shard_bytes();
    let out = lender_sends(&mut session, 500.0, link, &blob_frames(BORROW_STREAM, &bytes));
    assert!(out.contains(&Output::Close { link }), "the borrowing channel closes once the blob is in: {out:?}");
    assert_eq!(out.last(), Some(&Output::Blob(BlobJob::Store { cid: SHARD.into(), bytes })));
    session.blob_stored(600.0, SHARD, Ok(()));
    let out = drain(&mut session);
    assert!(matches!(&out[0], Output::Log(line) if line.contains("fetched bafkshard from contributor 3 (100000 bytes")), "{out:?}");
    assert_eq!(out[1..], [Output::Span(SpanJob::Load { shard: SHARD.into(), blocks: 0..10, max_sessions: 4 })]);
    session.span_loaded(700.0, SHARD.into(), 0..10, Ok(()));
    let out = drain(&mut session);
    assert_eq!(said(&out), [ContributorMessage::SpanReady { shard: SHARD.into(), fetched_from: Some(ContributorId(3)) }]);
}

/// Each way lender 3 fails: what happens to it (at 1 s after its channel opened), the time it
/// is found out, whether it is reported `corrupt`, and part of the message. The next lender
/// is offered a channel every time, and none of lender 3's bytes is kept.
#[test]
fn a_lender_that_fails_or_lies_is_reported_and_the_next_source_tried() {
    type Fail = fn(&mut Session, u64);
    let refuse: Fail = |s, link| {
        let refusal = PeerMessage::Error { code: ErrorCode::BlobNotFound, message: "no such blob".into() };
        s.link_message(1_000.0, link, Incoming::Text(&encode_control(&refusal)));
    };
    let bad_frame: Fail = |s, link| s.link_message(1_000.0, link, Incoming::Binary(b"TSRA but no frame"));
    let tensor: Fail = |s, link| {
        let frames: Vec<Vec<u8>> = Chunker::new(BORROW_STREAM, PayloadKind::Tensor, b"abc").unwrap().collect();
        s.link_message(1_000.0, link, Incoming::Binary(&frames[0]));
    };
    let forward: Fail = |s, link| {
        let forward = tessera_protocol::Forward {
            shard: SHARD.into(),
            session: 1,
            step: 1,
            start: 0,
            capacity: 8,
            payload: tessera_protocol::PayloadRef { stream: 1, bytes: 1 },
            then: Vec::new(),
            shadow: false,
        };
        s.link_message(1_000.0, link, Incoming::Text(&encode_control(&PeerMessage::Forward(forward))));
    };
    let closes: Fail = |s, link| s.link_closed(1_000.0, link, "contributor 3 closed it".into());
    let stalls: Fail = |s, link| {
        // Fast enough (8 MB in the first second, all but the last frame), then nothing.
        let frames = blob_frames(BORROW_STREAM, &vec![7; 8 << 20]);
        for frame in &frames[..frames.len() - 1] {
            s.link_message(1_000.0, link, Incoming::Binary(frame));
        }
        s.handle_timeout(20_999.0);
        assert!(said(&drain(s)).is_empty(), "20 s without a byte is allowed");
        s.handle_timeout(21_000.0);
    };
    let trickles: Fail = |s, link| {
        // The first of two frames at 5 s, and nothing more by the time its bytes at 256 KiB/s and
        // the grace after them are over.
        let frames = blob_frames(BORROW_STREAM, &shard_bytes());
        s.link_message(5_000.0, link, Incoming::Binary(&frames[0]));
        trickled(s, 5_000.0);
    };
    let claims_a_big_blob: Fail = |s, link| {
        // The same, with a first frame whose header says 64 MiB are coming: what a lender says
        // is still to come buys it no time.
        let mut frame = blob_frames(BORROW_STREAM, &shard_bytes()).swap_remove(0);
        let total: u64 = 64 << 20;
        frame[20..24].copy_from_slice(&(total.div_ceil(tessera_protocol::MAX_CHUNK_PAYLOAD as u64) as u32).to_le_bytes());
        frame[24..32].copy_from_slice(&total.to_le_bytes());
        s.link_message(5_000.0, link, Incoming::Binary(&frame));
        trickled(s, 5_000.0);
    };
    let silent: Fail = |s, _| {
        s.handle_timeout(59_999.0);
        assert!(said(&drain(s)).is_empty(), "a lender may read its disk for a minute first");
        s.handle_timeout(60_000.0);
    };
    let corrupt: Fail = |s, link| {
        drain(s);
        let out = lender_sends(s, 1_000.0, link, &blob_frames(BORROW_STREAM, &shard_bytes()));
        assert!(matches!(out.last(), Some(Output::Blob(BlobJob::Store { .. }))), "{out:?}");
        s.blob_stored(1_000.0, SHARD, Err(StoreError { corrupt: true, message: "sha2-256 mismatch".into() }));
    };
    let never_answers: Fail = |s, _| s.handle_timeout(BORROW_ANSWER_MS);
    let cases: [(&str, Fail, bool, &str); 11] = [
        ("refuses", refuse, false, "it refused (BlobNotFound): no such blob"),
        ("a bad frame", bad_frame, false, "does not decode"),
        ("a tensor", tensor, false, "Tensor payload"),
        ("a forward", forward, false, "other than the blob"),
        ("closes", closes, false, "contributor 3 closed it"),
        ("stalls", stalls, false, "nothing arrived for 20 s"),
        ("trickles", trickles, false, "65536 bytes in 10 s is too slow"),
        ("claims a big blob and trickles", claims_a_big_blob, false, "65536 bytes in 10 s is too slow"),
        ("sends nothing", silent, false, "nothing arrived for 60 s"),
        ("sends corrupt bytes", corrupt, true, "sha2-256 mismatch"),
        ("never answers", never_answers, false, "did not open within 30 s"),
    ];
    for (what, fail, corrupt, message) in cases {
        let mut session = native();
        let link = if what == "never answers" {
            assert_eq!(handle(&mut session, 0.0, &load_span(&[3, 4])), [check(SHARD)]);
            session.blob_checked(0.0, SHARD, false);
            let out = drain(&mut session);
            let [Output::Offer { link, .. }] = out[..] else { panic!("{out:?}") };
            link
        } else {
            borrowing(&mut session, 0.0, &[3, 4])
        };
        fail(&mut session, link);
        let out = drain(&mut session);
        let reports: Vec<ContributorMessage> = said(&out);
        let Some(ContributorMessage::BorrowFailed { lender, cid, corrupt: reported, message: said }) =
            reports.iter().find(|m| matches!(m, ContributorMessage::BorrowFailed { .. })).cloned()
        else {
            panic!("{what}: {out:?}")
        };
        assert_eq!((lender, cid.as_str(), reported), (ContributorId(3), SHARD, corrupt), "{what}");
        assert!(said.contains(message), "{what}: {said:?} should say {message:?}");
        assert!(!out.iter().any(|o| matches!(o, Output::Span(_))), "{what}: nothing loads from lender 3");
        assert!(matches!(out.last(), Some(Output::Offer { peer: ContributorId(4), .. })), "{what}: lender 4 is tried next: {out:?}");
        if what != "never answers" && what != "sends corrupt bytes" && what != "closes" {
            assert!(out.contains(&Output::Close { link }), "{what}: lender 3's channel closes: {out:?}");
        }
    }
}

/// After 64 KiB that came at `first`: the borrow is too slow once their time at 256 KiB/s and
/// the grace are over, and not a millisecond before.
fn trickled(session: &mut Session, first: Millis) {
    let behind_at = first + BORROW_GRACE_MS + 65_536.0 * 1000.0 / MIN_BORROW_RATE;
    assert_eq!(session.poll_timeout(), Some(behind_at));
    session.handle_timeout(behind_at - 1.0);
    assert!(said(&drain(session)).is_empty(), "not too slow yet");
    session.handle_timeout(behind_at);
}

#[test]
fn with_no_lender_left_the_coordinator_sends_the_shard() {
    let mut session = native();
    assert_eq!(handle(&mut session, 0.0, &load_span(&[])), [check(SHARD)]);
    session.blob_checked(0.0, SHARD, false);
    let out = drain(&mut session);
    let [ContributorMessage::BlobRequest { ref cid, offset: 0, length: 0, stream }] = said(&out)[..] else { panic!("{out:?}") };
    assert_eq!(cid, SHARD);
    // Frames on another stream, or of another kind, are nobody's: ignored, never stored.
    for frame in blob_frames(stream + 1, b"unasked").iter().chain(&Chunker::new(stream, PayloadKind::Tensor, b"x").unwrap().collect::<Vec<_>>()) {
        session.handle(1.0, Incoming::Binary(frame));
    }
    assert!(drain(&mut session).iter().all(|o| !matches!(o, Output::Blob(_))));
    let bytes = shard_bytes();
    for frame in blob_frames(stream, &bytes) {
        session.handle(2.0, Incoming::Binary(&frame));
    }
    assert_eq!(drain(&mut session), [Output::Blob(BlobJob::Store { cid: SHARD.into(), bytes })]);
    session.blob_stored(3.0, SHARD, Ok(()));
    assert!(drain(&mut session).contains(&Output::Span(SpanJob::Load { shard: SHARD.into(), blocks: 0..10, max_sessions: 4 })));

    // A shard the coordinator does not have fails the span, which it then places elsewhere.
    let mut session = native();
    handle(&mut session, 0.0, &load_span(&[]));
    session.blob_checked(0.0, SHARD, false);
    drain(&mut session);
    let out = handle(&mut session, 1.0, &CoordinatorMessage::Error { code: ErrorCode::BlobNotFound, message: "no blob bafkshard".into() });
    let Some(ContributorMessage::Error { code: ErrorCode::SpanFailed, message }) = said(&out).pop() else { panic!("{out:?}") };
    assert!(message.contains("could not be fetched: the coordinator has no such blob"), "{message}");
    // A shard the cache holds loads at once.
    let mut session = native();
    handle(&mut session, 0.0, &load_span(&[3]));
    session.blob_checked(0.0, SHARD, true);
    assert_eq!(drain(&mut session), [Output::Span(SpanJob::Load { shard: SHARD.into(), blocks: 0..10, max_sessions: 4 })]);
}

#[test]
fn shards_are_fetched_ahead_one_at_a_time_and_announced() {
    let mut session = native();
    let prefetch = CoordinatorMessage::Prefetch { blobs: vec!["bafka".into(), "bafkb".into(), "not a cid!".into()], lenders: Default::default() };
    let out = handle(&mut session, 0.0, &prefetch);
    assert_eq!(out[0], check("bafka"));
    assert!(matches!(&out[1], Output::Log(line) if line.contains("not prefetching \"not a cid!\"")), "{out:?}");
    session.blob_checked(1.0, "bafka", true);
    let out = drain(&mut session);
    assert_eq!(said(&out), [ContributorMessage::BlobHave { cids: vec!["bafka".into()] }]);
    assert_eq!(out.last(), Some(&check("bafkb")), "the next one starts once the first is in");
    // A load of a shard waiting to be fetched ahead starts it at once.
    let mut session = native();
    handle(&mut session, 0.0, &CoordinatorMessage::Prefetch { blobs: vec!["bafka".into(), SHARD.into()], lenders: Default::default() });
    assert_eq!(handle(&mut session, 0.0, &load_span(&[])), [check(SHARD)]);
    // A tab fetches nothing ahead.
    let mut tab = with_policy(Policy::TAB);
    assert_eq!(handle(&mut tab, 0.0, &prefetch), []);
}

#[test]
fn the_glue_asks_for_a_unit_models_blobs() {
    let mut session = native();
    session.fetch(0.0, "bafkmodel".into());
    assert_eq!(drain(&mut session), [check("bafkmodel")]);
    session.blob_checked(1.0, "bafkmodel", true);
    assert_eq!(drain(&mut session), [Output::Fetched { cid: "bafkmodel".into(), result: Ok(()) }]);
    session.fetch(2.0, "../etc/passwd".into());
    assert!(matches!(&drain(&mut session)[..], [Output::Fetched { result: Err(e), .. }] if e.contains("not a CID")));
    let mut tab = with_policy(Policy::TAB);
    tab.fetch(0.0, "bafkmodel".into());
    assert!(matches!(&drain(&mut tab)[..], [Output::Fetched { result: Err(e), .. }] if e.contains("fetches no blobs")));
}

/// An offer from `peer` of a channel for blobs, and what comes out.
fn borrower_offers(session: &mut Session, now: Millis, peer: u64) -> Vec<Output> {
    let payload = SignalPayload::Offer { sdp: "v=0 borrow".into(), purpose: ChannelPurpose::Blobs };
    handle(session, now, &CoordinatorMessage::Signal { from: ContributorId(peer), to: ContributorId(1), payload })
}

fn request(cid: &str, stream: u64) -> String {
    encode_control(&PeerMessage::BlobRequest { cid: cid.into(), offset: 0, length: 0, stream })
}

fn lent_link(session: &mut Session, now: Millis, peer: u64) -> u64 {
    let out = borrower_offers(session, now, peer);
    let [Output::Answer { link, .. }] = out[..] else { panic!("{out:?}") };
    session.described(now, link, Ok("v=0 answer".into()));
    drain(session);
    session.link_open(now, link, BIG);
    drain(session);
    link
}

#[test]
fn a_lend_serves_its_borrower_the_blobs_lent_each_once() {
    let mut session = native();
    assert!(borrower_offers(&mut session, 0.0, 5).iter().any(|o| matches!(o, Output::Log(l) if l.contains("nothing is lent to it"))));
    handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(5), blobs: vec!["bafka".into()] });
    let link = lent_link(&mut session, 0.0, 5);
    // One channel at a time.
    assert!(borrower_offers(&mut session, 0.0, 5).iter().all(|o| !matches!(o, Output::Answer { .. })));
    session.link_message(1.0, link, Incoming::Text(&request("bafka", 7)));
    assert_eq!(drain(&mut session), [Output::Blob(BlobJob::Read { link, stream: 7, cid: "bafka".into(), offset: 0, length: 0 })]);
    let bytes = shard_bytes();
    session.blob_read(2.0, link, 7, "bafka", Ok(bytes.clone()));
    let out = drain(&mut session);
    let Some(Output::SendOn { link: on, messages }) = out.last() else { panic!("{out:?}") };
    assert_eq!(*on, link);
    let mut reassembler = Reassembler::default();
    let mut got = None;
    for message in messages {
        let Outgoing::Binary(frame) = message else { panic!("{message:?}") };
        let Ok(Decoded::Chunk(chunk)) = decode::<PeerMessage>(Incoming::Binary(frame)) else { panic!() };
        got = reassembler.push(chunk).unwrap().or(got);
    }
    let got = got.unwrap();
    assert_eq!((got.stream, got.kind, got.bytes), (7, PayloadKind::Blob, bytes));
    // Sent once: asked again, and for what was never lent, it refuses (the channel stays).
    for cid in ["bafka", "bafkother"] {
        session.link_message(3.0, link, Incoming::Text(&request(cid, 8)));
        let out = drain(&mut session);
        let [Output::SendOn { ref messages, .. }] = out[..] else { panic!("{out:?}") };
        let Outgoing::Text(text) = &messages[0] else { panic!() };
        let refusal: PeerMessage = decode_control(text.as_bytes(), usize::MAX).unwrap();
        assert!(matches!(refusal, PeerMessage::Error { code: ErrorCode::BlobNotFound, ref message } if message.contains("not lent to contributor 5")));
    }
}

/// What a borrower sends that ends its channel: each row is a message and part of the reason.
#[test]
fn anything_but_a_blob_request_ends_the_lent_channel() {
    let forward = encode_control(&PeerMessage::Error { code: ErrorCode::Internal, message: "x".into() });
    let long = format!("{{\"type\":\"blob_request\",\"cid\":\"{}\",\"offset\":0,\"length\":0,\"stream\":1}}", "a".repeat(2000));
    let cases: [(Incoming, &str); 4] = [
        (Incoming::Binary(b"TSRA"), "binary data"),
        (Incoming::Text(&forward), "other than a blob request"),
        (Incoming::Text("{\"type\":\"heartbeat\"}"), "does not decode"),
        (Incoming::Text(&long), "does not decode"),
    ];
    for (message, expected) in cases {
        let mut session = native();
        handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(5), blobs: vec!["bafka".into()] });
        let link = lent_link(&mut session, 0.0, 5);
        session.link_message(1.0, link, message);
        let out = drain(&mut session);
        assert!(matches!(&out[0], Output::Log(line) if line.contains(expected)), "{expected}: {out:?}");
        assert!(out.contains(&Output::Close { link }), "{out:?}");
        // The blob was not sent: the borrower may offer another channel within the window.
        assert!(borrower_offers(&mut session, 2.0, 5).iter().any(|o| matches!(o, Output::Answer { .. })), "{expected}");
    }
    // More requests than a channel takes.
    let mut session = native();
    handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(5), blobs: vec!["bafka".into()] });
    let link = lent_link(&mut session, 0.0, 5);
    for _ in 0..MAX_REQUESTS {
        session.link_message(1.0, link, Incoming::Text(&request("bafkother", 1)));
    }
    assert!(!drain(&mut session).contains(&Output::Close { link }));
    session.link_message(1.0, link, Incoming::Text(&request("bafkother", 1)));
    assert!(drain(&mut session).contains(&Output::Close { link }));
}

#[test]
fn lends_are_bounded_and_expire() {
    let mut session = native();
    for peer in 0..=MAX_LENDS as u64 {
        handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(10 + peer), blobs: vec!["bafka".into()] });
    }
    assert!(borrower_offers(&mut session, 1.0, 10 + MAX_LENDS as u64).iter().all(|o| !matches!(o, Output::Answer { .. })), "over the bound");
    // Past the window, a borrower that never offered is gone, and its place is free.
    assert!(borrower_offers(&mut session, LEND_WINDOW_MS, 10).iter().all(|o| !matches!(o, Output::Answer { .. })), "too late");
    handle(&mut session, LEND_WINDOW_MS, &CoordinatorMessage::Lend { peer: ContributorId(99), blobs: vec!["bafka".into()] });
    let link = lent_link(&mut session, LEND_WINDOW_MS, 99);
    // A lent channel lasts `LEND_TIME_MS` at most.
    session.handle_timeout(LEND_WINDOW_MS + LEND_TIME_MS);
    assert!(drain(&mut session).contains(&Output::Close { link }));
    // A tab lends nothing, and says so only of an offer.
    let mut tab = with_policy(Policy::TAB);
    assert_eq!(handle(&mut tab, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(5), blobs: vec!["bafka".into()] }), []);
    assert!(borrower_offers(&mut tab, 0.0, 5).iter().any(|o| matches!(o, Output::Log(l) if l.contains("lends none"))));
}

#[test]
fn without_direct_channels_a_shard_comes_from_the_coordinator() {
    let mut session = with_policy(Policy { links: false, ..Policy::NATIVE });
    let out = handle(&mut session, 0.0, &CoordinatorMessage::Link { peer: ContributorId(3), offer: true });
    assert!(matches!(&out[..], [Output::Log(line)] if line.contains("--no-links")), "{out:?}");
    assert_eq!(handle(&mut session, 0.0, &CoordinatorMessage::Link { peer: ContributorId(4), offer: true }), [], "said once");
    handle(&mut session, 0.0, &load_span(&[3]));
    session.blob_checked(0.0, SHARD, false);
    assert!(matches!(said(&drain(&mut session))[..], [ContributorMessage::BlobRequest { .. }]));
}

#[test]
fn an_unload_while_the_shard_is_fetched_loads_nothing() {
    let mut session = native();
    handle(&mut session, 0.0, &load_span(&[]));
    handle(&mut session, 0.0, &CoordinatorMessage::UnloadSpan { shard: SHARD.into() });
    session.blob_checked(0.0, SHARD, true);
    assert!(!drain(&mut session).iter().any(|o| matches!(o, Output::Span(SpanJob::Load { .. }))));
}

/// Noise from the network, on every kind of channel a native contributor has (the coordinator's,
/// a link for forwards each way, a borrowing and a lent one): frames with a valid header and
/// random bodies, control messages of every type with random fields, and plain garbage. Nothing
/// panics, and what the coordinator sends wrong ends the session while what a peer sends wrong
/// closes that link only.
#[test]
fn noise_from_anyone_panics_nothing() {
    let mut seed = 0x5eed_u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let z = (seed ^ (seed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb) ^ (z >> 31)
    };
    let types = ["welcome", "assign", "forward", "signal", "link", "lend", "blob_request", "error", "prefetch", "load_span", "passed", "heartbeat"];
    let mut noise = |n: u64| -> Vec<Wire> {
        (0..n)
            .map(|i| match next() % 3 {
                0 => {
                    let mut frame = b"TSRA".to_vec();
                    frame.extend((0..28 + next() % 100).map(|_| next() as u8));
                    Wire::Binary(frame)
                }
                1 => {
                    let kind = types[(next() % types.len() as u64) as usize];
                    let number = next() % 1_000_000;
                    Wire::Text(format!(
                        "{{\"type\":\"{kind}\",\"session\":{number},\"step\":{i},\"stream\":{number},\"cid\":\"bafk{number}\",\"peer\":{number},\"from\":{number},\"to\":1}}"
                    ))
                }
                _ => Wire::Binary((0..next() % 64).map(|_| next() as u8).collect()),
            })
            .collect()
    };
    for round in 0..20 {
        let mut session = native();
        handle(&mut session, 0.0, &CoordinatorMessage::Lend { peer: ContributorId(5), blobs: vec!["bafka".into()] });
        let lent = lent_link(&mut session, 0.0, 5);
        let borrow = borrowing(&mut session, 0.0, &[3]);
        let (up, down) = (link_both_ways(&mut session, 7, false), link_both_ways(&mut session, 8, true));
        for wire in noise(200) {
            for link in [lent, borrow, up, down] {
                session.link_message(1.0, link, wire.incoming());
            }
        }
        let peers_only = drain(&mut session);
        assert!(!peers_only.iter().any(|o| matches!(o, Output::Restart(_))), "round {round}: a peer ended the session");
        for wire in noise(50) {
            session.handle(2.0, wire.incoming());
        }
        session.handle_timeout(1e9);
        drain(&mut session);
    }
}

enum Wire {
    Text(String),
    Binary(Vec<u8>),
}

impl Wire {
    fn incoming(&self) -> Incoming<'_> {
        match self {
            Wire::Text(text) => Incoming::Text(text),
            Wire::Binary(bytes) => Incoming::Binary(bytes),
        }
    }
}

/// An open link for forwards with `peer`, offered by this side (`offer`) or by the peer.
fn link_both_ways(session: &mut Session, peer: u64, offer: bool) -> u64 {
    let out = handle(session, 0.0, &CoordinatorMessage::Link { peer: ContributorId(peer), offer });
    let link = if offer {
        let [Output::Offer { link, .. }] = out[..] else { panic!("{out:?}") };
        session.described(0.0, link, Ok("v=0".into()));
        let answer = SignalPayload::Answer { sdp: "v=0 answer".into() };
        handle(session, 0.0, &CoordinatorMessage::Signal { from: ContributorId(peer), to: ContributorId(1), payload: answer });
        link
    } else {
        let offer = SignalPayload::Offer { sdp: "v=0 offer".into(), purpose: ChannelPurpose::Forwards };
        let out = handle(session, 0.0, &CoordinatorMessage::Signal { from: ContributorId(peer), to: ContributorId(1), payload: offer });
        let [Output::Answer { link, .. }] = out[..] else { panic!("{out:?}") };
        session.described(0.0, link, Ok("v=0".into()));
        link
    };
    session.link_open(0.0, link, BIG);
    drain(session);
    link
}
