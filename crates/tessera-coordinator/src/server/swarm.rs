//! What `GET /api/swarm` (and the `/swarm` page) shows: the model served, every connected
//! contributor, the span plan, the live generation rate and the recent requests.
//!
//! The serving task owns a `Swarm` and tells it when a request starts, each token it samples,
//! and when a request ends; the rest (members, plan, which holders are ready) it hands over as a
//! `View` when asked. Time is passed in (`Millis` on the task's clock), so the rate meter and the
//! request list are tested without a clock.

use std::collections::{BTreeSet, VecDeque};

use serde_json::{Value, json};
use tessera_protocol::{Capabilities, ContributorId};

use crate::placement::Plan;
use crate::time::Millis;

/// Recent requests shown, newest first.
pub const REQUESTS_SHOWN: usize = 50;
/// The live rate counts the tokens of this window.
pub const RATE_WINDOW_MS: u64 = 10_000;
/// Tokens are counted in buckets this wide, so the meter holds at most window / bucket counts.
const BUCKET_MS: u64 = 100;
/// A burst younger than this is still divided by this much time (one token is not "infinitely fast").
const MIN_SPAN_MS: u64 = 1_000;

/// Tokens per second over a sliding window.
#[derive(Debug, Clone)]
pub struct RateMeter {
    window_ms: u64,
    /// (bucket start, tokens in it), oldest first.
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl RateMeter {
    pub fn new(window_ms: u64) -> RateMeter {
        RateMeter { window_ms: window_ms.max(BUCKET_MS), buckets: VecDeque::new(), total: 0 }
    }

    /// Counts `tokens` at `now`.
    pub fn record(&mut self, now: Millis, tokens: u64) {
        let bucket = now.0 - now.0 % BUCKET_MS;
        match self.buckets.back_mut() {
            Some((start, count)) if *start >= bucket => *count += tokens,
            _ => self.buckets.push_back((bucket, tokens)),
        }
        self.total += tokens;
        self.forget(now);
    }

    /// Tokens per second in the window ending at `now`: the tokens in it over the time since the
    /// oldest of them (at least a second, at most the window), so a burst that has just begun
    /// reads at its pace and one that has ended fades to zero over the window.
    pub fn rate(&self, now: Millis) -> f64 {
        let from = now.0.saturating_sub(self.window_ms);
        let mut inside = self.buckets.iter().filter(|(start, _)| start + BUCKET_MS > from);
        let Some(&(oldest, first)) = inside.next() else { return 0.0 };
        let tokens = first + inside.map(|(_, count)| count).sum::<u64>();
        let span = now.0.saturating_sub(oldest).clamp(MIN_SPAN_MS, self.window_ms);
        tokens as f64 * 1000.0 / span as f64
    }

    /// Every token counted since the start.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn forget(&mut self, now: Millis) {
        let from = now.0.saturating_sub(self.window_ms);
        while self.buckets.front().is_some_and(|(start, _)| start + BUCKET_MS <= from) {
            self.buckets.pop_front();
        }
    }
}

/// One request as the page lists it.
#[derive(Debug, Clone)]
struct Row {
    id: u64,
    state: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Who serves which span: the plan at the start, then who actually served it.
    spans: String,
    started: Millis,
    first_token: Option<Millis>,
    last_token: Option<Millis>,
    ended: Option<Millis>,
}

impl Row {
    /// The decode pace: tokens after the first over the time since the first.
    fn tokens_per_second(&self) -> Option<f64> {
        let (first, last) = (self.first_token?, self.last_token?);
        let ms = last.since(first);
        (self.completion_tokens >= 2 && ms > 0).then(|| (self.completion_tokens - 1) as f64 * 1000.0 / ms as f64)
    }
}

/// What the serving task knows that `Swarm` does not keep: handed over for each answer.
pub struct View<'a> {
    /// The model's API name, if one is configured.
    pub name: Option<&'a str>,
    /// `None` while it loads; its blocks once loaded, or why it cannot be served.
    pub model: Option<Result<u32, &'a str>>,
    /// Connected contributors: id, capabilities, and whether it failed a span.
    pub members: Vec<(ContributorId, &'a Capabilities, bool)>,
    pub plan: Option<&'a Plan>,
    /// Holders and standbys whose span is loaded.
    pub ready: BTreeSet<ContributorId>,
    /// The direct channels asked for: (upstream, downstream) holders of consecutive spans.
    pub links: &'a BTreeSet<(ContributorId, ContributorId)>,
    /// Shards contributors were told to fetch ahead and have not reported fetched yet.
    pub fetching_ahead: usize,
}

