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
//! abandoned are stale and ignored. Deadlines are per step: the first stage on the route that has
//! not acknowledged by then is reported lost ([`Output::StageLate`]), and the shell repairs the
//! plan ([`crate::placement::repair`]) and hands it back with [`Pipeline::set_plan`].

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use tessera_protocol::ContributorId;

use crate::placement::Plan;
use crate::time::Millis;

/// The most generated tokens a replay sends in one chunk: up to this many rows, the engine's
/// kernels compute each row exactly as for a single token.
pub const REPLAY_CHUNK: usize = 8;

/// A generation session (one API request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// Limits and timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineConfig {
    /// How long one stage may take for one step before it is reported late.
    pub stage_deadline_ms: u64,
    /// Sessions at once; more are refused.
    pub max_sessions: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig { stage_deadline_ms: 10_000, max_sessions: 64 }
    }
}

/// What the shell does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Embed `tokens` (positions `positions` of the session) and send the hidden states along
    /// `route`. With `sample`, the returned states are the session's next logits' input; without,
    /// this is a replay and they are dropped.
    Step { session: SessionId, step: u64, positions: Range<usize>, tokens: Vec<u32>, route: Vec<ContributorId>, sample: bool },
    /// The first stage of `route` that did not answer in time: treat it as lost.
    StageLate { session: SessionId, step: u64, contributor: ContributorId },
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
    /// When the stage after the last acknowledged one must have answered.
    deadline: Millis,
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
}

