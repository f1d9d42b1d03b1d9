//! What the browser contributor keeps across connections, without I/O: its options as the page
//! gave them, the reconnection back-off, and the counters `stats()` reports.

use serde::{Deserialize, Serialize};
use tessera_contributor::{Event, Millis, Status};
use tessera_protocol::ContributorId;

/// Waits before reconnecting, in seconds, one more step per failure in a row.
pub const BACKOFF_S: [u64; 6] = [1, 2, 4, 8, 15, 30];
/// A connection that lasted this long was healthy: the next failure starts the back-off again.
const HEALTHY_MS: Millis = 60_000.0;

/// `Contributor.start`'s options.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Options {
    /// The coordinator's `http(s)://host[:port]`, without a trailing slash.
    pub coordinator: String,
    /// The share of time the GPU may be busy, in (0, 1].
    #[serde(default = "full_budget")]
    pub budget: f64,
    /// GPU memory the coordinator may use in this tab, in MiB (default: what the adapter
    /// allows, at most 1 GiB). It decides how many blocks of a language model the tab holds.
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// Bounds on `memoryMib`: less holds no block of any model served; more is not a tab's to give.
pub const MEMORY_MIB: (u64, u64) = (16, 16 << 10);

fn full_budget() -> f64 {
    1.0
}

impl Options {
    pub fn parse(json: &str) -> Result<Options, String> {
        let mut options: Options = serde_json::from_str(json).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => format!("options: {e}"),
            _ => format!("options must be a JSON object such as {{\"coordinator\": \"https://tessera.example\", \"budget\": 1}}: {e}"),
        })?;
        check_budget(options.budget)?;
        if let Some(mib) = options.memory_mib.filter(|mib| !(MEMORY_MIB.0..=MEMORY_MIB.1).contains(mib)) {
            return Err(format!("options: memoryMib must be from {} to {}, got {mib}", MEMORY_MIB.0, MEMORY_MIB.1));
        }
        let base = options.coordinator.trim_end_matches('/');
        let host = base.strip_prefix("http://").or_else(|| base.strip_prefix("https://"));
        if !host.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' '])) {
            return Err(format!("options: coordinator must be an http:// or https:// origin such as https://tessera.example, got {:?}", options.coordinator));
        }
        options.coordinator = base.to_string();
        Ok(options)
    }

    /// `ws://HOST/ws` for `http://HOST` (and `wss` for `https`).
    pub fn signalling_url(&self) -> String {
        let base = &self.coordinator;
        match base.strip_prefix("https://") {
            Some(host) => format!("wss://{host}/ws"),
            None => format!("ws://{}/ws", base.trim_start_matches("http://")),
        }
    }

    pub fn blob_url(&self, cid: &str) -> String {
        format!("{}/blobs/{cid}", self.coordinator)
    }
}

/// A budget must be in (0, 1].
pub fn check_budget(budget: f64) -> Result<(), String> {
    if budget > 0.0 && budget <= 1.0 { Ok(()) } else { Err(format!("the compute budget must be in (0, 1], got {budget}")) }
}

/// Reconnection waits: 1, 2, 4, 8, 15, then 30 s while failures go on.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: usize,
}

impl Backoff {
    /// How long to wait after a connection that lasted `lasted` ms ended.
    pub fn next_wait_ms(&mut self, lasted: Millis) -> Millis {
        if lasted >= HEALTHY_MS {
            self.failures = 0;
        }
        let wait = BACKOFF_S[self.failures.min(BACKOFF_S.len() - 1)];
        self.failures += 1;
        wait as f64 * 1000.0
    }

    /// Reconnecting by request (resume) starts the back-off again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A span held: blocks `start..end` of a model, from shard `shard`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldSpan {
    pub shard: String,
    pub start: u32,
    pub end: u32,
}

/// The counters `stats()` reports, in camelCase.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub status: Status,
    pub detail: Option<String>,
    pub contributor: Option<ContributorId>,
    pub units_done: u64,
    pub units_accepted: u64,
    pub units_rejected: u64,
    /// Blob bytes fetched from the network (not from Cache Storage).
    pub bytes_downloaded: u64,
    pub cache_hits: u64,
    /// GPU time of the units done and the span steps run.
    pub busy_ms: f64,
    /// Spans of a language model held here now.
    pub spans: Vec<HeldSpan>,
    /// Conversation steps run through those spans, and the positions they carried.
    pub steps_forwarded: u64,
    pub rows_forwarded: u64,
    /// Direct channels to other contributors open now.
    pub links: usize,
    /// Outputs of those steps sent straight to the next contributor, not through the coordinator.
    pub steps_passed_direct: u64,
    pub started_at_ms: Millis,
    pub first_accepted_at_ms: Option<Millis>,
    /// Whether the page has been told a status yet (the first one always goes out).
    #[serde(skip)]
    status_told: bool,
}