/// The swarm's live figures and recent requests.
#[derive(Debug, Clone)]
pub struct Swarm {
    /// Unix time (ms) at `Millis(0)`, to date requests for the page.
    epoch_unix_ms: u64,
    rate: RateMeter,
    /// Newest first, at most `REQUESTS_SHOWN`.
    requests: VecDeque<Row>,
    started_total: u64,
    /// Hops from one stage to the next: straight over a direct channel, or through here.
    hops_direct: u64,
    hops_relayed: u64,
    /// The latest hops' overheads in ms (time between stages, less the stages' own), direct
    /// and relayed, at most `OVERHEADS_KEPT` each.
    overheads: [VecDeque<f64>; 2],
    /// Spans loaded from a shard another contributor lent, and from the coordinator (or the
    /// loader's own cache).
    shards_from_peers: u64,
    shards_from_coordinator: u64,
    /// Lenders reported for bytes that did not match their CID.
    corrupt_lends: u64,
}

/// Hop overheads kept for the medians.
const OVERHEADS_KEPT: usize = 256;

/// The median of `values`, if any.
fn median(values: &VecDeque<f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    (n > 0).then(|| if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 })
}

/// `native` or `browser`, as far as a backend tells: WebGPU is what a browser offers; a native
/// contributor reports the `wgpu` backend under it (`vulkan`, `metal`, `dx12`, `gl`).
pub fn kind(backend: &str) -> Option<&'static str> {
    match backend.to_ascii_lowercase().as_str() {
        "" => None,
        "webgpu" | "browserwebgpu" => Some("browser"),
        _ => Some("native"),
    }
}

impl Swarm {
    pub fn new(epoch_unix_ms: u64) -> Swarm {
        Swarm { epoch_unix_ms, rate: RateMeter::new(RATE_WINDOW_MS), requests: VecDeque::new(), started_total: 0, hops_direct: 0, hops_relayed: 0, overheads: Default::default(), shards_from_peers: 0, shards_from_coordinator: 0, corrupt_lends: 0 }
    }

    /// A lender was reported for bytes that did not match their CID.
    pub fn corrupt_lend(&mut self) {
        self.corrupt_lends += 1;
    }

    /// A contributor loaded a span, from a shard a peer lent it or not.
    pub fn shard_loaded(&mut self, from_peer: bool) {
        if from_peer {
            self.shards_from_peers += 1;
        } else {
            self.shards_from_coordinator += 1;
        }
    }

    /// A hop (direct or relayed) cost `ms` beyond the stages' own time.
    pub fn hop_overhead(&mut self, direct: bool, ms: f64) {
        let kept = &mut self.overheads[usize::from(direct)];
        if kept.len() == OVERHEADS_KEPT {
            kept.pop_front();
        }
        kept.push_back(ms);
    }

    /// A step's states went from one stage to the next: `direct`ly, or relayed by the coordinator.
    pub fn hop(&mut self, direct: bool) {
        if direct {
            self.hops_direct += 1;
        } else {
            self.hops_relayed += 1;
        }
    }

    /// A request started, on `spans`.
    pub fn started(&mut self, now: Millis, id: u64, prompt_tokens: usize, spans: &str) {
        self.started_total += 1;
        let row = Row {
            id,
            state: "running",
            prompt_tokens,
            completion_tokens: 0,
            spans: spans.to_string(),
            started: now,
            first_token: None,
            last_token: None,
            ended: None,
        };
        self.requests.push_front(row);
        self.requests.truncate(REQUESTS_SHOWN);
    }

    /// Request `id` generated a token.
    pub fn token(&mut self, now: Millis, id: u64) {
        self.rate.record(now, 1);
        if let Some(row) = self.row(id) {
            row.completion_tokens += 1;
            row.first_token.get_or_insert(now);
            row.last_token = Some(now);
        }
    }

