//! Generation sessions on a placed model, sans-IO: which positions go through which stages
//! next, for every session, and what to do when a stage is lost.
//!
//! A session is a token sequence (prompt, then each sampled token). A step feeds positions
//! `start..end` of it along a route of contributors, the plan's stages in order: the shell embeds
//! the tokens, sends the hidden states to the route's first contributor, each contributor runs
//! its span on the session's KV cache and passes the states on, and the last one returns them to
//! the coordinator, which runs the head and samples. A contributor first cuts its cache for the
//! session back to `start`, then appends: so sending positions again recomputes them, and, with
//! the same chunks on the same device, rewrites exactly what was there.
//!
//! That makes failover a replay. When a stage's holder changes (a loss, a missed deadline, a new
//! plan), each session feeds its positions so far again, in the chunks it first used (the prompt
//! as it was fed; generated tokens up to eight at a time, which the engine computes exactly as
//! one at a time), along the route up to the last changed stage; then the step that was cut off
//! goes again. With greedy sampling the output is the same as if nothing had happened.
//!
//! Every step carries a sequence number; acknowledgements and results of a step that was
//! abandoned are stale and ignored.
//!
//! Deadlines are per holder. A contributor runs forwards one at a time, in the order they
//! arrive, so the shell tells the pipeline when it sends a hop ([`Pipeline::dispatched`]) and
//! each holder keeps a queue of the hops it has not answered (abandoned ones included: it still
//! computes them). The hop at the head of the queue started when it was sent or when the one
//! before it was answered, whichever is later, and must be answered within an allowance: a
//! multiple of the time that holder is expected to take for its rows, at least `stage_floor_ms`
//! and at most `stage_deadline_ms` (also the allowance before any measurement, or after its span
//! changed). The expectation comes from two EWMAs of the holder's measured times: hops of one
//! row (decode), and hops of several rows per row (prompts, replays). Several rows cost about
//! one row's time on a GPU and about that many rows' time on a CPU adapter (lavapipe), so a
//! hop of `n` rows is expected to take the larger of one row's time and `n` times the per-row
//! time, or `n` times one row's time before any several-row hop was measured.
//! A contributor may run the hops queued together (up to [`REPLAY_CHUNK`] rows in all) as one
//! batch and answer them at once: answers that arrive together are measured as one sample of
//! their rows together, and the head's allowance covers the rows queued with it when its turn
//! came (up to that limit). Hops queued behind get their own allowance when their turn comes,
//! so a long queue is never mistaken for a dead holder, and a holder that dies is noticed about
//! a floor after its last answer. A holder that misses its allowance is reported ([`Output::StageLate`], with how many
//! times in a row) and its allowance doubles; the shell moves its span
//! ([`crate::placement::relieve`]) and hands the plan back with [`Pipeline::set_plan`], or keeps
//! waiting when nobody else can take it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use tessera_protocol::ContributorId;

use crate::placement::Plan;
use crate::time::Millis;

/// The most generated tokens a replay sends in one chunk: up to this many rows, the engine's
/// kernels compute each row exactly as for a single token.
pub const REPLAY_CHUNK: usize = 8;

/// A hop may take this many times its holder's expected time before it is late.
const DEADLINE_MARGIN: f64 = 4.0;
/// Weight of a new measurement in a holder's EWMAs.
const EWMA_WEIGHT: f64 = 0.25;
/// Answers from one holder this close together were computed in one batch.
const BATCH_GAP_MS: u64 = 5;

/// A generation session (one API request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// Limits and timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineConfig {
    /// The most one holder may take for one hop (once its turn comes) before it is reported
    /// late, and the allowance of a holder not measured yet.
    pub stage_deadline_ms: u64,
    /// The least allowance, however fast the holder has been.
    pub stage_floor_ms: u64,
    /// Sessions at once; more are refused.
    pub max_sessions: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig { stage_deadline_ms: 10_000, stage_floor_ms: 1_000, max_sessions: 64 }
    }
}

/// What the shell does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Embed `tokens` (positions `positions` of the session) and send the hidden states along
    /// `route`. With `sample`, the returned states are the session's next logits' input; without,
    /// this is a replay and they are dropped.
    Step { session: SessionId, step: u64, positions: Range<usize>, tokens: Vec<u32>, route: Vec<ContributorId>, sample: bool },
    /// A holder on the route that did not answer its oldest hop (`session`'s `step`) in time,
    /// for the `misses`-th time in a row: move its span if someone else can take it.
    StageLate { session: SessionId, step: u64, contributor: ContributorId, misses: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PipelineError {
    #[error("{0} sessions are running, the most this coordinator serves at once")]
    Full(usize),
    #[error("session {0:?} already exists")]
    Exists(SessionId),
    #[error("no session {0:?}")]
    Unknown(SessionId),
    #[error("a session needs a prompt of at least one token")]
    EmptyPrompt,
}

/// What became of an acknowledgement or a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Counted.
    Accepted,
    /// For a step that was abandoned, from a contributor not on the route, or twice: ignored.
    Stale,
}

#[derive(Clone, Debug)]
struct InFlight {
    step: u64,
    positions: Range<usize>,
    route: Vec<ContributorId>,
    /// Stages on the route that acknowledged so far.
    acked: usize,
    sample: bool,
}