impl Pipeline {
    pub fn new(config: PipelineConfig, plan: Plan) -> Pipeline {
        Pipeline { config, plan, sessions: BTreeMap::new(), next_step: 1, outputs: VecDeque::new() }
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
    pub fn start(&mut self, now: Millis, session: SessionId, prompt: Vec<u32>) -> Result<(), PipelineError> {
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
        self.advance(now, session);
        Ok(())
    }

    /// The next token of `session`, sampled by the shell from the last step's states: it is fed
    /// in the next step.
    pub fn push_token(&mut self, now: Millis, session: SessionId, token: u32) -> Result<(), PipelineError> {
        let state = self.sessions.get_mut(&session).ok_or(PipelineError::Unknown(session))?;
        state.tokens.push(token);
        state.sampling = false;
        self.advance(now, session);
        Ok(())
    }

    /// Ends `session` (finished, cancelled or failed); its contributors may drop its caches.
    pub fn finish(&mut self, session: SessionId) -> Result<(), PipelineError> {
        self.sessions.remove(&session).map(|_| ()).ok_or(PipelineError::Unknown(session))
    }

    /// `contributor` finished its stage of `step` (and passed the states on).
    pub fn acknowledge(&mut self, now: Millis, session: SessionId, step: u64, contributor: ContributorId) -> Received {
        let deadline = self.config.stage_deadline_ms;
        let Some(flight) = self.sessions.get_mut(&session).and_then(|s| s.in_flight.as_mut()) else { return Received::Stale };
        if flight.step != step || flight.route.get(flight.acked) != Some(&contributor) {
            return Received::Stale;
        }
        flight.acked += 1;
        flight.deadline = now.plus(deadline);
        Received::Accepted
    }

    /// The last stage's states for `step` came back. For a sampling step, the shell now samples
    /// and calls [`Pipeline::push_token`]; returns whether it should.
    pub fn returned(&mut self, now: Millis, session: SessionId, step: u64) -> Result<bool, Received> {
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
        self.advance(now, session);
        Ok(flight.sample)
    }

    /// Reports steps whose current stage missed its deadline (once each; the step stays in
    /// flight until the shell replaces the plan).
    pub fn tick(&mut self, now: Millis) {
        for (&session, state) in &mut self.sessions {
            let Some(flight) = &mut state.in_flight else { continue };
            if now < flight.deadline || flight.acked >= flight.route.len() {
                continue;
            }
            let contributor = flight.route[flight.acked];
            flight.deadline = Millis(u64::MAX);
            self.outputs.push_back(Output::StageLate { session, step: flight.step, contributor });
        }
    }

    /// Replaces the plan (after a repair or a re-plan). Every session abandons its step in
    /// flight and replays what it has fed through the stages that changed (each stage whose span
    /// or holder differs, and every stage before the last such one, whose outputs the new holders
    /// need), then goes on.
    pub fn set_plan(&mut self, now: Millis, plan: Plan) {
        let unchanged = |i: usize| {
            let new = &plan.stages[i];
            self.plan.stages.get(i).is_some_and(|old| old.blocks == new.blocks && old.contributor == new.contributor)
        };
        let through = (0..plan.stages.len()).rev().find(|&i| !unchanged(i)).map_or(0, |i| i + 1);
        self.plan = plan;
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
                self.advance(now, session);
            }
        }
    }

    /// The next thing the shell must do, if any.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Issues the session's next step if none is in flight: a pending replay, else the tokens
    /// not yet fed.
    fn advance(&mut self, now: Millis, session: SessionId) {
        let route = self.route();
        let deadline = now.plus(self.config.stage_deadline_ms);
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
        state.in_flight = Some(InFlight { step, positions: positions.clone(), route: route.clone(), acked: 0, sample, deadline });
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
    use crate::placement::{Candidate, ModelShape, Policy, plan, repair};

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
    /// holder leaves; after `late_after`, it stops answering instead, and must be reported late.
    /// Returns each session's tokens.
    fn run(contributors: usize, sessions: u64, tokens: usize, mut kill_after: Option<usize>, mut late_after: Option<usize>) -> BTreeMap<SessionId, Vec<u32>> {
        let shape = ModelShape { blocks: 30, bytes_per_block: 1 };
        let mut candidates: Vec<Candidate> =
            (1..=contributors as u64).map(|id| Candidate { contributor: ContributorId(id), blocks_per_second: 100.0, memory_bytes: 30, recent_drops: 0 }).collect();
        let policy = Policy::default();
        let mut current = plan(&shape, &candidates, &policy).unwrap();
        let mut stages: HashMap<ContributorId, FakeStage> = candidates.iter().map(|c| (c.contributor, FakeStage::default())).collect();
        let mut pipeline = Pipeline::new(PipelineConfig { stage_deadline_ms: 100, max_sessions: 16 }, current.clone());
        let mut now = Millis(0);
        let mut generated: BTreeMap<SessionId, Vec<u32>> = BTreeMap::new();
        for s in 0..sessions {
            let prompt: Vec<u32> = (0..5 + s as u32 * 7).map(|i| i * 31 + s as u32).collect();
            pipeline.start(now, SessionId(s), prompt).unwrap();
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
                        if hung == Some(*contributor) {
                            completed = false;
                            break;
                        }
                        let blocks = pipeline.plan().stages.iter().find(|s| s.contributor == *contributor).unwrap().blocks.clone();
                        states = stages.get_mut(contributor).unwrap().forward(session, positions.start, &states, blocks);
                        assert_eq!(pipeline.acknowledge(now, session, step, *contributor), Received::Accepted);
                    }
                    if !completed {
                        continue;
                    }
                    if pipeline.returned(now, session, step) == Ok(true) {
                        assert!(sample);
                        returned += 1;
                        let token = (states[states.len() - 1] % 50_000) as u32;
                        let list = generated.get_mut(&session).unwrap();
                        list.push(token);
                        if list.len() < tokens {
                            pipeline.push_token(now, session, token).unwrap();
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
                            pipeline.set_plan(now, current.clone());
                        } else {
                            hung = Some(victim);
                        }
                    }
                }
                Output::StageLate { contributor, .. } => {
                    assert_eq!(Some(contributor), hung, "only the hung stage is late");
                    hung = None;
                    candidates.retain(|c| c.contributor != contributor);
                    stages.remove(&contributor);
                    current = repair(&shape, &current, &candidates, &policy).unwrap().plan;
                    pipeline.set_plan(now, current.clone());
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
        assert_eq!(run(4, 2, 25, None, Some(7)), uninterrupted);
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
        assert_eq!(pipeline.start(now, session, vec![]), Err(PipelineError::EmptyPrompt));
        pipeline.start(now, session, vec![1, 2, 3]).unwrap();
        assert_eq!(pipeline.start(now, session, vec![1]), Err(PipelineError::Exists(session)));
        let Some(Output::Step { step, .. }) = pipeline.poll() else { panic!("a first step") };
        // Out of order, wrong step, unknown session: all stale.
        assert_eq!(pipeline.acknowledge(now, session, step, route[1]), Received::Stale);
        assert_eq!(pipeline.acknowledge(now, session, step + 1, route[0]), Received::Stale);
        assert_eq!(pipeline.acknowledge(now, SessionId(9), step, route[0]), Received::Stale);
        assert_eq!(pipeline.returned(now, session, step), Err(Received::Stale), "returned before every stage acknowledged");
        assert_eq!(pipeline.acknowledge(now, session, step, route[0]), Received::Accepted);
        assert_eq!(pipeline.acknowledge(now, session, step, route[0]), Received::Stale, "twice");
        assert_eq!(pipeline.acknowledge(now, session, step, route[1]), Received::Accepted);
        assert_eq!(pipeline.returned(now, session, step), Ok(true));
        assert_eq!(pipeline.returned(now, session, step), Err(Received::Stale), "twice");
        pipeline.push_token(now, session, 7).unwrap();
        let Some(Output::Step { positions, tokens, .. }) = pipeline.poll() else { panic!("a decode step") };
        assert_eq!((positions, tokens), (3..4, vec![7]));
        pipeline.finish(session).unwrap();
        assert_eq!(pipeline.finish(session), Err(PipelineError::Unknown(session)));
        assert_eq!(pipeline.push_token(now, session, 1), Err(PipelineError::Unknown(session)));
    }

    #[test]
    fn sessions_beyond_the_limit_are_refused() {
        let shape = ModelShape { blocks: 2, bytes_per_block: 1 };
        let candidates = [Candidate { contributor: ContributorId(1), blocks_per_second: 1.0, memory_bytes: 2, recent_drops: 0 }];
        let plan = plan(&shape, &candidates, &Policy::default()).unwrap();
        let mut pipeline = Pipeline::new(PipelineConfig { max_sessions: 2, ..PipelineConfig::default() }, plan);
        pipeline.start(Millis(0), SessionId(1), vec![1]).unwrap();
        pipeline.start(Millis(0), SessionId(2), vec![1]).unwrap();
        assert_eq!(pipeline.start(Millis(0), SessionId(3), vec![1]), Err(PipelineError::Full(2)));
        assert_eq!(pipeline.sessions(), 2);
    }
}