    /// Request `id` ended (`done`, `stopped`, `failed`); `spans` names who served it, if anyone did.
    pub fn ended(&mut self, now: Millis, id: u64, state: &'static str, spans: &str) {
        if let Some(row) = self.row(id) {
            row.state = state;
            row.ended = Some(now);
            if !spans.is_empty() {
                row.spans = spans.to_string();
            }
        }
    }

    fn row(&mut self, id: u64) -> Option<&mut Row> {
        self.requests.iter_mut().find(|r| r.id == id)
    }

    /// `GET /api/swarm`'s body.
    pub fn json(&self, now: Millis, view: &View<'_>) -> Value {
        let model = match view.model {
            None if view.name.is_none() => Value::Null,
            None => json!({ "name": view.name, "blocks": null, "state": "loading" }),
            Some(Ok(blocks)) => json!({ "name": view.name, "blocks": blocks, "state": "ready" }),
            Some(Err(reason)) => json!({ "name": view.name, "blocks": null, "state": "failed", "error": reason }),
        };
        let stages = view.plan.map_or(&[][..], |p| &p.stages[..]);
        let contributors: Vec<Value> = view
            .members
            .iter()
            .map(|&(id, caps, failed)| {
                let holds = stages.iter().position(|s| s.contributor == id);
                let standby: Vec<usize> = stages.iter().enumerate().filter(|(_, s)| s.standby == Some(id)).map(|(i, _)| i).collect();
                json!({
                    "id": id.0,
                    "adapter": caps.adapter,
                    "backend": caps.backend,
                    "kind": kind(&caps.backend),
                    "benchmark_score": caps.benchmark_score,
                    "memory_budget_bytes": caps.memory_budget_bytes,
                    "failed": failed,
                    "holds": holds,
                    "standby_for": standby,
                })
            })
            .collect();
        let plan = view.plan.map(|plan| {
            let spans: Vec<Value> = plan
                .stages
                .iter()
                .map(|s| {
                    json!({
                        "blocks": [s.blocks.start, s.blocks.end],
                        "holder": s.contributor.0,
                        "state": if view.ready.contains(&s.contributor) { "ready" } else { "loading" },
                        "standby": s.standby.iter().map(|c| c.0).collect::<Vec<_>>(),
                        "standby_ready": s.standby.is_some_and(|c| view.ready.contains(&c)),
                    })
                })
                .collect();
            json!({ "spans": spans })
        });
        let requests: Vec<Value> = self
            .requests
            .iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "state": r.state,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "tokens_per_second": r.tokens_per_second(),
                    "spans": r.spans,
                    "started_unix_ms": self.epoch_unix_ms + r.started.0,
                    "elapsed_ms": r.ended.unwrap_or(now).since(r.started),
                })
            })
            .collect();
        json!({
            "now_unix_ms": self.epoch_unix_ms + now.0,
            "model": model,
            "contributors": contributors,
            "plan": plan,
            "rate": {
                "tokens_per_second": self.rate.rate(now),
                "window_seconds": RATE_WINDOW_MS / 1000,
                "tokens_total": self.rate.total(),
                "requests_total": self.started_total,
            },
            "requests": requests,
            "links": view.links.iter().map(|(up, down)| json!([up.0, down.0])).collect::<Vec<_>>(),
            "hops": {
                "direct": self.hops_direct,
                "relayed": self.hops_relayed,
                "direct_overhead_ms": median(&self.overheads[1]),
                "relayed_overhead_ms": median(&self.overheads[0]),
            },
            "shards_loaded": { "from_peers": self.shards_from_peers, "from_coordinator": self.shards_from_coordinator, "corrupt_lends": self.corrupt_lends },
            "fetching_ahead": view.fetching_ahead,
        })
    }
}

#[cfg(test)]
mod tests {
    use tessera_protocol::AdapterLimits;

    use super::*;
    use crate::placement::Stage;

    /// Tokens at these times, then the rate read at `at`.
    fn check_rate(tokens: &[u64], at: u64, expected: f64) {
        let mut meter = RateMeter::new(RATE_WINDOW_MS);
        for &t in tokens {
            meter.record(Millis(t), 1);
        }
        let got = meter.rate(Millis(at));
        assert!((got - expected).abs() < 1e-9, "{tokens:?} read at {at}: {got}, expected {expected}");
        assert_eq!(meter.total(), tokens.len() as u64);
    }