/// A hop sent to a holder and not answered yet.
#[derive(Clone, Debug)]
struct Queued {
    session: SessionId,
    step: u64,
    rows: usize,
    sent: Millis,
}

/// What the pipeline knows of one holder's pace.
#[derive(Clone, Debug, Default)]
struct Holder {
    /// The span its times were measured on: another span starts unmeasured.
    blocks: Option<Range<u32>>,
    /// Milliseconds a hop of one row takes (EWMA).
    ms_one: Option<f64>,
    /// Milliseconds per row of a hop of several rows (EWMA).
    ms_per_row: Option<f64>,
    /// Reports since its last answer.
    misses: u32,
    /// Hops sent and not answered, oldest first.
    queue: VecDeque<Queued>,
    /// Its last answer (or when it was last reported late): the head of the queue started no
    /// earlier.
    progress: Millis,
    /// The last measurement, which answers arriving right after it join (one batch).
    last: Option<Sample>,
}

/// One measurement of a holder: hops answered together.
#[derive(Clone, Debug)]
struct Sample {
    start: Millis,
    end: Millis,
    rows: usize,
    /// The EWMAs before it, to apply it again with more rows.
    before: (Option<f64>, Option<f64>),
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |old| old + EWMA_WEIGHT * (new - old)))
}

impl Holder {
    /// Counts `took` ms for `rows` rows.
    fn measure(&mut self, took: f64, rows: usize) {
        if rows <= 1 {
            self.ms_one = ewma(self.ms_one, took);
        } else {
            self.ms_per_row = ewma(self.ms_per_row, took / rows as f64);
        }
    }

    /// Rows the holder may be computing for the head of its queue: the head's, or those of every
    /// hop waiting when its turn came, which may run with it as one batch (up to a chunk).
    fn head_rows(&self) -> Option<(Millis, usize)> {
        let head = self.queue.front()?;
        let start = head.sent.max(self.progress);
        let waiting: usize = self.queue.iter().take_while(|q| q.sent <= start).map(|q| q.rows).sum();
        Some((start, head.rows.max(waiting.min(REPLAY_CHUNK))))
    }

    /// Milliseconds a hop of `rows` rows is expected to take, once something was measured.
    fn expected_ms(&self, rows: usize) -> Option<f64> {
        let n = rows.max(1) as f64;
        match (self.ms_one, self.ms_per_row) {
            (None, None) => None,
            (Some(one), None) => Some(one * n),
            // Only several-row hops measured: one row costs at most a chunk's time.
            (None, Some(per_row)) => Some(per_row * n.max(REPLAY_CHUNK as f64)),
            (Some(one), Some(per_row)) => Some(if rows <= 1 { one } else { one.max(per_row * n) }),
        }
    }
}

#[derive(Clone, Debug)]
struct Session {
    tokens: Vec<u32>,
    /// The chunks fed so far, in order: the prompt as first fed, then one per generated token.
    fed: Vec<Range<usize>>,
    /// Positions every stage of the current route holds.
    done: usize,
    /// Replays to run before the next step: chunks and how many stages each goes through.
    replays: VecDeque<(Range<usize>, usize)>,
    in_flight: Option<InFlight>,
    /// Waiting for the shell's next token (after a sampling step returned).
    sampling: bool,
}

/// The sessions on one model's plan.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    plan: Plan,
    sessions: BTreeMap<SessionId, Session>,
    next_step: u64,
    outputs: VecDeque<Output>,
    holders: BTreeMap<ContributorId, Holder>,
}

