//! Blobs, where the [`Policy`] says so: fetching, fetching ahead, borrowing and lending.
//!
//! A fetch makes sure the glue's cache holds a blob, checked against its CID: the glue checks
//! its cache first (`BlobJob::Check`); then each peer told to lend it (`LoadSpan::peers`,
//! `Prefetch::lenders`) is tried in turn over a channel this side offers for blobs
//! (`ChannelPurpose::Blobs`), asking with a `PeerMessage::BlobRequest` and reassembling the
//! `Blob` frames; then the coordinator, over its channel. Whatever arrives is handed to the glue
//! to check and keep (`BlobJob::Store`); a lender whose bytes fail (or that refuses, stalls,
//! trickles or does not answer) is reported with `BorrowFailed` and the next source is tried.
//! A span's load is handed out once its shard is in; a shard fetched ahead is announced with
//! `BlobHave`, so the coordinator may name this contributor as a lender; a blob the glue asked
//! for (a unit's model) comes back as `Output::Fetched`. Shards fetched ahead go one at a time.
//!
//! A `Lend` lets its borrower offer a channel (one at a time, within `LEND_WINDOW_MS`) and fetch
//! the blobs lent, and only those, each once, read from the verified cache (`BlobJob::Read`);
//! anything but a blob request ends the channel, and at most `MAX_LENDS` borrowers are served.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use tessera_protocol::{
    Chunk, ContributorId, ContributorMessage, Decoded, ErrorCode, Incoming, MAX_PREFETCH, PayloadKind, PeerMessage, Reassembler, ReassemblyLimits, decode,
    decode_control, encode_control,
};

use super::{Inbox, LinkState, MAX_BLOB_BYTES, Millis, Outgoing, Output, Purpose, Session, SpanJob, frames_on};

/// The most borrowers lent to at once; more `Lend`s are refused (the borrower then fetches
/// from the coordinator).
pub const MAX_LENDS: usize = 4;
/// How long a borrower has to offer its channel after the `Lend` (or after its last channel
/// closed with blobs still lent).
const LEND_WINDOW_MS: Millis = 60_000.0;
/// How long a lent channel stays open at most, whatever the borrower does.
pub(super) const LEND_TIME_MS: Millis = 600_000.0;
/// Blob requests served over one lent channel (a span's shard takes one).
const MAX_REQUESTS: usize = 16;
/// The longest request a borrower may send (a CID and three numbers take far less).
const MAX_REQUEST_BYTES: usize = 1024;
/// Blobs one `Lend` may name (a few shards; more is a coordinator at fault).
const MAX_LENT_BLOBS: usize = 64;
/// How long a lender may take to answer this side's offer and open the channel: the offer and
/// the answer go through the coordinator, and three busy processes make the connection (one
/// that refused the `Lend` never answers, and costs this much).
pub(super) const BORROW_ANSWER_MS: Millis = 30_000.0;
/// How long a lender may take to send the first byte once the channel is open (it reads the
/// shard from its disk first).
const BORROW_FIRST_BYTE_MS: Millis = 60_000.0;
/// How long a borrower waits for the next part of a blob before trying elsewhere.
const BORROW_IDLE_MS: Millis = 20_000.0;
/// From its first byte, a blob must keep coming at `MIN_BORROW_RATE` bytes a second on average,
/// after a grace of `BORROW_GRACE_MS`: a trickle would hold the span's load up for good,
/// and a lender starved of CPU for a while still makes it.
const BORROW_GRACE_MS: Millis = 10_000.0;
const MIN_BORROW_RATE: f64 = 256.0 * 1024.0;
/// The stream a borrower asks its blob on (one request per channel).
const BORROW_STREAM: u64 = 1;

/// Work on the glue's blob cache.
#[derive(Debug, Clone, PartialEq)]
pub enum BlobJob {
    /// Does the cache hold `cid`, intact (hashed again: a file altered on disk is fetched
    /// again, never used)? Report with [`Session::blob_checked`].
    Check { cid: String },
    /// Check `bytes` against `cid` and keep them in the cache only if they match; report with
    /// [`Session::blob_stored`].
    Store { cid: String, bytes: Vec<u8> },
    /// Read bytes `offset..offset + length` (`length` 0: to the end) of `cid` from the verified
    /// cache, for the borrower on `link`, who asked for them on `stream`; report with
    /// [`Session::blob_read`].
    Read { link: u64, stream: u64, cid: String, offset: u64, length: u64 },
}