    #[test]
    fn the_rate_counts_the_window_only() {
        let every_100ms_for_3s: Vec<u64> = (0..30).map(|i| 50_000 + i * 100).collect();
        let rows: [(&[u64], u64, f64); 8] = [
            (&[], 0, 0.0),
            // One token reads as one over the minimum second.
            (&[5_000], 5_000, 1.0),
            // A steady 10 a second reads as 10 while it lasts...
            (&every_100ms_for_3s, 53_000, 10.0),
            // ...fades once it stops (30 tokens over the 8 s since the oldest)...
            (&every_100ms_for_3s, 58_000, 30.0 / 8.0),
            // ...is divided by the whole window at most...
            (&every_100ms_for_3s, 60_000, 3.0),
            // ...and reads zero once the window has passed the last of them.
            (&every_100ms_for_3s, 63_000, 0.0),
            (&every_100ms_for_3s, 1_000_000, 0.0),
            // Tokens at a window's start are out; the ones after stay.
            (&[0, 0, 10_000, 10_050], 10_100, 2.0),
        ];
        for (tokens, at, expected) in rows {
            check_rate(tokens, at, expected);
        }
    }

    #[test]
    fn the_meter_keeps_a_bounded_number_of_buckets() {
        let mut meter = RateMeter::new(RATE_WINDOW_MS);
        for t in 0..100_000 {
            meter.record(Millis(t * 7), 1);
        }
        assert!(meter.buckets.len() <= (RATE_WINDOW_MS / BUCKET_MS) as usize + 1, "{} buckets", meter.buckets.len());
        assert_eq!(meter.total(), 100_000);
    }

    fn caps(backend: &str) -> Capabilities {
        Capabilities {
            adapter: format!("{backend} adapter"),
            backend: backend.into(),
            limits: AdapterLimits {
                max_storage_buffer_binding_size: 128 << 20,
                max_buffer_size: 256 << 20,
                max_compute_workgroup_storage_size: 16384,
                max_compute_invocations_per_workgroup: 256,
            },
            memory_budget_bytes: 1 << 30,
            benchmark_score: 100.0,
            max_concurrent_units: 1,
            lends_blobs: false,
        }
    }

    #[test]
    fn kinds_follow_the_backend() {
        for (backend, expected) in [("webgpu", Some("browser")), ("vulkan", Some("native")), ("Metal", Some("native")), ("", None)] {
            assert_eq!(kind(backend), expected, "{backend}");
        }
    }