impl Pipeline {
    pub fn new(config: PipelineConfig, plan: Plan) -> Pipeline {
        let mut pipeline = Pipeline { config, plan, sessions: BTreeMap::new(), next_step: 1, outputs: VecDeque::new(), holders: BTreeMap::new() };
        pipeline.note_spans();
        pipeline
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn route(&self) -> Vec<ContributorId> {
        self.plan.stages.iter().map(|s| s.contributor).collect()
    }

    /// Starts a session whose prompt is `prompt`; the first step (the whole prompt) is issued
    /// at once.
    pub fn start(&mut self, session: SessionId, prompt: Vec<u32>) -> Result<(), PipelineError> {
        if prompt.is_empty() {
            return Err(PipelineError::EmptyPrompt);
        }
        if self.sessions.contains_key(&session) {
            return Err(PipelineError::Exists(session));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(PipelineError::Full(self.sessions.len()));
        }
        let state = Session { tokens: prompt, fed: Vec::new(), done: 0, replays: VecDeque::new(), in_flight: None, sampling: false };
        self.sessions.insert(session, state);
        self.advance(session);
        Ok(())
    }

    /// The next token of `session`, sampled by the shell from the last step's states: it is fed
    /// in the next step.
    pub fn push_token(&mut self, session: SessionId, token: u32) -> Result<(), PipelineError> {
        let state = self.sessions.get_mut(&session).ok_or(PipelineError::Unknown(session))?;
        state.tokens.push(token);
        state.sampling = false;
        self.advance(session);
        Ok(())
    }

    /// Ends `session` (finished, cancelled or failed); its contributors may drop its caches.
    pub fn finish(&mut self, session: SessionId) -> Result<(), PipelineError> {
        self.sessions.remove(&session).map(|_| ()).ok_or(PipelineError::Unknown(session))
    }

    /// The shell sent `rows` rows of `session`'s `step` to `contributor` (its hop starts the
    /// holder's clock once the hops ahead of it are answered).
    pub fn dispatched(&mut self, now: Millis, session: SessionId, step: u64, contributor: ContributorId, rows: usize) {
        let holder = self.holders.entry(contributor).or_default();
        if holder.queue.is_empty() {
            holder.progress = now;
        }
        holder.queue.push_back(Queued { session, step, rows, sent: now });
    }

    /// `contributor` finished its stage of `step` (and passed the states on). Every answer,
    /// stale ones too, counts towards the holder's measured pace.
    pub fn acknowledge(&mut self, now: Millis, session: SessionId, step: u64, contributor: ContributorId) -> Received {
        if let Some(holder) = self.holders.get_mut(&contributor)
            && let Some(at) = holder.queue.iter().position(|q| q.session == session && q.step == step)
        {
            // Forwards run in order: the hops before this one were answered or dropped.
            let hop = holder.queue.drain(..=at).next_back().unwrap_or_else(|| unreachable!());
            let sample = match holder.last.take() {
                // Answered with the one before: one batch, one measurement of their rows.
                Some(last) if now.since(last.end) <= BATCH_GAP_MS => {
                    (holder.ms_one, holder.ms_per_row) = last.before;
                    Sample { end: now, rows: last.rows + hop.rows, ..last }
                }
                _ => Sample { start: hop.sent.max(holder.progress), end: now, rows: hop.rows, before: (holder.ms_one, holder.ms_per_row) },
            };
            holder.measure(now.since(sample.start) as f64, sample.rows);
            holder.last = Some(sample);
            holder.progress = now;
            holder.misses = 0;
        }
        let Some(flight) = self.sessions.get_mut(&session).and_then(|s| s.in_flight.as_mut()) else { return Received::Stale };
        if flight.step != step || flight.route.get(flight.acked) != Some(&contributor) {
            return Received::Stale;
        }
        flight.acked += 1;
        Received::Accepted
    }

    /// How long `holder` may take for a hop of `rows` rows once its turn comes.
    fn allowance(&self, holder: &Holder, rows: usize) -> u64 {
        let ceiling = self.config.stage_deadline_ms;
        let floor = self.config.stage_floor_ms.min(ceiling);
        holder.expected_ms(rows).map_or(ceiling, |ms| ((DEADLINE_MARGIN * ms) as u64).clamp(floor, ceiling))
    }

    /// When `contributor`'s oldest unanswered hop is late, if it has one.
    pub fn holder_deadline(&self, contributor: ContributorId) -> Option<Millis> {
        let holder = self.holders.get(&contributor)?;
        let (start, rows) = holder.head_rows()?;
        Some(start.plus(self.allowance(holder, rows)))
    }

    /// Milliseconds `contributor` is expected to take for a hop of one row, once measured.
    pub fn pace(&self, contributor: ContributorId) -> Option<f64> {
        self.holders.get(&contributor).and_then(|h| h.expected_ms(1))
    }

    /// Forgets the measured times of holders whose span changed (a new span runs at its own
    /// pace, and its first hops allocate and warm up).
    fn note_spans(&mut self) {
        for stage in &self.plan.stages {
            let holder = self.holders.entry(stage.contributor).or_default();
            if holder.blocks.as_ref() != Some(&stage.blocks) {
                *holder = Holder { blocks: Some(stage.blocks.clone()), queue: std::mem::take(&mut holder.queue), progress: holder.progress, ..Holder::default() };
            }
        }
    }

    /// `contributor` is gone: its unanswered hops will never be answered.
    pub fn forget(&mut self, contributor: ContributorId) {
        self.holders.remove(&contributor);
    }

    /// The last stage's states for `step` came back. For a sampling step, the shell now samples
    /// and calls [`Pipeline::push_token`]; returns whether it should.
    pub fn returned(&mut self, session: SessionId, step: u64) -> Result<bool, Received> {
        let state = self.sessions.get_mut(&session).ok_or(Received::Stale)?;
        match &state.in_flight {
            Some(flight) if flight.step == step && flight.acked == flight.route.len() => {}
            _ => return Err(Received::Stale),
        }
        let Some(flight) = state.in_flight.take() else { return Err(Received::Stale) };
        if flight.sample {
            state.done = flight.positions.end;
            state.fed.push(flight.positions);
            state.sampling = true;
        }
        self.advance(session);
        Ok(flight.sample)
    }

    /// Reports each holder on the route whose oldest unanswered hop is past its allowance, and
    /// doubles that holder's allowance from now on: if nobody takes its span, it is reported
    /// again only after waiting twice as long.
    pub fn tick(&mut self, now: Millis) {
        let route = self.route();
        for contributor in route {
            let Some(deadline) = self.holder_deadline(contributor) else { continue };
            if now < deadline {
                continue;
            }
            let Some(holder) = self.holders.get_mut(&contributor) else { continue };
            let Some(head) = holder.queue.front() else { continue };
            let (session, step) = (head.session, head.step);
            for ms in [&mut holder.ms_one, &mut holder.ms_per_row].into_iter().flatten() {
                *ms *= 2.0;
            }
            holder.progress = now;
            holder.misses += 1;
            self.outputs.push_back(Output::StageLate { session, step, contributor, misses: holder.misses });
        }
    }

    /// Replaces the plan (after a repair or a re-plan). When a stage changed hands, every
    /// session abandons its step in flight and replays what it has fed through the stages that
    /// changed (each stage whose span or holder differs, and every stage before the last such
    /// one, whose outputs the new holders need), then goes on. A plan whose stages are the same
    /// (only standbys differ, as after a join) disturbs nothing.
    pub fn set_plan(&mut self, plan: Plan) {
        let unchanged = |i: usize| {
            let new = &plan.stages[i];
            self.plan.stages.get(i).is_some_and(|old| old.blocks == new.blocks && old.contributor == new.contributor)
        };
        let through = (0..plan.stages.len()).rev().find(|&i| !unchanged(i)).map_or(0, |i| i + 1);
        let same_route = through == 0 && plan.stages.len() == self.plan.stages.len();
        self.plan = plan;
        self.note_spans();
        if same_route {
            return;
        }
        // Every step in flight is abandoned below: what was queued for them is obsolete.
        self.outputs.clear();
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for session in ids {
            let Some(state) = self.sessions.get_mut(&session) else { continue };
            state.in_flight = None;
            if through > 0 {
                state.replays = replay_chunks(&state.fed).into_iter().map(|chunk| (chunk, through)).collect();
            }
            if !state.sampling {
                self.advance(session);
            }
        }
    }

    /// The next thing the shell must do, if any.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Issues the session's next step if none is in flight: a pending replay, else the tokens
    /// not yet fed.
    fn advance(&mut self, session: SessionId) {
        let route = self.route();
        let Some(state) = self.sessions.get_mut(&session) else { return };
        if state.in_flight.is_some() || state.sampling {
            return;
        }
        let (positions, stages, sample) = match state.replays.pop_front() {
            Some((chunk, stages)) => (chunk, stages, false),
            None if state.done < state.tokens.len() => (state.done..state.tokens.len(), route.len(), true),
            None => return,
        };
        let step = self.next_step;
        self.next_step += 1;
        let route: Vec<ContributorId> = route[..stages].to_vec();
        let tokens = state.tokens[positions.clone()].to_vec();
        state.in_flight = Some(InFlight { step, positions: positions.clone(), route: route.clone(), acked: 0, sample });
        self.outputs.push_back(Output::Step { session, step, positions, tokens, route, sample });
    }
}

/// How to feed `fed` again so every stage computes what it computed the first time: chunks of
/// more than `REPLAY_CHUNK` positions (a long prompt) as they were, shorter ones merged up to
/// `REPLAY_CHUNK` positions.
fn replay_chunks(fed: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut chunks: Vec<Range<usize>> = Vec::new();
    for chunk in fed {
        match chunks.last_mut() {
            Some(last) if chunk.len() <= REPLAY_CHUNK && last.len() + chunk.len() <= REPLAY_CHUNK && last.end == chunk.start => last.end = chunk.end,
            _ => chunks.push(chunk.clone()),
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::placement::{Candidate, ModelShape, Policy, plan, relieve, repair};

    #[test]
    fn replays_merge_short_chunks_and_keep_long_ones() {
        assert_eq!(replay_chunks(&[0..12, 12..13, 13..14, 14..15]), vec![0..12, 12..15]);
        assert_eq!(replay_chunks(&[0..3, 3..4, 4..5, 5..6, 6..7, 7..8, 8..9, 9..10]), vec![0..8, 8..10]);
        assert_eq!(replay_chunks(&[]), Vec::<Range<usize>>::new());
    }

    /// A simulated contributor: per session and block, a cache of one value per position; a
    /// block's output for a position mixes its input with every cached value before it, as
    /// attention does. As with the real engine, how blocks are split into spans changes
    /// nothing, and cutting a cache back and feeding again rewrites what was there.
    #[derive(Default)]
    struct FakeStage {
        caches: HashMap<(SessionId, u32), Vec<u64>>,
    }

    fn mix(a: u64, b: u64) -> u64 {
        (a ^ b.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    }

    impl FakeStage {
        fn forward(&mut self, session: SessionId, start: usize, inputs: &[u64], blocks: Range<u32>) -> Vec<u64> {
            let mut states = inputs.to_vec();
            for block in blocks {
                let cache = self.caches.entry((session, block)).or_default();
                assert!(start <= cache.len(), "a gap: block {block}'s cache holds {}, the step starts at {start}", cache.len());
                cache.truncate(start);
                for x in &mut states {
                    let context = cache.iter().fold(u64::from(block), |acc, &v| mix(acc, v));
                    cache.push(*x);
                    *x = mix(context, *x);
                }
            }
            states
        }
    }

    /// Runs `sessions` sessions to `tokens` generated tokens each on `contributors` simulated
    /// contributors. After `kill_after` sampled tokens (all sessions together) the middle stage's
    /// holder leaves; after `late_after`, it stops answering instead (still connected), and must
    /// be reported late and relieved of its span. Every hop takes 2 ms. Returns each session's
    /// tokens.
    fn run(contributors: usize, sessions: u64, tokens: usize, mut kill_after: Option<usize>, mut late_after: Option<usize>) -> BTreeMap<SessionId, Vec<u32>> {
        let shape = ModelShape { blocks: 30, bytes_per_block: 1 };
        let mut candidates: Vec<Candidate> =
            (1..=contributors as u64).map(|id| Candidate { contributor: ContributorId(id), blocks_per_second: 100.0, memory_bytes: 30, recent_drops: 0 }).collect();
        let policy = Policy::default();
        let mut current = plan(&shape, &candidates, &policy).unwrap();
        let mut stages: HashMap<ContributorId, FakeStage> = candidates.iter().map(|c| (c.contributor, FakeStage::default())).collect();
        let mut pipeline = Pipeline::new(PipelineConfig { stage_deadline_ms: 100, stage_floor_ms: 20, max_sessions: 16 }, current.clone());
        let mut now = Millis(0);
        let mut generated: BTreeMap<SessionId, Vec<u32>> = BTreeMap::new();
        for s in 0..sessions {
            let prompt: Vec<u32> = (0..5 + s as u32 * 7).map(|i| i * 31 + s as u32).collect();
            pipeline.start(SessionId(s), prompt).unwrap();
            generated.insert(SessionId(s), Vec::new());
        }
        let mut returned = 0;
        let mut hung: Option<ContributorId> = None;
        for _ in 0..100_000 {
            now = now.plus(1);
            pipeline.tick(now);
            let Some(output) = pipeline.poll() else {
                if generated.values().all(|g| g.len() == tokens) {
                    break;
                }
                // Only a hung stage leaves nothing to do: let time pass to its deadline.
                now = now.plus(50);
                continue;
            };
            match output {
                Output::Step { session, step, positions, tokens: ids, route, sample } => {
                    let mut states: Vec<u64> = ids.iter().map(|&t| u64::from(t)).collect();
                    let mut completed = true;
                    for contributor in &route {
                        pipeline.dispatched(now, session, step, *contributor, positions.len());
                        if hung == Some(*contributor) {
                            completed = false;
                            break;
                        }
                        now = now.plus(2);
                        let blocks = pipeline.plan().stages.iter().find(|s| s.contributor == *contributor).unwrap().blocks.clone();
                        states = stages.get_mut(contributor).unwrap().forward(session, positions.start, &states, blocks);
                        assert_eq!(pipeline.acknowledge(now, session, step, *contributor), Received::Accepted);
                    }
                    if !completed {
                        continue;
                    }
                    if pipeline.returned(session, step) == Ok(true) {
                        assert!(sample);
                        returned += 1;
                        let token = (states[states.len() - 1] % 50_000) as u32;
                        let list = generated.get_mut(&session).unwrap();
                        list.push(token);
                        if list.len() < tokens {
                            pipeline.push_token(session, token).unwrap();
                        }
                    }
                    let (kill, hang) = (kill_after == Some(returned), late_after == Some(returned));
                    if kill || hang {
                        (kill_after, late_after) = (None, None);
                        let victim = current.stages[current.stages.len() / 2].contributor;
                        if kill {
                            candidates.retain(|c| c.contributor != victim);
                            stages.remove(&victim);
                            let fixed = repair(&shape, &current, &candidates, &policy).unwrap();
                            current = fixed.plan;
                            pipeline.set_plan(current.clone());
                        } else {
                            hung = Some(victim);
                        }
                    }
                }
                Output::StageLate { contributor, misses, .. } => {
                    assert_eq!(Some(contributor), hung, "only the hung stage is late");
                    for c in candidates.iter_mut().filter(|c| c.contributor == contributor) {
                        c.recent_drops += 1;
                    }
                    // As the shell does: a re-plan without it only once it missed twice.
                    let relief = relieve(&shape, &current, &candidates, contributor, &policy, misses >= 2);
                    if relief.moves.is_empty() {
                        assert_eq!(misses, 1, "{relief:?}");
                        continue;
                    }
                    assert!(relief.plan.stages.iter().all(|s| s.contributor != contributor), "{relief:?}");
                    current = relief.plan;
                    pipeline.set_plan(current.clone());
                }
            }
        }
        generated
    }

    #[test]
    fn sessions_generate_through_every_stage() {
        let out = run(3, 3, 20, None, None);
        assert!(out.values().all(|g| g.len() == 20), "{out:?}");
        // Different prompts, different continuations.
        assert_ne!(out[&SessionId(0)], out[&SessionId(1)]);
    }

    #[test]
    fn a_lost_stage_is_replayed_and_the_output_does_not_change() {
        let uninterrupted = run(4, 3, 30, None, None);
        // With a standby (four contributors, three stages) and without (three).
        for contributors in [4, 3] {
            for kill_after in [1, 10, 40] {
                // Without a standby the model is placed afresh on two: other spans, same output.
                assert_eq!(run(contributors, 3, 30, Some(kill_after), None), uninterrupted, "{contributors} contributors, killed after {kill_after} tokens");
            }
        }
    }

    #[test]
    fn a_stage_that_stops_answering_is_reported_and_replaced() {
        let uninterrupted = run(4, 2, 25, None, None);
        // With a standby, and without: then the others hold the model between them.
        assert_eq!(run(4, 2, 25, None, Some(7)), uninterrupted);
        assert_eq!(run(3, 2, 25, None, Some(7)), uninterrupted);
    }

    /// A pipeline on three single-block stages held by 1, 2 and 3, with 4 standing by for the
    /// first; hops may take at least `floor` and at most `ceiling` ms.
    fn three_stages(floor: u64, ceiling: u64) -> (Pipeline, Vec<Candidate>, ModelShape) {
        let shape = ModelShape { blocks: 3, bytes_per_block: 1 };
        let candidates: Vec<Candidate> =
            (1..=4).map(|id| Candidate { contributor: ContributorId(id), blocks_per_second: 1.0, memory_bytes: 3, recent_drops: 0 }).collect();
        let plan = plan(&shape, &candidates, &Policy::default()).unwrap();
        assert_eq!(plan.stages.iter().map(|s| (s.contributor.0, s.standby.map(|c| c.0))).collect::<Vec<_>>(), vec![(1, Some(4)), (2, None), (3, None)]);
        let config = PipelineConfig { stage_deadline_ms: ceiling, stage_floor_ms: floor, max_sessions: 8 };
        (Pipeline::new(config, plan), candidates, shape)
    }

    /// Each row: the hops a holder answered before (rows, ms taken), then a hop of `rows` rows
    /// sent at 1000 with `queued` hops of one row sent just before it (each answered 100 ms
    /// after the last); the expected deadline of the new hop once it is the head of the queue.
    #[test]
    fn deadlines_scale_with_measured_pace_rows_and_queue() {
        let a = ContributorId(1);
        #[track_caller]
        fn check(history: &[(usize, u64)], queued: usize, rows: usize, expected: u64) {
            let (mut pipeline, ..) = three_stages(300, 5_000);
            let a = ContributorId(1);
            let session = SessionId(1);
            let mut now = Millis(0);
            for (step, &(rows, ms)) in history.iter().enumerate() {
                pipeline.dispatched(now, session, step as u64, a, rows);
                now = now.plus(ms);
                pipeline.acknowledge(now, session, step as u64, a);
            }
            now = Millis(1000);
            for q in 0..queued {
                pipeline.dispatched(now, SessionId(2), q as u64, a, 1);
            }
            pipeline.dispatched(now, SessionId(3), 0, a, rows);
            for q in 0..queued {
                now = now.plus(100);
                pipeline.acknowledge(now, SessionId(2), q as u64, a);
            }
            assert_eq!(pipeline.holder_deadline(a), Some(Millis(expected)), "{history:?}, {queued} queued, {rows} rows");
        }
        // Never measured: the ceiling.
        check(&[], 0, 1, 1000 + 5_000);
        // 100 ms a token: four times that; several rows before any several-row hop was
        // measured: that many times (as on a CPU adapter).
        check(&[(1, 100)], 0, 1, 1000 + 400);
        check(&[(1, 100)], 0, 8, 1000 + 3_200);
        // 8 rows in 400 ms: 50 ms a row, and one row takes at most a chunk's time.
        check(&[(8, 400)], 0, 1, 1000 + 1_600);
        check(&[(8, 400)], 0, 30, 1000 + 5_000);
        // As on a GPU: 8 rows in twice the time of one. A prompt of 30 rows is expected to take
        // 30 * 25 ms, a token 100 ms.
        check(&[(1, 100), (8, 200)], 0, 30, 1000 + 3_000);
        check(&[(1, 100), (8, 200)], 0, 1, 1000 + 400);
        check(&[(1, 100), (8, 200)], 0, 2, 1000 + 400);
        // The EWMA moves a quarter of the way to each new measurement.
        check(&[(1, 100), (1, 500)], 0, 1, 1000 + 800);
        // Fast holders get the floor, slow ones the ceiling.
        check(&[(1, 5)], 0, 1, 1000 + 300);
        check(&[(1, 4_000)], 0, 1, 1000 + 5_000);
        // Three hops ahead: the clock starts when the last of them is answered (their 100 ms
        // each pull the EWMA up from 50 to 78.9 ms).
        check(&[(1, 50)], 3, 1, 1300 + 315);
        // Answers that arrive together are one batch: 4 rows in 400 ms, 100 ms a row. The head
        // of a queue is allowed for what was waiting with it (here 3 rows), up to a chunk.
        let (mut pipeline, ..) = three_stages(300, 5_000);
        pipeline.dispatched(Millis(0), SessionId(1), 1, a, 1);
        assert_eq!(pipeline.acknowledge(Millis(100), SessionId(1), 1, a), Received::Stale);
        for s in 2..6 {
            pipeline.dispatched(Millis(1000), SessionId(s), 1, a, 1);
        }
        for s in 2..6 {
            pipeline.acknowledge(Millis(1400), SessionId(s), 1, a);
        }
        assert_eq!(pipeline.pace(a), Some(100.0), "one row alone still takes 100 ms");
        for s in 2..5 {
            pipeline.dispatched(Millis(2000), SessionId(s), 2, a, 1);
        }
        pipeline.dispatched(Millis(2500), SessionId(5), 2, a, 1);
        // max(100 ms, 3 rows * 100 ms) * 4 from 2000; 8 rows at most for one of 30.
        assert_eq!(pipeline.holder_deadline(a), Some(Millis(2000 + 1_200)));
        pipeline.dispatched(Millis(0), SessionId(7), 1, ContributorId(2), 30);
        for s in 8..20 {
            pipeline.dispatched(Millis(0), SessionId(s), 1, ContributorId(2), 1);
        }
        assert_eq!(pipeline.holder_deadline(ContributorId(2)), Some(Millis(5_000)), "not measured");
        // A holder's late report doubles its allowance from the report on.
        let (mut pipeline, ..) = three_stages(300, 5_000);
        pipeline.start(SessionId(1), vec![1]).unwrap();
        let Some(Output::Step { step, .. }) = pipeline.poll() else { panic!("a step") };
        pipeline.dispatched(Millis(0), SessionId(1), step, a, 1);
        assert_eq!(pipeline.acknowledge(Millis(100), SessionId(1), step, a), Received::Accepted);
        pipeline.dispatched(Millis(100), SessionId(1), step, ContributorId(2), 1);
        assert_eq!(pipeline.holder_deadline(ContributorId(2)), Some(Millis(100 + 5_000)), "not measured yet");
        pipeline.dispatched(Millis(1000), SessionId(9), 1, a, 1);
        pipeline.tick(Millis(1399));
        assert_eq!(pipeline.poll(), None);
        pipeline.tick(Millis(1400));
        assert_eq!(pipeline.poll(), Some(Output::StageLate { session: SessionId(9), step: 1, contributor: a, misses: 1 }));
        pipeline.tick(Millis(1401));
        assert_eq!(pipeline.poll(), None, "reported once");
        assert_eq!(pipeline.holder_deadline(a), Some(Millis(1400 + 800)));
        pipeline.tick(Millis(2200));
        assert_eq!(pipeline.poll(), Some(Output::StageLate { session: SessionId(9), step: 1, contributor: a, misses: 2 }));
        // A holder off the route is never reported; a forgotten one has no deadline.
        pipeline.dispatched(Millis(0), SessionId(9), 2, ContributorId(4), 1);
        pipeline.tick(Millis(100_000));
        assert!(std::iter::from_fn(|| pipeline.poll()).all(|o| !matches!(o, Output::StageLate { contributor: ContributorId(4), .. })));
        pipeline.forget(a);
        assert_eq!(pipeline.holder_deadline(a), None);
        // A holder whose span changes starts unmeasured; one whose span stays keeps its pace.
        let (mut pipeline, ..) = three_stages(300, 5_000);
        for holder in [a, ContributorId(3)] {
            pipeline.dispatched(Millis(0), SessionId(1), 1, holder, 1);
            pipeline.acknowledge(Millis(100), SessionId(1), 1, holder);
        }
        let mut plan = pipeline.plan().clone();
        plan.stages[0].blocks = 0..2;
        plan.stages.remove(1);
        pipeline.set_plan(plan);
        assert_eq!(pipeline.pace(a), None);
        assert_eq!(pipeline.pace(ContributorId(3)), Some(100.0));
    }

    #[test]
    fn a_late_holder_is_relieved_and_its_late_answer_ignored() {
        let (mut pipeline, mut candidates, shape) = three_stages(300, 5_000);
        let [a, b, c, d] = [1, 2, 3, 4].map(ContributorId);
        let session = SessionId(1);
        let mut now = Millis(0);
        pipeline.start(session, vec![5, 6, 7]).unwrap();
        // The prompt goes through, 20 ms a stage.
        let Some(Output::Step { step, route, .. }) = pipeline.poll() else { panic!("a step") };
        assert_eq!(route, vec![a, b, c]);
        for &holder in &route {
            pipeline.dispatched(now, session, step, holder, 3);
            now = now.plus(20);
            assert_eq!(pipeline.acknowledge(now, session, step, holder), Received::Accepted);
        }
        assert_eq!(pipeline.returned(session, step), Ok(true));
        pipeline.push_token(session, 8).unwrap();
        let Some(Output::Step { step: late_step, .. }) = pipeline.poll() else { panic!("a decode step") };
        pipeline.dispatched(now, session, late_step, a, 1);
        // `a` stops answering: reported 300 ms (the floor) later, not at the 5 s ceiling.
        pipeline.tick(now.plus(299));
        assert_eq!(pipeline.poll(), None);
        now = now.plus(300);
        pipeline.tick(now);
        assert_eq!(pipeline.poll(), Some(Output::StageLate { session, step: late_step, contributor: a, misses: 1 }));
        candidates[0].recent_drops += 1;
        let relief = relieve(&shape, pipeline.plan(), &candidates, a, &Policy::default(), false);
        assert_eq!(relief.moves.len(), 1);
        assert_eq!((relief.moves[0].to, relief.moves[0].from_standby), (d, true));
        // `a` stays, standing by for the span it lost (it still has the weights).
        assert_eq!(relief.plan.stages[0].contributor, d);
        assert_eq!(relief.plan.stages[0].standby, Some(a));
        pipeline.set_plan(relief.plan);
        // The prompt and the first token are replayed into `d` alone, then the step goes again.
        let Some(Output::Step { step: replay, positions, route, sample: false, .. }) = pipeline.poll() else { panic!("a replay") };
        assert_eq!((positions, route), (0..3, vec![d]));
        // `a`'s late answer arrives: stale, and nothing changes.
        assert_eq!(pipeline.acknowledge(now.plus(10), session, late_step, a), Received::Stale);
        assert_eq!(pipeline.returned(session, late_step), Err(Received::Stale));
        assert_eq!(pipeline.poll(), None);
        pipeline.dispatched(now, session, replay, d, 3);
        assert_eq!(pipeline.acknowledge(now.plus(20), session, replay, d), Received::Accepted);
        assert_eq!(pipeline.returned(session, replay), Ok(false));
        let Some(Output::Step { positions, route, sample: true, .. }) = pipeline.poll() else { panic!("the step again") };
        assert_eq!((positions, route), (3..4, vec![d, b, c]));
    }

    #[test]
    fn a_plan_that_only_changes_standbys_disturbs_nothing() {
        let (mut pipeline, mut candidates, shape) = three_stages(300, 5_000);
        let session = SessionId(1);
        pipeline.start(session, vec![5, 6, 7]).unwrap();
        let Some(Output::Step { step, route, .. }) = pipeline.poll() else { panic!("a step") };
        pipeline.dispatched(Millis(0), session, step, route[0], 3);
        assert_eq!(pipeline.acknowledge(Millis(10), session, step, route[0]), Received::Accepted);
        // A fifth contributor joins mid-step: it stands by for the second span.
        candidates.push(Candidate { contributor: ContributorId(5), blocks_per_second: 1.0, memory_bytes: 3, recent_drops: 0 });
        let admitted = crate::placement::admit(&shape, pipeline.plan(), &candidates, &Policy::default(), false).unwrap();
        assert!(admitted.moves.is_empty());
        assert_eq!(admitted.plan.stages[1].standby, Some(ContributorId(5)));
        pipeline.set_plan(admitted.plan);
        assert_eq!(pipeline.poll(), None, "no replay, no step issued again");
        for &holder in &route[1..] {
            assert_eq!(pipeline.acknowledge(Millis(20), session, step, holder), Received::Accepted);
        }
        assert_eq!(pipeline.returned(session, step), Ok(true));
    }

    #[test]
    fn stale_and_misrouted_answers_are_ignored() {
        let shape = ModelShape { blocks: 4, bytes_per_block: 1 };
        let candidates: Vec<Candidate> = (1..=2).map(|id| Candidate { contributor: ContributorId(id), blocks_per_second: 1.0, memory_bytes: 4, recent_drops: 0 }).collect();
        let plan = plan(&shape, &candidates, &Policy { bottleneck_slack: 0.0, ..Policy::default() }).unwrap();
        let route: Vec<ContributorId> = plan.stages.iter().map(|s| s.contributor).collect();
        assert_eq!(route.len(), 2);
        let mut pipeline = Pipeline::new(PipelineConfig::default(), plan.clone());
        let now = Millis(0);
        let session = SessionId(1);
        assert_eq!(pipeline.start(session, vec![]), Err(PipelineError::EmptyPrompt));
        pipeline.start(session, vec![1, 2, 3]).unwrap();
        assert_eq!(pipeline.start(session, vec![1]), Err(PipelineError::Exists(session)));
        let Some(Output::Step { step, .. }) = pipeline.poll() else { panic!("a first step") };
        // Out of order, wrong step, unknown session: all stale.
        assert_eq!(pipeline.acknowledge(now, session, step, route[1]), Received::Stale);
        assert_eq!(pipeline.acknowledge(now, session, step + 1, route[0]), Received::Stale);
        assert_eq!(pipeline.acknowledge(now, SessionId(9), step, route[0]), Received::Stale);
        assert_eq!(pipeline.returned(session, step), Err(Received::Stale), "returned before every stage acknowledged");
        assert_eq!(pipeline.acknowledge(now, session, step, route[0]), Received::Accepted);
        assert_eq!(pipeline.acknowledge(now, session, step, route[0]), Received::Stale, "twice");
        assert_eq!(pipeline.acknowledge(now, session, step, route[1]), Received::Accepted);
        assert_eq!(pipeline.returned(session, step), Ok(true));
        assert_eq!(pipeline.returned(session, step), Err(Received::Stale), "twice");
        pipeline.push_token(session, 7).unwrap();
        let Some(Output::Step { positions, tokens, .. }) = pipeline.poll() else { panic!("a decode step") };
        assert_eq!((positions, tokens), (3..4, vec![7]));
        pipeline.finish(session).unwrap();
        assert_eq!(pipeline.finish(session), Err(PipelineError::Unknown(session)));
        assert_eq!(pipeline.push_token(session, 1), Err(PipelineError::Unknown(session)));
    }

    #[test]
    fn sessions_beyond_the_limit_are_refused() {
        let shape = ModelShape { blocks: 2, bytes_per_block: 1 };
        let candidates = [Candidate { contributor: ContributorId(1), blocks_per_second: 1.0, memory_bytes: 2, recent_drops: 0 }];
        let plan = plan(&shape, &candidates, &Policy::default()).unwrap();
        let mut pipeline = Pipeline::new(PipelineConfig { max_sessions: 2, ..PipelineConfig::default() }, plan);
        pipeline.start(SessionId(1), vec![1]).unwrap();
        pipeline.start(SessionId(2), vec![1]).unwrap();
        assert_eq!(pipeline.start(SessionId(3), vec![1]), Err(PipelineError::Full(2)));
        assert_eq!(pipeline.sessions(), 2);
    }
}