/// Why bytes were not kept.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreError {
    /// They do not match the CID (which a lender that verified its copy cannot send by
    /// accident), rather than the cache failing.
    pub corrupt: bool,
    pub message: String,
}

/// What a fetched blob is for.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    /// A span to load from it (counted in `Session::span_jobs`).
    Load { blocks: Range<usize>, max_sessions: usize },
    /// A shard this contributor may be asked to take over.
    Ahead,
    /// The glue asked ([`Session::fetch`]).
    Glue,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FetchState {
    /// Fetched ahead, after the one before it.
    Queued,
    /// The glue is checking its cache.
    Checking,
    /// Asking `lender` over `link`; `opened` when its channel opened, `first` when the first
    /// byte came, `received` bytes since, the last at `last`.
    Borrowing { lender: ContributorId, link: u64, opened: Option<Millis>, first: Option<Millis>, received: u64, last: Millis },
    /// Asked the coordinator, whose frames come on `stream`.
    Downloading { stream: u64 },
    /// The glue is checking and keeping the bytes that came from `from` (none: the coordinator).
    Storing { from: Option<ContributorId>, bytes: usize },
}

/// One blob being fetched, for one or more reasons.
#[derive(Debug)]
pub(super) struct Fetch {
    cid: String,
    wants: Vec<Want>,
    /// Peers to try, in order, before the coordinator.
    lenders: VecDeque<ContributorId>,
    state: FetchState,
    /// When the current source was tried.
    since: Millis,
}

impl Fetch {
    /// When a borrow must have made progress: its first byte, its next, or the whole blob.
    pub(super) fn deadline(&self) -> Option<Millis> {
        match self.state {
            FetchState::Borrowing { opened: Some(opened), first: None, .. } => Some(opened + BORROW_FIRST_BYTE_MS),
            FetchState::Borrowing { first: Some(first), received, last, .. } => Some((last + BORROW_IDLE_MS).min(behind_at(first, received))),
            _ => None,
        }
    }

    fn ahead_only(&self) -> bool {
        self.wants.iter().all(|w| *w == Want::Ahead)
    }
}

/// When `received` bytes, the first of which came at `first`, fall behind `MIN_BORROW_RATE`
/// after the grace. It moves only with bytes received, never with what a lender says is still to
/// come (a frame's `total` is the lender's word, and a liar would claim a gigabyte to trickle).
fn behind_at(first: Millis, received: u64) -> Millis {
    first + BORROW_GRACE_MS + received as f64 * 1000.0 / MIN_BORROW_RATE
}

/// A borrower's permit: the blobs it may still fetch, until when it may offer a channel, and
/// the channel serving it.
#[derive(Debug)]
pub(super) struct Lend {
    blobs: BTreeSet<String>,
    offer_by: Millis,
    link: Option<u64>,
    requests: usize,
}

/// The inbox of a borrowing link: one blob, at most `MAX_BLOB_BYTES`.
pub(super) fn blob_inbox() -> Inbox {
    let limits = ReassemblyLimits { max_message_bytes: MAX_BLOB_BYTES, max_partial_messages: 1, max_buffered_bytes: MAX_BLOB_BYTES };
    Inbox { reassembler: Reassembler::new(limits), tensors: VecDeque::new() }
}