impl Stats {
    pub fn new(now: Millis) -> Stats {
        Stats {
            status: Status::Connecting,
            detail: None,
            contributor: None,
            units_done: 0,
            units_accepted: 0,
            units_rejected: 0,
            bytes_downloaded: 0,
            cache_hits: 0,
            busy_ms: 0.0,
            spans: Vec::new(),
            steps_forwarded: 0,
            rows_forwarded: 0,
            links: 0,
            steps_passed_direct: 0,
            started_at_ms: now,
            first_accepted_at_ms: None,
            status_told: false,
        }
    }

    /// Counts `event`; false for a status the page already has, which need not be sent again.
    pub fn apply(&mut self, now: Millis, event: &Event) -> bool {
        match event {
            Event::Status { status, detail } => {
                if self.status_told && (*status, detail) == (self.status, &self.detail) {
                    return false;
                }
                self.status_told = true;
                self.status = *status;
                self.detail.clone_from(detail);
            }
            Event::Joined { contributor } => self.contributor = Some(*contributor),
            Event::Download { cached: true, .. } => self.cache_hits += 1,
            Event::Download { bytes, cached: false, .. } => self.bytes_downloaded += bytes,
            Event::Unit { ms, .. } => {
                self.units_done += 1;
                self.busy_ms += ms;
            }
            Event::Verdict { accepted: true, .. } => {
                self.units_accepted += 1;
                self.first_accepted_at_ms.get_or_insert(now);
            }
            Event::Verdict { accepted: false, .. } => self.units_rejected += 1,
            Event::SpanLoaded { shard, start, end } => {
                self.spans.retain(|s| s.shard != *shard);
                self.spans.push(HeldSpan { shard: shard.clone(), start: *start, end: *end });
            }
            Event::SpanDropped { shard } => self.spans.retain(|s| s.shard != *shard),
            Event::Forwarded { rows, ms } => {
                self.steps_forwarded += 1;
                self.rows_forwarded += *rows as u64;
                self.busy_ms += ms;
            }
            Event::Links { open } => self.links = *open,
            Event::Passed { .. } => self.steps_passed_direct += 1,
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check_options(json: &str, expected: Result<(&str, f64, &str), &str>) {
        match (Options::parse(json), expected) {
            (Ok(options), Ok((coordinator, budget, ws))) => {
                assert_eq!((options.coordinator.as_str(), options.budget, options.signalling_url().as_str()), (coordinator, budget, ws), "{json}");
            }
            (Err(error), Err(expected)) => assert!(error.contains(expected), "{json}: {error}"),
            (got, expected) => panic!("{json}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn options() {
        check_options(r#"{"coordinator":"http://127.0.0.1:8080","budget":1.0}"#, Ok(("http://127.0.0.1:8080", 1.0, "ws://127.0.0.1:8080/ws")));
        check_options(r#"{"coordinator":"https://tessera.example/"}"#, Ok(("https://tessera.example", 1.0, "wss://tessera.example/ws")));
        check_options(r#"{"coordinator":"http://198.18.0.1:9000","budget":0.25}"#, Ok(("http://198.18.0.1:9000", 0.25, "ws://198.18.0.1:9000/ws")));
        check_options(r#"{"coordinator":"http://h","budget":0}"#, Err("must be in (0, 1], got 0"));
        check_options(r#"{"coordinator":"http://h","budget":1.5}"#, Err("must be in (0, 1], got 1.5"));
        check_options(r#"{"coordinator":"http://h","budget":-1}"#, Err("must be in (0, 1]"));
        check_options(r#"{"coordinator":"ws://h"}"#, Err("http:// or https://"));
        check_options(r#"{"coordinator":"http://"}"#, Err("http:// or https://"));
        check_options(r#"{"coordinator":"https://h/path"}"#, Err("http:// or https://"));
        check_options(r#"{"coordinator":"tessera.example"}"#, Err("http:// or https://"));
        check_options(r#"{"budget":1}"#, Err("missing field `coordinator`"));
        check_options(r#"{"coordinator":"http://h","budjet":1}"#, Err("unknown field `budjet`"));
        check_options(r#"{"coordinator":"http://h","budget":"1"}"#, Err("invalid type"));
        check_options("not json", Err("options must be a JSON object"));
        check_options(r#"{"coordinator":"http://h","memoryMib":8}"#, Err("memoryMib must be from 16 to 16384, got 8"));
        check_options(r#"{"coordinator":"http://h","memoryMib":-1}"#, Err("invalid value"));
        assert_eq!(Options::parse(r#"{"coordinator":"http://h","memoryMib":300}"#).map(|o| o.memory_mib), Ok(Some(300)));
        assert_eq!(Options::parse(r#"{"coordinator":"http://h"}"#).map(|o| o.memory_mib), Ok(None));
        assert_eq!(Options::parse(r#"{"coordinator":"http://h:1/"}"#).map(|o| o.blob_url("bafk")), Ok("http://h:1/blobs/bafk".into()));
    }

    #[test]
    fn backoff_grows_to_thirty_seconds_and_restarts_after_a_healthy_connection() {
        let mut backoff = Backoff::default();
        let waits: Vec<f64> = (0..8).map(|_| backoff.next_wait_ms(500.0) / 1000.0).collect();
        assert_eq!(waits, [1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0, 30.0]);
        assert_eq!(backoff.next_wait_ms(HEALTHY_MS), 1000.0);
        assert_eq!(backoff.next_wait_ms(10.0), 2000.0);
        backoff.reset();
        assert_eq!(backoff.next_wait_ms(10.0), 1000.0);
    }

    #[test]
    fn stats_count_events_and_skip_repeated_statuses() {
        use tessera_protocol::{JobId, UnitId};
        let mut stats = Stats::new(1000.0);
        let status = |status, detail: Option<&str>| Event::Status { status, detail: detail.map(String::from) };
        let rows = [
            (status(Status::Connecting, None), true),
            (status(Status::Connecting, None), false),
            (status(Status::Error, Some("gone")), true),
            (status(Status::Error, Some("gone")), false),
            (status(Status::Error, Some("gone again")), true),
            (Event::Joined { contributor: ContributorId(7) }, true),
            (status(Status::Idle, None), true),
            (Event::Download { cid: "a".into(), bytes: 100, cached: false }, true),
            (Event::Download { cid: "b".into(), bytes: 50, cached: true }, true),
            (Event::Unit { unit: UnitId(1), job: JobId(1), inputs: 2, ms: 30.0 }, true),
            (Event::Unit { unit: UnitId(2), job: JobId(1), inputs: 2, ms: 12.5 }, true),
            (Event::Verdict { unit: UnitId(1), accepted: false }, true),
            (Event::SpanLoaded { shard: "s1".into(), start: 0, end: 10 }, true),
            (Event::SpanLoaded { shard: "s2".into(), start: 10, end: 20 }, true),
            (Event::Forwarded { rows: 7, ms: 5.0 }, true),
            (Event::Forwarded { rows: 1, ms: 2.5 }, true),
            (Event::SpanDropped { shard: "s1".into() }, true),
            (Event::Links { open: 2 }, true),
            (Event::Passed { to: ContributorId(8) }, true),
            (Event::Links { open: 1 }, true),
        ];
        for (i, (event, forwarded)) in rows.iter().enumerate() {
            assert_eq!(stats.apply(2000.0 + i as f64, event), *forwarded, "row {i}: {event:?}");
        }
        assert_eq!(stats.first_accepted_at_ms, None);
        stats.apply(5000.0, &Event::Verdict { unit: UnitId(2), accepted: true });
        stats.apply(6000.0, &Event::Verdict { unit: UnitId(3), accepted: true });
        assert_eq!(
            serde_json::to_value(&stats).unwrap(),
            serde_json::json!({
                "status": "idle", "detail": null, "contributor": 7, "unitsDone": 2, "unitsAccepted": 2,
                "unitsRejected": 1, "bytesDownloaded": 100, "cacheHits": 1, "busyMs": 50.0,
                "spans": [{"shard": "s2", "start": 10, "end": 20}], "stepsForwarded": 2, "rowsForwarded": 8,
                "links": 1, "stepsPassedDirect": 1, "startedAtMs": 1000.0, "firstAcceptedAtMs": 5000.0
            })
        );
    }
}