    #[test]
    fn the_json_names_members_spans_and_requests() {
        let (vulkan, webgpu, metal) = (caps("vulkan"), caps("webgpu"), caps("metal"));
        let plan = Plan {
            stages: vec![
                Stage { blocks: 0..10, contributor: ContributorId(3), standby: Some(ContributorId(7)), seconds: 0.01 },
                Stage { blocks: 10..30, contributor: ContributorId(5), standby: None, seconds: 0.02 },
            ],
        };
        let view = View {
            name: Some("smollm2"),
            model: Some(Ok(30)),
            members: vec![(ContributorId(3), &vulkan, false), (ContributorId(5), &webgpu, false), (ContributorId(7), &metal, true)],
            plan: Some(&plan),
            ready: BTreeSet::from([ContributorId(3)]),
            links: &BTreeSet::from([(ContributorId(3), ContributorId(5))]),
            fetching_ahead: 2,
        };
        let mut swarm = Swarm::new(1_700_000_000_000);
        swarm.hop(true);
        swarm.hop(true);
        swarm.hop(false);
        for ms in [0.5, 0.9, 0.7] {
            swarm.hop_overhead(true, ms);
        }
        swarm.shard_loaded(false);
        swarm.shard_loaded(true);
        swarm.shard_loaded(false);
        swarm.corrupt_lend();
        swarm.started(Millis(1_000), 1, 12, "0-10=3,10-30=5");
        for t in [2_000, 2_500, 3_000] {
            swarm.token(Millis(t), 1);
        }
        swarm.ended(Millis(3_100), 1, "done", "0-10=7,10-30=5");
        swarm.started(Millis(4_000), 2, 4, "0-10=3,10-30=5");
        let got = swarm.json(Millis(4_000), &view);
        let expected = json!({
            "now_unix_ms": 1_700_000_004_000u64,
            "model": { "name": "smollm2", "blocks": 30, "state": "ready" },
            "contributors": [
                { "id": 3, "adapter": "vulkan adapter", "backend": "vulkan", "kind": "native", "benchmark_score": 100.0,
                  "memory_budget_bytes": 1u64 << 30, "failed": false, "holds": 0, "standby_for": [] },
                { "id": 5, "adapter": "webgpu adapter", "backend": "webgpu", "kind": "browser", "benchmark_score": 100.0,
                  "memory_budget_bytes": 1u64 << 30, "failed": false, "holds": 1, "standby_for": [] },
                { "id": 7, "adapter": "metal adapter", "backend": "metal", "kind": "native", "benchmark_score": 100.0,
                  "memory_budget_bytes": 1u64 << 30, "failed": true, "holds": null, "standby_for": [0] },
            ],
            "plan": { "spans": [
                { "blocks": [0, 10], "holder": 3, "state": "ready", "standby": [7], "standby_ready": false },
                { "blocks": [10, 30], "holder": 5, "state": "loading", "standby": [], "standby_ready": false },
            ] },
            "rate": { "tokens_per_second": 1.5, "window_seconds": 10, "tokens_total": 3, "requests_total": 2 },
            "requests": [
                { "id": 2, "state": "running", "prompt_tokens": 4, "completion_tokens": 0, "tokens_per_second": null,
                  "spans": "0-10=3,10-30=5", "started_unix_ms": 1_700_000_004_000u64, "elapsed_ms": 0 },
                { "id": 1, "state": "done", "prompt_tokens": 12, "completion_tokens": 3, "tokens_per_second": 2.0,
                  "spans": "0-10=7,10-30=5", "started_unix_ms": 1_700_000_001_000u64, "elapsed_ms": 2_100 },
            ],
            "links": [[3, 5]],
            "hops": { "direct": 2, "relayed": 1, "direct_overhead_ms": 0.7, "relayed_overhead_ms": null },
            "shards_loaded": { "from_peers": 1, "from_coordinator": 2, "corrupt_lends": 1 },
            "fetching_ahead": 2,
        });
        assert_eq!(got, expected, "{got:#}");
    }

    #[test]
    fn no_model_and_no_plan_before_any_request() {
        let native = caps("vulkan");
        let view = View { name: None, model: None, members: vec![(ContributorId(1), &native, false)], plan: None, ready: BTreeSet::new(), links: &BTreeSet::new(), fetching_ahead: 0 };
        let got = Swarm::new(0).json(Millis(0), &view);
        assert_eq!(got["model"], Value::Null);
        assert_eq!(got["plan"], Value::Null);
        assert_eq!(got["contributors"][0]["holds"], Value::Null);
        assert_eq!(got["requests"], json!([]));
        let loading = View { name: Some("smollm2"), ..view };
        assert_eq!(Swarm::new(0).json(Millis(0), &loading)["model"], json!({ "name": "smollm2", "blocks": null, "state": "loading" }));
    }

    #[test]
    fn the_request_list_is_bounded_newest_first() {
        let mut swarm = Swarm::new(0);
        let shown = REQUESTS_SHOWN as u64;
        for id in 1..=shown + 20 {
            swarm.started(Millis(id), id, 1, "");
        }
        // A token for a request no longer shown still counts towards the rate.
        swarm.token(Millis(200), 1);
        let view = View { name: None, model: None, members: Vec::new(), plan: None, ready: BTreeSet::new(), links: &BTreeSet::new(), fetching_ahead: 0 };
        let got = swarm.json(Millis(200), &view);
        let ids: Vec<u64> = got["requests"].as_array().unwrap().iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (21..=shown + 20).rev().collect::<Vec<_>>());
        assert_eq!(got["rate"]["tokens_total"], 1);
        assert_eq!(got["rate"]["requests_total"], shown + 20);
    }
}