/// A CID as a peer or the coordinator may name one: short, letters and digits only (the glue
/// parses it properly before any use).
fn plausible_cid(cid: &str) -> bool {
    !cid.is_empty() && cid.len() <= 128 && cid.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Session {
    /// Asks for blob `cid` (a file a unit's model needs) to be in the cache, checked: from the
    /// coordinator, unless the cache holds it. Answered with `Output::Fetched`.
    pub fn fetch(&mut self, now: Millis, cid: String) {
        self.tick(now);
        if self.ended {
            return;
        }
        let refused = if !self.policy.fetches_blobs {
            Some("this contributor fetches no blobs over its channel".to_string())
        } else if !plausible_cid(&cid) {
            Some(format!("{cid:?} is not a CID"))
        } else {
            None
        };
        match refused {
            Some(why) => self.outputs.push_back(Output::Fetched { cid, result: Err(why) }),
            None => self.want(cid, Want::Glue, Vec::new()),
        }
    }

    /// The `BlobJob::Check` of `cid` is done: whether the cache holds it intact.
    pub fn blob_checked(&mut self, now: Millis, cid: &str, held: bool) {
        self.tick(now);
        if self.ended {
            return;
        }
        let Some(at) = self.fetches.iter().position(|f| f.cid == cid && f.state == FetchState::Checking) else {
            return;
        };
        if held {
            self.finish(at, Ok(None));
        } else {
            self.next_source(at);
        }
    }

    /// The `BlobJob::Store` of `cid` is done: kept, or why not. Bytes a lender sent that were
    /// not kept are reported as its failure, and the next source is tried.
    pub fn blob_stored(&mut self, now: Millis, cid: &str, result: Result<(), StoreError>) {
        self.tick(now);
        if self.ended {
            return;
        }
        let Some(at) = self.fetches.iter().position(|f| f.cid == cid && matches!(f.state, FetchState::Storing { .. })) else {
            return;
        };
        let FetchState::Storing { from, bytes } = self.fetches[at].state else {
            return;
        };
        let seconds = (now - self.fetches[at].since) / 1000.0;
        match (result, from) {
            (Ok(()), _) => {
                let source = from.map_or("the coordinator".to_string(), |peer| format!("contributor {peer}"));
                self.log(format!("fetched {cid} from {source} ({bytes} bytes in {seconds:.1} s)"));
                self.finish(at, Ok(from));
            }
            (Err(e), Some(lender)) => self.borrow_failed(at, lender, e.message, e.corrupt),
            (Err(e), None) => self.finish(at, Err(format!("from the coordinator: {}", e.message))),
        }
    }

    /// The `BlobJob::Read` for the borrower on `link` is done: the bytes asked for on
    /// `stream`, or the refusal to send it.
    pub fn blob_read(&mut self, now: Millis, link: u64, stream: u64, cid: &str, result: Result<Vec<u8>, (ErrorCode, String)>) {
        self.tick(now);
        if self.ended {
            return;
        }
        let Some(at) = self.links.iter().position(|l| l.number == link && l.purpose == Purpose::Lend) else {
            return;
        };
        let LinkState::Open { max_message } = self.links[at].state else {
            return;
        };
        let peer = self.links[at].peer;
        let messages = match result {
            Ok(bytes) => match frames_on(stream, PayloadKind::Blob, &bytes, max_message) {
                Ok(frames) => {
                    // Each blob is lent once (whole, or the range asked for).
                    if let Some(lend) = self.lends.get_mut(&peer) {
                        lend.blobs.remove(cid);
                    }
                    self.log(format!("lending {cid} to contributor {peer} ({} bytes)", bytes.len()));
                    frames
                }
                Err(why) => return self.drop_link(at, why),
            },
            Err((code, message)) => vec![Outgoing::Text(encode_control(&PeerMessage::Error { code, message }))],
        };
        self.outputs.push_back(Output::SendOn { link, messages });
    }

    /// A `LoadSpan` when blobs come through here: the load is handed out once its shard is in.
    pub(super) fn fetch_for_load(&mut self, shard: String, blocks: Range<usize>, max_sessions: usize, peers: Vec<ContributorId>) {
        if !plausible_cid(&shard) {
            self.span_jobs = self.span_jobs.saturating_sub(1);
            return self.span_failed(&shard, &blocks, "the shard named is no CID");
        }
        let lenders = if self.policy.links { peers } else { Vec::new() };
        self.want(shard, Want::Load { blocks, max_sessions }, lenders);
    }

    /// An `UnloadSpan` while its shard is still being fetched: the load is not handed out (the
    /// fetch goes on, and the shard is kept).
    pub(super) fn cancel_load(&mut self, shard: &str) {
        self.fetched_from.remove(shard);
        let Some(fetch) = self.fetches.iter_mut().find(|f| f.cid == shard) else {
            return;
        };
        let before = fetch.wants.len();
        fetch.wants.retain(|w| !matches!(w, Want::Load { .. }));
        self.span_jobs = self.span_jobs.saturating_sub(before - fetch.wants.len());
    }

    /// A `Prefetch`: the shards named are fetched ahead, one at a time, at most `MAX_PREFETCH`
    /// waiting; a tab ignores it.
    pub(super) fn prefetch(&mut self, blobs: Vec<String>, mut lenders: BTreeMap<String, Vec<ContributorId>>) {
        if !self.policy.fetches_ahead {
            return;
        }
        for blob in blobs.into_iter().take(MAX_PREFETCH) {
            let waiting = self.fetches.iter().filter(|f| f.ahead_only()).count();
            if !plausible_cid(&blob) {
                self.log(format!("not prefetching {blob:?}: not a CID"));
            } else if waiting >= MAX_PREFETCH {
                // A full queue only means fetching this one when it is needed.
                self.log(format!("not prefetching {blob}: {MAX_PREFETCH} are waiting already"));
            } else if !self.fetches.iter().any(|f| f.cid == blob && f.wants.contains(&Want::Ahead)) {
                let peers = if self.policy.links { lenders.remove(&blob).unwrap_or_default() } else { Vec::new() };
                self.want(blob, Want::Ahead, peers);
            }
        }
    }

    /// Adds `want` to the fetch of `cid`, starting one when there is none: at once, unless it is
    /// fetched ahead behind another.
    fn want(&mut self, cid: String, want: Want, lenders: Vec<ContributorId>) {
        if let Some(fetch) = self.fetches.iter_mut().find(|f| f.cid == cid) {
            let urgent = want != Want::Ahead;
            fetch.wants.push(want);
            for lender in lenders {
                if !fetch.lenders.contains(&lender) {
                    fetch.lenders.push_back(lender);
                }
            }
            if urgent && fetch.state == FetchState::Queued {
                self.check(cid);
            }
            return;
        }
        let queued = want == Want::Ahead && self.fetches.iter().any(|f| f.ahead_only() && f.state != FetchState::Queued);
        let state = if queued { FetchState::Queued } else { FetchState::Checking };
        self.fetches.push(Fetch { cid: cid.clone(), wants: vec![want], lenders: lenders.into(), state, since: self.clock });
        if !queued {
            self.outputs.push_back(Output::Blob(BlobJob::Check { cid }));
        }
    }

    /// Starts the fetch of `cid` by asking the glue whether its cache holds it.
    fn check(&mut self, cid: String) {
        if let Some(fetch) = self.fetches.iter_mut().find(|f| f.cid == cid) {
            (fetch.state, fetch.since) = (FetchState::Checking, self.clock);
            self.outputs.push_back(Output::Blob(BlobJob::Check { cid }));
        }
    }

    /// Tries the fetch at `at` from its next lender, or else from the coordinator.
    fn next_source(&mut self, at: usize) {
        let now = self.clock;
        while let Some(lender) = self.fetches[at].lenders.pop_front() {
            if Some(lender) == self.contributor {
                continue;
            }
            let link = self.new_link(lender, Purpose::Borrow, true, LinkState::Queued, None);
            let fetch = &mut self.fetches[at];
            (fetch.state, fetch.since) = (FetchState::Borrowing { lender, link, opened: None, first: None, received: 0, last: now }, now);
            self.start_offers();
            return;
        }
        let stream = self.new_stream();
        let fetch = &mut self.fetches[at];
        (fetch.state, fetch.since) = (FetchState::Downloading { stream }, now);
        let cid = fetch.cid.clone();
        self.send(&ContributorMessage::BlobRequest { cid, offset: 0, length: 0, stream });
    }

    /// Whether a fetch waits for the coordinator's frames on `stream`.
    pub(super) fn downloading(&self, stream: u64) -> bool {
        self.fetches.iter().any(|f| f.state == FetchState::Downloading { stream })
    }

    /// A frame of a blob the coordinator sends for a fetch.
    pub(super) fn blob_frame(&mut self, chunk: Chunk<'_>) {
        let payload = match self.blob_frames.push(chunk) {
            Ok(Some(payload)) => payload,
            Ok(None) => return,
            Err(e) => return self.restart(format!("the coordinator sent a bad blob frame: {e}")),
        };
        let Some(at) = self.fetches.iter().position(|f| f.state == (FetchState::Downloading { stream: payload.stream })) else {
            return;
        };
        self.fetches[at].state = FetchState::Storing { from: None, bytes: payload.bytes.len() };
        let cid = self.fetches[at].cid.clone();
        self.outputs.push_back(Output::Blob(BlobJob::Store { cid, bytes: payload.bytes }));
    }

    /// The coordinator refused a blob; the refusal names no stream, so every download fails.
    pub(super) fn downloads_failed(&mut self, why: &str) {
        while let Some(at) = self.fetches.iter().position(|f| matches!(f.state, FetchState::Downloading { .. })) {
            self.finish(at, Err(why.to_string()));
        }
    }

    /// The borrowing channel `link` opened: the blob is asked for.
    pub(super) fn borrow_open(&mut self, now: Millis, link: u64) {
        let Some(fetch) = self.fetches.iter_mut().find(|f| matches!(f.state, FetchState::Borrowing { link: l, .. } if l == link)) else {
            return self.link_closed(now, link, "no fetch needs it any more".into());
        };
        if let FetchState::Borrowing { opened, last, .. } = &mut fetch.state {
            (*opened, *last) = (Some(now), now);
        }
        let request = PeerMessage::BlobRequest { cid: fetch.cid.clone(), offset: 0, length: 0, stream: BORROW_STREAM };
        self.outputs.push_back(Output::SendOn { link, messages: vec![Outgoing::Text(encode_control(&request))] });
    }

    /// A message from a lender on the borrowing link at `at`: a frame of the blob, or its refusal.
    pub(super) fn borrow_message(&mut self, now: Millis, at: usize, incoming: Incoming<'_>) {
        let number = self.links[at].number;
        let Some(fetch) = self.fetches.iter().position(|f| matches!(f.state, FetchState::Borrowing { link, .. } if link == number)) else {
            return self.drop_link(at, "no fetch needs it any more".into());
        };
        let failure = match decode::<PeerMessage>(incoming) {
            Ok(Decoded::Chunk(chunk)) => {
                if let FetchState::Borrowing { first, received, last, .. } = &mut self.fetches[fetch].state {
                    if first.is_none() {
                        *first = Some(now);
                    }
                    (*received, *last) = (*received + chunk.payload.len() as u64, now);
                }
                match self.links[at].inbox.reassembler.push(chunk) {
                    Ok(None) => return,
                    Ok(Some(payload)) if payload.stream == BORROW_STREAM && payload.kind == PayloadKind::Blob => {
                        let FetchState::Borrowing { lender, .. } = self.fetches[fetch].state else {
                            return;
                        };
                        self.fetches[fetch].state = FetchState::Storing { from: Some(lender), bytes: payload.bytes.len() };
                        let cid = self.fetches[fetch].cid.clone();
                        self.drop_link(at, "the blob arrived".into());
                        self.outputs.push_back(Output::Blob(BlobJob::Store { cid, bytes: payload.bytes }));
                        return;
                    }
                    Ok(Some(payload)) => format!("it sent a {:?} payload on stream {}", payload.kind, payload.stream),
                    Err(e) => format!("it sent a bad frame: {e}"),
                }
            }
            Ok(Decoded::Control(PeerMessage::Error { code, message })) => {
                format!("it refused ({code:?}): {message}")
            }
            Ok(Decoded::Control(_)) => "it sent a message other than the blob".to_string(),
            Err(e) => format!("it sent a message that does not decode: {e}"),
        };
        let FetchState::Borrowing { lender, .. } = self.fetches[fetch].state else {
            return;
        };
        self.borrow_failed(fetch, lender, failure, false);
    }

    /// Borrows that stalled or trickle give way to the next source.
    pub(super) fn check_borrows(&mut self, now: Millis) {
        let due: Vec<(String, ContributorId, String)> = self
            .fetches
            .iter()
            .filter_map(|f| {
                let FetchState::Borrowing { lender, opened: Some(opened), first, received, last, .. } = f.state else {
                    return None;
                };
                let why = match first {
                    None if now - opened >= BORROW_FIRST_BYTE_MS => format!("nothing arrived for {} s", BORROW_FIRST_BYTE_MS / 1000.0),
                    Some(_) if now - last >= BORROW_IDLE_MS => format!("nothing arrived for {} s", BORROW_IDLE_MS / 1000.0),
                    Some(first) if now >= behind_at(first, received) => {
                        format!("{received} bytes in {:.0} s is too slow", (now - first) / 1000.0)
                    }
                    _ => return None,
                };
                Some((f.cid.clone(), lender, why))
            })
            .collect();
        for (cid, lender, why) in due {
            if let Some(at) = self.fetches.iter().position(|f| f.cid == cid) {
                self.borrow_failed(at, lender, why, false);
            }
        }
    }

    /// The borrowing link `number` went (closed, failed, timed out, or its peer misbehaved):
    /// if its fetch still waited on it, that lender failed.
    pub(super) fn borrow_ended(&mut self, number: u64, why: &str) {
        let Some(at) = self.fetches.iter().position(|f| matches!(f.state, FetchState::Borrowing { link, .. } if link == number)) else {
            return;
        };
        let FetchState::Borrowing { lender, .. } = self.fetches[at].state else {
            return;
        };
        self.borrow_failed(at, lender, why.to_string(), false);
    }

    /// Borrowing the fetch at `at` from `lender` failed: the coordinator hears it (`corrupt`: the
    /// bytes did not match the CID), its link goes, and the next source is tried.
    fn borrow_failed(&mut self, at: usize, lender: ContributorId, why: String, corrupt: bool) {
        let cid = self.fetches[at].cid.clone();
        let link = match self.fetches[at].state {
            FetchState::Borrowing { link, .. } => Some(link),
            _ => None,
        };
        // Out of `Borrowing` first, so that dropping the link does not report it again.
        self.fetches[at].state = FetchState::Checking;
        if let Some(link_at) = link.and_then(|link| self.links.iter().position(|l| l.number == link)) {
            self.drop_link(link_at, why.clone());
        }
        self.log(format!("fetching {cid} from contributor {lender} failed: {why}; trying elsewhere"));
        self.send(&ContributorMessage::BorrowFailed { lender, cid: cid.clone(), corrupt, message: why });
        if let Some(at) = self.fetches.iter().position(|f| f.cid == cid) {
            self.next_source(at);
        }
    }

    /// The fetch at `at` is over: each of its wants hears how (`Ok`: the peer it came from, if
    /// one did), and the next fetch ahead starts.
    fn finish(&mut self, at: usize, result: Result<Option<ContributorId>, String>) {
        let fetch = self.fetches.remove(at);
        let cid = fetch.cid;
        for want in fetch.wants {
            match (want, &result) {
                (Want::Load { blocks, max_sessions }, Ok(from)) => {
                    if let Some(from) = *from {
                        self.fetched_from.insert(cid.clone(), from);
                    }
                    self.outputs.push_back(Output::Span(SpanJob::Load { shard: cid.clone(), blocks, max_sessions }));
                }
                (Want::Load { blocks, .. }, Err(why)) => {
                    self.span_jobs = self.span_jobs.saturating_sub(1);
                    self.span_failed(&cid, &blocks, &format!("its shard could not be fetched: {why}"));
                }
                (Want::Ahead, Ok(_)) => self.send(&ContributorMessage::BlobHave { cids: vec![cid.clone()] }),
                (Want::Ahead, Err(why)) => self.log(format!("prefetching {cid}: {why}")),
                (Want::Glue, result) => self.outputs.push_back(Output::Fetched { cid: cid.clone(), result: result.clone().map(drop) }),
            }
        }
        let ahead_running = self.fetches.iter().any(|f| f.ahead_only() && f.state != FetchState::Queued);
        if !ahead_running && let Some(next) = self.fetches.iter().find(|f| f.state == FetchState::Queued) {
            let cid = next.cid.clone();
            self.check(cid);
        }
    }

    /// A `Lend`: `peer` may offer a channel and fetch `blobs` from here over it. A second
    /// `Lend` to the same peer adds its blobs (to a channel already serving, too).
    pub(super) fn lend(&mut self, now: Millis, peer: ContributorId, blobs: Vec<String>) {
        if !self.policy.lends_blobs {
            return;
        }
        if !self.policy.links {
            return self.log(format!("not lending shards to contributor {peer}: this contributor takes no direct channels"));
        }
        let blobs: Vec<String> = blobs.into_iter().filter(|b| plausible_cid(b)).take(MAX_LENT_BLOBS).collect();
        let count = blobs.len();
        self.lends.retain(|_, lend| lend.link.is_some() || lend.offer_by > now);
        if let Some(lend) = self.lends.get_mut(&peer) {
            lend.blobs.extend(blobs);
            lend.offer_by = now + LEND_WINDOW_MS;
        } else if self.lends.len() >= MAX_LENDS {
            return self.log(format!("not lending shards to contributor {peer}: {MAX_LENDS} borrowers are served already"));
        } else {
            self.lends.insert(peer, Lend { blobs: blobs.into_iter().collect(), offer_by: now + LEND_WINDOW_MS, link: None, requests: 0 });
        }
        self.log(format!("lending {count} shard(s) to contributor {peer}"));
    }

    /// An offer from `peer` of a channel to fetch lent blobs over: answered only under a
    /// standing `Lend` to it, one channel at a time.
    pub(super) fn borrower_offered(&mut self, now: Millis, peer: ContributorId, sdp: String) {
        if !self.policy.lends_blobs {
            return self.log(format!("an offer from contributor {peer} to fetch blobs ignored: this contributor lends none"));
        }
        if !self.lends.get(&peer).is_some_and(|lend| lend.link.is_none() && lend.offer_by > now) {
            return self.log(format!("ignoring an offer from contributor {peer} to fetch blobs: nothing is lent to it"));
        }
        let link = self.new_link(peer, Purpose::Lend, false, LinkState::Describing, Some(now + LEND_TIME_MS));
        if let Some(lend) = self.lends.get_mut(&peer) {
            (lend.link, lend.requests) = (Some(link), 0);
        }
        self.outputs.push_back(Output::Answer { link, peer, sdp });
    }

    /// A message from a borrower on the lent link at `at`: a blob request, or the end of the
    /// channel.
    pub(super) fn lend_message(&mut self, at: usize, incoming: Incoming<'_>) {
        let (number, peer) = (self.links[at].number, self.links[at].peer);
        let text = match incoming {
            Incoming::Text(text) => text,
            Incoming::Binary(_) => {
                return self.drop_link(at, "it sent binary data, and a borrower sends requests only".into());
            }
        };
        let (cid, offset, length, stream) = match decode_control::<PeerMessage>(text.as_bytes(), MAX_REQUEST_BYTES) {
            Ok(PeerMessage::BlobRequest { cid, offset, length, stream }) => (cid, offset, length, stream),
            Ok(_) => {
                return self.drop_link(at, "it sent a message other than a blob request".into());
            }
            Err(e) => {
                return self.drop_link(at, format!("it sent a request that does not decode: {e}"));
            }
        };
        let Some(lend) = self.lends.get_mut(&peer).filter(|lend| lend.link == Some(number)) else {
            return self.drop_link(at, "nothing is lent to it".into());
        };
        lend.requests += 1;
        if lend.requests > MAX_REQUESTS {
            return self.drop_link(at, format!("it asked for more than {MAX_REQUESTS} blobs over one channel"));
        }
        if lend.blobs.contains(&cid) {
            self.outputs.push_back(Output::Blob(BlobJob::Read { link: number, stream, cid, offset, length }));
        } else {
            let refusal = PeerMessage::Error { code: ErrorCode::BlobNotFound, message: format!("{cid} is not lent to contributor {peer}") };
            self.outputs.push_back(Output::SendOn { link: number, messages: vec![Outgoing::Text(encode_control(&refusal))] });
        }
    }

    /// The lent link `number` to `peer` went: the lend ends if every blob was sent; otherwise
    /// the borrower may offer another channel within the window.
    pub(super) fn lend_ended(&mut self, peer: ContributorId, number: u64) {
        let Some(lend) = self.lends.get_mut(&peer).filter(|lend| lend.link == Some(number)) else {
            return;
        };
        if lend.blobs.is_empty() {
            self.lends.remove(&peer);
        } else {
            (lend.link, lend.offer_by) = (None, self.clock + LEND_WINDOW_MS);
        }
    }
}

#[cfg(test)]
mod tests;
