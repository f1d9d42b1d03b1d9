//! Span placement, sans-IO: which contributor holds which contiguous span of a model's blocks.
//!
//! A model of `blocks` transformer blocks is served as a pipeline of stages, each a contiguous
//! span of blocks on one contributor. For many concurrent sessions the pipeline moves at the
//! pace of its slowest stage, so [`plan`] makes the slowest stage as fast as each contributor's
//! speed and memory allow. Every stage is also a network hop for every token, and every
//! contributor holding a stage is one fewer standing by, so it takes the fewest contributors
//! whose slowest stage is within `Policy::bottleneck_slack` of the fastest possible, balances
//! the spans among them, and lets the rest stand by for a span, ready to take it over when its
//! holder leaves.
//!
//! [`repair`] keeps a running plan running: a stage whose holder is still here is never moved
//! (its sessions' KV caches live there), a lost holder is replaced by its standby, else by a
//! free contributor that can hold the span, and only when neither exists is the whole model
//! re-planned. Whether a better plan is worth moving sessions for is the caller's choice
//! ([`Plan::worth_replacing_with`]); a join alone never disturbs a stage.
//!
//! What can be fetched ahead is placement's call too: [`prefetches`] names the spans a free
//! contributor could take over, and [`contingencies`] the spans each holder would get in the
//! fresh plan that losing another holder would force, so that even that slowest recovery loads
//! its shards from disk.
//!
//! A contributor that keeps dropping its span (`recent_drops >= Policy::max_drops`) holds no
//! stage while steadier contributors can hold the model; it may still stand by.
//!
//! [`relieve`] moves the span of a holder that missed a deadline but is still connected, as if
//! it had left, and lets it stand by; when nobody else can take the span the plan stays. [`admit`]
//! places a contributor that joined: a standby, unless no session is running and a fresh plan is
//! worth it. [`loads`] says which contributors must load or unload which spans for a plan:
//! standbys load their span too (after the holders), so a standby takes over without a download.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use tessera_protocol::ContributorId;

/// What placement knows of a contributor that could hold a span.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub contributor: ContributorId,
    /// Blocks it runs per second for one decode step (from its measured speed).
    pub blocks_per_second: f64,
    /// Bytes of GPU memory it lets us use.
    pub memory_bytes: u64,
    /// Spans it dropped recently (left, or missed a deadline, while holding one).
    pub recent_drops: u32,
}

/// The model being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub blocks: u32,
    /// Memory one block takes on its holder: weights plus the KV cache for the sessions a stage
    /// serves.
    pub bytes_per_block: u64,
}

/// How placement trades stability against speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// A contributor with this many recent drops holds no stage while others can.
    pub max_drops: u32,
    /// A plan may use fewer contributors when its slowest stage is at most this much slower
    /// (as a fraction) than the fastest possible: one stage fewer saves a hop per token and
    /// frees a contributor to stand by. 0 always takes the fastest plan.
    pub bottleneck_slack: f64,
    /// A fresh plan is worth moving running sessions for only when its slowest stage takes at
    /// most this fraction of the current one's time.
    pub replan_gain: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { max_drops: 3, bottleneck_slack: 0.25, replan_gain: 0.7 }
    }
}

/// One stage of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub blocks: Range<u32>,
    pub contributor: ContributorId,
    /// A contributor that can hold this span and takes it over when `contributor` is lost.
    pub standby: Option<ContributorId>,
    /// Seconds this stage takes per decode step, as its contributor's speed predicts.
    pub seconds: f64,
}

/// Stages in pipeline order; their spans are contiguous and cover every block once.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stages: Vec<Stage>,
}

/// A contributor's role in a plan: the span it holds or stands by for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub contributor: ContributorId,
    pub blocks: Range<u32>,
    pub standby: bool,
}

/// What contributors must load and unload for a plan (see [`loads`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Loads {
    /// Spans held (or loading) that no role needs any more: free their memory.
    pub unload: Vec<(ContributorId, Range<u32>)>,
    /// Roles whose span is not held yet: holders first, in pipeline order, then standbys.
    pub load: Vec<Role>,
}

/// A span that changes hands in a repair: its new holder loads it (and rebuilds the KV cache of
/// every session by replaying its tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub blocks: Range<u32>,
    /// `None` for a span that had no holder (a fresh plan).
    pub from: Option<ContributorId>,
    pub to: ContributorId,
    /// The new holder was this span's standby (it may hold the weights already).
    pub from_standby: bool,
}

/// The outcome of [`repair`].
#[derive(Debug, Clone, PartialEq)]
pub struct Repair {
    pub plan: Plan,
    /// Spans whose holder changed; empty when every stage kept its holder.
    pub moves: Vec<Move>,
    /// No stage could be kept as it was: the model was placed afresh.
    pub replanned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("the model has no blocks to place")]
    EmptyModel,
    #[error(
        "not enough memory for the model: its {blocks} blocks need {needed} bytes, and the {contributors} \
         contributor(s) that could hold a block offer {available} bytes between them (each holds whole \
         blocks of {bytes_per_block} bytes)"
    )]
    NotEnoughMemory { blocks: u32, bytes_per_block: u64, needed: u64, available: u64, contributors: usize },
}

impl Plan {
    /// Seconds the slowest stage takes per decode step: the pipeline's pace with many sessions.
    pub fn bottleneck_seconds(&self) -> f64 {
        self.stages.iter().map(|s| s.seconds).fold(0.0, f64::max)
    }

    /// Seconds one token takes through every stage: one session's pace (hops not counted).
    pub fn token_seconds(&self) -> f64 {
        self.stages.iter().map(|s| s.seconds).sum()
    }

    /// The stage holding `block`.
    pub fn stage_of(&self, block: u32) -> Option<&Stage> {
        self.stages.iter().find(|s| s.blocks.contains(&block))
    }

    /// Every contributor in the plan, holding a stage or standing by.
    pub fn members(&self) -> BTreeSet<ContributorId> {
        self.stages.iter().flat_map(|s| std::iter::once(s.contributor).chain(s.standby)).collect()
    }

    /// Every role: the holders in pipeline order, then the standbys in the same order.
    pub fn roles(&self) -> Vec<Role> {
        let holders = self.stages.iter().map(|s| Role { contributor: s.contributor, blocks: s.blocks.clone(), standby: false });
        let standbys = self.stages.iter().filter_map(|s| s.standby.map(|id| Role { contributor: id, blocks: s.blocks.clone(), standby: true }));
        holders.chain(standbys).collect()
    }

    /// Whether moving running sessions from this plan to `fresh` pays: `fresh`'s slowest stage
    /// takes at most `policy.replan_gain` of this one's.
    pub fn worth_replacing_with(&self, fresh: &Plan, policy: &Policy) -> bool {
        fresh.bottleneck_seconds() <= policy.replan_gain * self.bottleneck_seconds()
    }
}

/// Blocks `candidate` can hold in memory (at most the whole model).
fn memory_capacity(candidate: &Candidate, shape: &ModelShape) -> u32 {
    let blocks = candidate.memory_bytes / shape.bytes_per_block.max(1);
    blocks.min(u64::from(shape.blocks)) as u32
}

fn usable(candidate: &Candidate) -> bool {
    candidate.blocks_per_second.is_finite() && candidate.blocks_per_second > 0.0
}

/// Blocks `candidate` can hold within `seconds` per step and its memory.
fn capacity_within(candidate: &Candidate, shape: &ModelShape, seconds: f64) -> u32 {
    // The tolerance makes a bound computed as `k / speed` admit its own `k` blocks.
    let by_time = (seconds * candidate.blocks_per_second * (1.0 + 1e-9)).floor();
    memory_capacity(candidate, shape).min(by_time.min(f64::from(u32::MAX)) as u32)
}

fn stage_seconds(blocks: &Range<u32>, candidate: &Candidate) -> f64 {
    f64::from(blocks.end - blocks.start) / candidate.blocks_per_second
}

/// Places `shape` afresh on `candidates`: the fewest contributors whose slowest stage is within
/// the policy's slack of the fastest possible, spans balanced among them, then a standby for as
/// many spans as the rest can hold (slowest spans first). Ties go to the lower contributor id,
/// so the same swarm always gets the same plan.
pub fn plan(shape: &ModelShape, candidates: &[Candidate], policy: &Policy) -> Result<Plan, PlacementError> {
    if shape.blocks == 0 {
        return Err(PlacementError::EmptyModel);
    }
    let able: Vec<&Candidate> = candidates.iter().filter(|c| usable(c) && memory_capacity(c, shape) > 0).collect();
    let steady: Vec<&Candidate> = able.iter().copied().filter(|c| c.recent_drops < policy.max_drops).collect();
    let holds_model = |set: &[&Candidate]| set.iter().map(|c| u64::from(memory_capacity(c, shape))).sum::<u64>() >= u64::from(shape.blocks);
    let primaries = if holds_model(&steady) {
        steady
    } else if holds_model(&able) {
        able.clone()
    } else {
        return Err(PlacementError::NotEnoughMemory {
            blocks: shape.blocks,
            bytes_per_block: shape.bytes_per_block,
            needed: u64::from(shape.blocks) * shape.bytes_per_block,
            available: able.iter().map(|c| c.memory_bytes).sum(),
            contributors: able.len(),
        });
    };

    let fastest = fastest_bottleneck(shape, &primaries);
    let slack = policy.bottleneck_slack.max(0.0);
    let fewest: BTreeSet<ContributorId> = choose_stages(shape, &primaries, fastest * (1.0 + slack)).iter().map(|s| s.contributor).collect();
    let chosen: Vec<&Candidate> = primaries.into_iter().filter(|c| fewest.contains(&c.contributor)).collect();
    let mut stages = choose_stages(shape, &chosen, fastest_bottleneck(shape, &chosen));
    let taken: BTreeSet<ContributorId> = stages.iter().map(|s| s.contributor).collect();
    let spare: Vec<&Candidate> = able.into_iter().filter(|c| !taken.contains(&c.contributor)).collect();
    assign_standbys(shape, &mut stages, spare, policy);
    Ok(Plan { stages })
}

/// The least per-step time of a slowest stage that `candidates` can achieve. Every achievable
/// bottleneck is `k / speed` for some candidate and `k` blocks, so the answer is the least such
/// value at which the candidates' capacities add up to the model.
fn fastest_bottleneck(shape: &ModelShape, candidates: &[&Candidate]) -> f64 {
    let mut bounds: Vec<f64> = candidates
        .iter()
        .flat_map(|c| (1..=memory_capacity(c, shape)).map(move |k| f64::from(k) / c.blocks_per_second))
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    let fits = |seconds: f64| {
        candidates.iter().map(|c| u64::from(capacity_within(c, shape, seconds))).sum::<u64>() >= u64::from(shape.blocks)
    };
    // The largest bound always fits: it admits each candidate's whole memory capacity.
    let first_fit = bounds.partition_point(|&seconds| !fits(seconds));
    bounds[first_fit.min(bounds.len() - 1)]
}

/// The fewest stages within `seconds`: the candidates that can take the most blocks in that
/// time go first, each taking as many as it can, the last taking what remains.
fn choose_stages(shape: &ModelShape, candidates: &[&Candidate], seconds: f64) -> Vec<Stage> {
    let mut order: Vec<(&Candidate, u32)> = candidates.iter().map(|c| (*c, capacity_within(c, shape, seconds))).collect();
    order.sort_by(|(a, ca), (b, cb)| cb.cmp(ca).then(b.blocks_per_second.total_cmp(&a.blocks_per_second)).then(a.contributor.cmp(&b.contributor)));
    let mut stages = Vec::new();
    let mut start = 0;
    for (candidate, capacity) in order {
        if start == shape.blocks {
            break;
        }
        let take = capacity.min(shape.blocks - start);
        if take == 0 {
            continue;
        }
        let blocks = start..start + take;
        stages.push(Stage { seconds: stage_seconds(&blocks, candidate), blocks, contributor: candidate.contributor, standby: None });
        start += take;
    }
    stages
}

/// Gives each span without a standby the fastest spare contributor that can hold it, most
/// critical (slowest) spans first; steady contributors before ones that keep dropping.
fn assign_standbys(shape: &ModelShape, stages: &mut [Stage], mut spare: Vec<&Candidate>, policy: &Policy) {
    spare.sort_by(|a, b| {
        (a.recent_drops >= policy.max_drops)
            .cmp(&(b.recent_drops >= policy.max_drops))
            .then(b.blocks_per_second.total_cmp(&a.blocks_per_second))
            .then(a.contributor.cmp(&b.contributor))
    });
    let mut order: Vec<usize> = (0..stages.len()).filter(|&i| stages[i].standby.is_none()).collect();
    order.sort_by(|&a, &b| stages[b].seconds.total_cmp(&stages[a].seconds).then(a.cmp(&b)));
    for i in order {
        let span = stages[i].blocks.end - stages[i].blocks.start;
        if let Some(pick) = spare.iter().position(|c| memory_capacity(c, shape) >= span) {
            stages[i].standby = Some(spare.remove(pick).contributor);
        }
    }
}

/// Brings `current` up to date with the contributors now connected (`candidates`), disturbing
/// as little as possible: stages whose holder is still here keep it; a lost holder's span goes
/// to its standby, else to the fastest free contributor that can hold it; standbys that left are
/// replaced from the free contributors. When some span can be given to nobody, the model is
/// placed afresh (`replanned`), which moves every span whose holder changes.
pub fn repair(shape: &ModelShape, current: &Plan, candidates: &[Candidate], policy: &Policy) -> Result<Repair, PlacementError> {
    let here = |id: ContributorId| candidates.iter().find(|c| c.contributor == id && usable(c));
    let mut used: BTreeSet<ContributorId> = current.stages.iter().map(|s| s.contributor).filter(|&id| here(id).is_some()).collect();
    let mut stages = current.stages.clone();
    let mut moves = Vec::new();
    for stage in &mut stages {
        if stage.standby.is_some_and(|id| here(id).is_none() || used.contains(&id)) {
            stage.standby = None;
        }
        if let Some(holder) = here(stage.contributor) {
            stage.seconds = stage_seconds(&stage.blocks, holder);
            continue;
        }
        let span = stage.blocks.end - stage.blocks.start;
        let (next, from_standby) = match stage.standby.take() {
            Some(standby) => (here(standby), true),
            None => {
                let free = candidates.iter().filter(|c| {
                    usable(c) && !used.contains(&c.contributor) && memory_capacity(c, shape) >= span && c.recent_drops < policy.max_drops
                });
                (free.max_by(|a, b| a.blocks_per_second.total_cmp(&b.blocks_per_second).then(b.contributor.cmp(&a.contributor))), false)
            }
        };
        let Some(next) = next else {
            return replan(shape, current, candidates, policy);
        };
        used.insert(next.contributor);
        moves.push(Move { blocks: stage.blocks.clone(), from: Some(stage.contributor), to: next.contributor, from_standby });
        stage.contributor = next.contributor;
        stage.seconds = stage_seconds(&stage.blocks, next);
    }
    // A standby taken as a free contributor for another span holds that span now.
    for stage in &mut stages {
        if stage.standby.is_some_and(|id| used.contains(&id)) {
            stage.standby = None;
        }
    }
    let standing_by: BTreeSet<ContributorId> = stages.iter().filter_map(|s| s.standby).collect();
    let spare: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| usable(c) && !used.contains(&c.contributor) && !standing_by.contains(&c.contributor))
        .collect();
    assign_standbys(shape, &mut stages, spare, policy);
    Ok(Repair { plan: Plan { stages }, moves, replanned: false })
}

/// Moves the span of `late`, a holder that missed a deadline but is still connected, as
/// [`repair`] would had it left, then lets it stand by (often for the span it just lost, whose
/// weights it still has). Only with `replan` may the model be placed afresh without it (every
/// span reloaded: worth it for a holder that keeps missing, not for one slow answer). When the
/// others cannot take its span (or hold the model), nothing moves: the caller keeps waiting.
pub fn relieve(shape: &ModelShape, current: &Plan, candidates: &[Candidate], late: ContributorId, policy: &Policy, replan: bool) -> Repair {
    let others: Vec<Candidate> = candidates.iter().filter(|c| c.contributor != late).cloned().collect();
    let kept = Repair { plan: current.clone(), moves: Vec::new(), replanned: false };
    let Ok(moved) = repair(shape, current, &others, policy) else { return kept };
    if moved.replanned && !replan {
        return kept;
    }
    // Every holder of `moved` is connected, so this only adds standbys.
    let plan = repair(shape, &moved.plan, candidates, policy).map_or(moved.plan, |r| r.plan);
    Repair { plan, moves: moved.moves, replanned: moved.replanned }
}

/// Places the contributors now connected after one joined: it stands by ([`repair`] moves no
/// span whose holder is here). Only when no session is running (`idle`) and a fresh plan is
/// worth it ([`Plan::worth_replacing_with`]) is the model placed afresh.
pub fn admit(shape: &ModelShape, current: &Plan, candidates: &[Candidate], policy: &Policy, idle: bool) -> Result<Repair, PlacementError> {
    let kept = repair(shape, current, candidates, policy)?;
    if idle
        && !kept.replanned
        && let Ok(fresh) = plan(shape, candidates, policy)
        && kept.plan.worth_replacing_with(&fresh, policy)
    {
        return Ok(Repair { moves: moves_between(current, &fresh), plan: fresh, replanned: true });
    }
    Ok(kept)
}

/// What contributors must load and unload so that every role of `plan` has its span, given the
/// span each contributor holds or is loading (`held`). A contributor whose role changed unloads
/// its old span; holders load before standbys.
pub fn loads(held: &BTreeMap<ContributorId, Range<u32>>, plan: &Plan) -> Loads {
    let roles = plan.roles();
    let role_of = |id: ContributorId| roles.iter().find(|r| r.contributor == id).map(|r| &r.blocks);
    let unload = held.iter().filter(|&(&id, blocks)| role_of(id) != Some(blocks)).map(|(&id, blocks)| (id, blocks.clone())).collect();
    let load = roles.iter().filter(|r| held.get(&r.contributor) != Some(&r.blocks)).cloned().collect();
    Loads { unload, load }
}

/// The spans each contributor that holds none could take over (its memory holds them), other
/// than the one it stands by for and loads already: what it should fetch ahead, so that a
/// takeover ([`repair`] gives a lost span to a free contributor when it has no standby) loads
/// from disk instead of downloading. In pipeline order.
pub fn prefetches(shape: &ModelShape, plan: &Plan, candidates: &[Candidate]) -> Vec<(ContributorId, Vec<Range<u32>>)> {
    candidates
        .iter()
        .filter(|c| usable(c) && plan.stages.iter().all(|s| s.contributor != c.contributor))
        .filter_map(|c| {
            let spans: Vec<Range<u32>> = plan
                .stages
                .iter()
                .filter(|s| s.standby != Some(c.contributor) && s.blocks.len() as u32 <= memory_capacity(c, shape))
                .map(|s| s.blocks.clone())
                .collect();
            (!spans.is_empty()).then_some((c.contributor, spans))
        })
        .collect()
}

/// The spans contributors would be given if a holder were lost when [`repair`] can only place
/// the model afresh (the span has no standby and no free contributor can hold it): for each
/// holder in turn, the roles of the plan made without it that differ from what their
/// contributors have now. What those contributors should fetch ahead, so that such a re-plan,
/// the slowest recovery there is, loads from disk instead of publishing and downloading. Per
/// contributor, in the order of the holders.
pub fn contingencies(shape: &ModelShape, plan: &Plan, candidates: &[Candidate], policy: &Policy) -> Vec<(ContributorId, Vec<Range<u32>>)> {
    let now: BTreeMap<ContributorId, Range<u32>> = plan.roles().into_iter().map(|r| (r.contributor, r.blocks)).collect();
    let mut ahead: Vec<(ContributorId, Vec<Range<u32>>)> = Vec::new();
    for lost in plan.stages.iter().map(|s| s.contributor) {
        let others: Vec<Candidate> = candidates.iter().filter(|c| c.contributor != lost).cloned().collect();
        let Ok(Repair { plan: fresh, replanned: true, .. }) = repair(shape, plan, &others, policy) else { continue };
        for role in fresh.roles().into_iter().filter(|r| now.get(&r.contributor) != Some(&r.blocks)) {
            match ahead.iter_mut().find(|(id, _)| *id == role.contributor) {
                Some((_, spans)) if !spans.contains(&role.blocks) => spans.push(role.blocks),
                Some(_) => {}
                None => ahead.push((role.contributor, vec![role.blocks])),
            }
        }
    }
    ahead
}

fn replan(shape: &ModelShape, current: &Plan, candidates: &[Candidate], policy: &Policy) -> Result<Repair, PlacementError> {
    let fresh = plan(shape, candidates, policy)?;
    Ok(Repair { moves: moves_between(current, &fresh), plan: fresh, replanned: true })
}

/// The spans whose holder differs between `current` and `fresh`.
fn moves_between(current: &Plan, fresh: &Plan) -> Vec<Move> {
    fresh
        .stages
        .iter()
        .filter(|stage| current.stages.iter().all(|old| old.blocks != stage.blocks || old.contributor != stage.contributor))
        .map(|stage| {
            let before = current.stages.iter().find(|old| old.blocks == stage.blocks);
            Move {
                blocks: stage.blocks.clone(),
                from: before.map(|old| old.contributor),
                to: stage.contributor,
                from_standby: before.is_some_and(|old| old.standby == Some(stage.contributor)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_engine::checks::Rng;

    const MIB: u64 = 1 << 20;

    fn candidate(id: u64, blocks_per_second: f64, memory_blocks: u64) -> Candidate {
        Candidate { contributor: ContributorId(id), blocks_per_second, memory_bytes: memory_blocks * MIB, recent_drops: 0 }
    }

    fn shape(blocks: u32) -> ModelShape {
        ModelShape { blocks, bytes_per_block: MIB }
    }

    fn spans(plan: &Plan) -> Vec<(Range<u32>, u64)> {
        plan.stages.iter().map(|s| (s.blocks.clone(), s.contributor.0)).collect()
    }

    /// The plan's stages cover every block once, in order; each holder and standby is a
    /// distinct present candidate whose memory holds its span; `seconds` matches its speed.
    fn check_valid(shape: &ModelShape, plan: &Plan, candidates: &[Candidate]) {
        let mut next = 0;
        let mut seen = BTreeSet::new();
        for stage in &plan.stages {
            assert_eq!(stage.blocks.start, next, "spans are contiguous: {plan:?}");
            assert!(stage.blocks.end > stage.blocks.start, "no empty stage: {plan:?}");
            next = stage.blocks.end;
            for id in std::iter::once(stage.contributor).chain(stage.standby) {
                assert!(seen.insert(id), "{id} has two roles: {plan:?}");
                let c = candidates.iter().find(|c| c.contributor == id).unwrap_or_else(|| panic!("{id} is not connected: {plan:?}"));
                assert!(memory_capacity(c, shape) >= stage.blocks.end - stage.blocks.start, "{id} cannot hold {:?}", stage.blocks);
            }
            let holder = candidates.iter().find(|c| c.contributor == stage.contributor).unwrap();
            assert!((stage.seconds - stage_seconds(&stage.blocks, holder)).abs() < 1e-9);
        }
        assert_eq!(next, shape.blocks, "every block is placed: {plan:?}");
    }

    /// The least bottleneck over every choice of stage holders, order and split: small cases only.
    fn brute_force_bottleneck(shape: &ModelShape, candidates: &[Candidate]) -> f64 {
        fn go(shape: &ModelShape, candidates: &[Candidate], used: &mut Vec<bool>, start: u32, worst: f64, best: &mut f64) {
            if start == shape.blocks {
                *best = best.min(worst);
                return;
            }
            for i in 0..candidates.len() {
                if used[i] {
                    continue;
                }
                used[i] = true;
                for end in start + 1..=shape.blocks.min(start + memory_capacity(&candidates[i], shape)) {
                    let seconds = stage_seconds(&(start..end), &candidates[i]);
                    go(shape, candidates, used, end, worst.max(seconds), best);
                }
                used[i] = false;
            }
        }
        let mut best = f64::INFINITY;
        go(shape, candidates, &mut vec![false; candidates.len()], 0, 0.0, &mut best);
        best
    }

    #[test]
    fn equal_contributors_split_the_model_evenly() {
        let candidates = [candidate(1, 100.0, 30), candidate(2, 100.0, 30), candidate(3, 100.0, 30)];
        let plan = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        // One contributor could hold it all, but three stages make each a third as slow.
        assert_eq!(spans(&plan), vec![(0..10, 1), (10..20, 2), (20..30, 3)]);
        assert!((plan.bottleneck_seconds() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn faster_contributors_hold_longer_spans() {
        let candidates = [candidate(1, 10.0, 30), candidate(2, 20.0, 30), candidate(3, 30.0, 30)];
        let exact = Policy { bottleneck_slack: 0.0, ..Policy::default() };
        let fastest = plan(&shape(30), &candidates, &exact).unwrap();
        assert_eq!(spans(&fastest), vec![(0..15, 3), (15..25, 2), (25..30, 1)]);
        assert!((fastest.bottleneck_seconds() - 0.5).abs() < 1e-12);
        // Two stages take 0.6 s, within the default slack: the slowest stands by instead.
        let fewer = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        assert_eq!(spans(&fewer), vec![(0..18, 3), (18..30, 2)]);
        assert_eq!(fewer.stages[0].standby, Some(ContributorId(1)));
    }

    #[test]
    fn memory_limits_force_more_stages() {
        // The fast one holds only 4 blocks; the slow ones must take the rest.
        let candidates = [candidate(1, 1000.0, 4), candidate(2, 10.0, 30), candidate(3, 10.0, 30)];
        let plan = plan(&shape(12), &candidates, &Policy::default()).unwrap();
        check_valid(&shape(12), &plan, &candidates);
        assert_eq!(spans(&plan)[0], (0..4, 1));
        assert!((plan.bottleneck_seconds() - 0.4).abs() < 1e-12, "{plan:?}");
    }

    #[test]
    fn not_enough_memory_is_a_clear_error() {
        let candidates = [candidate(1, 10.0, 8), candidate(2, 10.0, 8), Candidate { memory_bytes: MIB / 2, ..candidate(3, 10.0, 0) }];
        let error = plan(&shape(30), &candidates, &Policy::default()).unwrap_err();
        assert_eq!(
            error,
            PlacementError::NotEnoughMemory { blocks: 30, bytes_per_block: MIB, needed: 30 * MIB, available: 16 * MIB, contributors: 2 }
        );
        let message = error.to_string();
        assert!(message.contains("30 blocks need 31457280 bytes") && message.contains("offer 16777216 bytes"), "{message}");
        assert!(plan(&shape(30), &[], &Policy::default()).unwrap_err().to_string().contains("0 contributor(s)"));
        assert_eq!(plan(&shape(0), &candidates, &Policy::default()), Err(PlacementError::EmptyModel));
    }

    #[test]
    fn a_contributor_that_would_gain_little_stands_by_instead() {
        // Four stages would take 0.8 s a step, three take 1.0 s: within the slack, so the
        // fourth contributor stands by, for the slowest span (all equal: the first).
        let candidates = [candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 10.0, 30), candidate(4, 10.0, 30), candidate(5, 1.0, 3)];
        let plan = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        check_valid(&shape(30), &plan, &candidates);
        assert_eq!(spans(&plan), vec![(0..10, 1), (10..20, 2), (20..30, 3)]);
        // Contributor 5 holds 3 blocks: it can stand by for no span of this plan.
        assert_eq!(plan.stages.iter().map(|s| s.standby).collect::<Vec<_>>(), vec![Some(ContributorId(4)), None, None]);
        // Without slack, every contributor that helps holds a stage.
        let fastest = super::plan(&shape(30), &candidates, &Policy { bottleneck_slack: 0.0, ..Policy::default() }).unwrap();
        assert!((fastest.bottleneck_seconds() - 0.8).abs() < 1e-12, "{fastest:?}");
        assert_eq!(fastest.stages.len(), 4);
    }

    #[test]
    fn plans_are_optimal_on_small_swarms() {
        let exact = Policy { bottleneck_slack: 0.0, ..Policy::default() };
        let mut rng = Rng::new(7);
        for case in 0..300 {
            let blocks = 1 + rng.below(8);
            let candidates: Vec<Candidate> =
                (0..1 + rng.below(4)).map(|i| candidate(u64::from(i), f64::from(1 + rng.below(20)), u64::from(1 + rng.below(blocks + 1)))).collect();
            let shape = shape(blocks);
            let best = brute_force_bottleneck(&shape, &candidates);
            match plan(&shape, &candidates, &exact) {
                Ok(plan) => {
                    check_valid(&shape, &plan, &candidates);
                    assert!((plan.bottleneck_seconds() - best).abs() < 1e-9, "case {case}: {plan:?} vs best {best}, {candidates:?}");
                    let slack = Policy::default().bottleneck_slack;
                    let fewer = super::plan(&shape, &candidates, &Policy::default()).unwrap();
                    check_valid(&shape, &fewer, &candidates);
                    assert!(fewer.bottleneck_seconds() <= best * (1.0 + slack) + 1e-9, "case {case}: {fewer:?} vs best {best}");
                    assert!(fewer.stages.len() <= plan.stages.len(), "case {case}");
                }
                Err(PlacementError::NotEnoughMemory { .. }) => assert!(best.is_infinite(), "case {case}: {candidates:?} can hold it"),
                Err(e) => panic!("case {case}: {e}"),
            }
        }
    }

    #[test]
    fn a_lost_holder_is_replaced_by_its_standby_and_nothing_else_moves() {
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 10.0, 30), candidate(4, 8.0, 30)];
        let before = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        let lost = before.stages.iter().find(|s| s.standby.is_some()).expect("a spare contributor stands by").clone();
        let standby = lost.standby.unwrap_or_else(|| unreachable!());
        candidates.retain(|c| c.contributor != lost.contributor);
        let repair = repair(&shape(30), &before, &candidates, &Policy::default()).unwrap();
        assert!(!repair.replanned);
        assert_eq!(repair.moves, vec![Move { blocks: lost.blocks.clone(), from: Some(lost.contributor), to: standby, from_standby: true }]);
        for (old, new) in before.stages.iter().zip(&repair.plan.stages) {
            assert_eq!(old.blocks, new.blocks);
            if old.contributor != lost.contributor {
                assert_eq!(old.contributor, new.contributor);
            }
        }
        check_valid(&shape(30), &repair.plan, &candidates);
    }

    #[test]
    fn a_join_takes_a_standby_place_and_moves_no_span() {
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30)];
        let policy = Policy::default();
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        candidates.push(candidate(3, 1000.0, 30));
        let repair = repair(&shape(30), &before, &candidates, &policy).unwrap();
        assert!(repair.moves.is_empty() && !repair.replanned);
        assert_eq!(spans(&repair.plan), spans(&before));
        assert!(repair.plan.stages.iter().any(|s| s.standby == Some(ContributorId(3))));
        // Far faster: worth moving sessions for, when the caller chooses to.
        let fresh = plan(&shape(30), &candidates, &policy).unwrap();
        assert!(before.worth_replacing_with(&fresh, &policy));
        assert!(!fresh.worth_replacing_with(&before, &policy));
    }

    #[test]
    fn a_span_nobody_can_take_replans_the_model() {
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30)];
        let before = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        assert_eq!(spans(&before), vec![(0..15, 1), (15..30, 2)]);
        // Contributor 2 leaves; the two that join can hold 10 blocks each, not its 15.
        candidates.retain(|c| c.contributor != ContributorId(2));
        candidates.extend([candidate(3, 10.0, 10), candidate(4, 10.0, 10)]);
        let repair = repair(&shape(30), &before, &candidates, &Policy::default()).unwrap();
        assert!(repair.replanned);
        check_valid(&shape(30), &repair.plan, &candidates);
        assert!(repair.moves.iter().all(|m| m.to != ContributorId(1) || m.blocks != (0..15)), "{repair:?}");
        // With nobody to take the rest, the error says so.
        candidates.retain(|c| c.contributor == ContributorId(3));
        assert!(matches!(super::repair(&shape(30), &before, &candidates, &Policy::default()), Err(PlacementError::NotEnoughMemory { .. })));
    }

    #[test]
    fn a_contributor_that_keeps_dropping_only_stands_by() {
        let policy = Policy::default();
        let flaky = Candidate { recent_drops: policy.max_drops, ..candidate(9, 1000.0, 30) };
        let candidates = [candidate(1, 10.0, 30), candidate(2, 10.0, 30), flaky.clone()];
        let plan = plan(&shape(30), &candidates, &policy).unwrap();
        check_valid(&shape(30), &plan, &candidates);
        assert!(plan.stages.iter().all(|s| s.contributor != flaky.contributor), "{plan:?}");
        assert!(plan.stages.iter().any(|s| s.standby == Some(flaky.contributor)), "{plan:?}");
        // When nobody else can hold the model, it holds a stage after all.
        let alone = super::plan(&shape(30), std::slice::from_ref(&flaky), &policy).unwrap();
        assert_eq!(spans(&alone), vec![(0..30, 9)]);
    }

    fn role(id: u64, blocks: Range<u32>, standby: bool) -> Role {
        Role { contributor: ContributorId(id), blocks, standby }
    }

    #[test]
    fn standbys_load_their_span_after_the_holders() {
        let candidates = [candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 10.0, 30), candidate(4, 8.0, 30)];
        let plan = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        let loads = loads(&BTreeMap::new(), &plan);
        assert!(loads.unload.is_empty());
        assert_eq!(loads.load, vec![role(1, 0..10, false), role(2, 10..20, false), role(3, 20..30, false), role(4, 0..10, true)]);
        // Once they hold their spans, nothing more to do.
        let held: BTreeMap<ContributorId, Range<u32>> = loads.load.iter().map(|r| (r.contributor, r.blocks.clone())).collect();
        assert_eq!(super::loads(&held, &plan), Loads::default());
    }

    #[test]
    fn contributors_holding_no_span_prefetch_the_spans_they_could_take_over() {
        // 1..3 hold 10 blocks each, 4 stands by for 0..10; 5 holds only 5 blocks' worth; 6 has
        // no usable speed.
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 10.0, 30), candidate(4, 8.0, 30)];
        let plan = plan(&shape(30), &candidates, &Policy::default()).unwrap();
        assert_eq!(plan.stages[0].standby, Some(ContributorId(4)));
        candidates.extend([candidate(5, 10.0, 5), candidate(6, 0.0, 30)]);
        let ahead = prefetches(&shape(30), &plan, &candidates);
        assert_eq!(ahead, vec![(ContributorId(4), vec![10..20, 20..30])]);
        // With nobody standing by, a free contributor fetches every span it can hold.
        let alone = Plan { stages: plan.stages.iter().map(|s| Stage { standby: None, ..s.clone() }).collect() };
        assert_eq!(prefetches(&shape(30), &alone, &candidates), vec![(ContributorId(4), vec![0..10, 10..20, 20..30])]);
    }

    /// Three holders of 15 blocks at most, no spare: losing any one places the model afresh on
    /// the other two, and each holder fetches ahead the spans it would get then. With a standby
    /// for every span, no loss re-plans, and nothing is fetched for it.
    #[test]
    fn holders_fetch_ahead_the_spans_a_fresh_plan_would_give_them() {
        let policy = Policy::default();
        let candidates = [candidate(1, 10.0, 15), candidate(2, 10.0, 15), candidate(3, 10.0, 15)];
        let current = plan(&shape(30), &candidates, &policy).unwrap();
        assert_eq!(current.stages.iter().map(|s| (s.contributor.0, s.blocks.clone())).collect::<Vec<_>>(), [(1, 0..10), (2, 10..20), (3, 20..30)]);
        let ahead = contingencies(&shape(30), &current, &candidates, &policy);
        // Each fresh plan of two holders splits the model 0..15, 15..30; a holder may get
        // either half, each listed once.
        let halves = BTreeSet::from([(0, 15), (15, 30)]);
        for (id, spans) in &ahead {
            let listed: BTreeSet<(u32, u32)> = spans.iter().map(|b| (b.start, b.end)).collect();
            assert!(listed.len() == spans.len() && listed.is_subset(&halves), "{id}: {spans:?}");
        }
        let holders: BTreeSet<u64> = ahead.iter().map(|(id, _)| id.0).collect();
        assert_eq!(holders, BTreeSet::from([1, 2, 3]), "{ahead:?}");
        // Each such plan is what `repair` gives when that holder is lost.
        for lost in 1..=3 {
            let others: Vec<Candidate> = candidates.iter().filter(|c| c.contributor.0 != lost).cloned().collect();
            let fresh = repair(&shape(30), &current, &others, &policy).unwrap();
            assert!(fresh.replanned);
            for role in fresh.plan.roles() {
                let spans = &ahead.iter().find(|(id, _)| *id == role.contributor).expect("a survivor fetches ahead").1;
                assert!(spans.contains(&role.blocks), "losing {lost}: {role:?} not fetched ahead ({ahead:?})");
            }
        }
        // A spare that can stand by for any span: every loss goes to it, no re-plan.
        let with_spare = [candidate(1, 10.0, 15), candidate(2, 10.0, 15), candidate(3, 10.0, 15), candidate(4, 5.0, 15)];
        let current = plan(&shape(30), &with_spare, &policy).unwrap();
        let ahead = contingencies(&shape(30), &current, &with_spare, &policy);
        assert!(ahead.is_empty(), "{current:?}: {ahead:?}");
    }

    #[test]
    fn a_contributor_whose_span_moved_unloads_it() {
        let policy = Policy::default();
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30)];
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        let held: BTreeMap<ContributorId, Range<u32>> = before.roles().into_iter().map(|r| (r.contributor, r.blocks)).collect();
        // 2 leaves; 3 and 4 join, and can hold 10 blocks each: placed afresh, 1's span shrinks.
        candidates.retain(|c| c.contributor != ContributorId(2));
        candidates.extend([candidate(3, 10.0, 10), candidate(4, 10.0, 10)]);
        let repair = repair(&shape(30), &before, &candidates, &policy).unwrap();
        assert!(repair.replanned);
        let still_here: BTreeMap<ContributorId, Range<u32>> = held.into_iter().filter(|(id, _)| *id != ContributorId(2)).collect();
        let loads = loads(&still_here, &repair.plan);
        assert_eq!(loads.unload, vec![(ContributorId(1), 0..15)]);
        assert_eq!(loads.load, repair.plan.roles());
        // A late holder relieved by its standby unloads nothing: it stands by for its old span.
        let candidates = [candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 10.0, 30), candidate(4, 8.0, 30)];
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        let held: BTreeMap<ContributorId, Range<u32>> = before.roles().into_iter().map(|r| (r.contributor, r.blocks)).collect();
        let relief = relieve(&shape(30), &before, &candidates, ContributorId(1), &policy, false);
        assert_eq!(relief.moves, vec![Move { blocks: 0..10, from: Some(ContributorId(1)), to: ContributorId(4), from_standby: true }]);
        let loads = super::loads(&held, &relief.plan);
        assert_eq!(loads, Loads::default());
    }

    #[test]
    fn a_late_holder_nobody_can_replace_keeps_its_span() {
        let policy = Policy::default();
        let candidates = [candidate(1, 10.0, 15), candidate(2, 10.0, 15)];
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        let relief = relieve(&shape(30), &before, &candidates, ContributorId(2), &policy, true);
        assert_eq!(relief, Repair { plan: before.clone(), moves: Vec::new(), replanned: false });
        // When the other can hold the whole model, it does, but only when a re-plan is allowed
        // (the holder missed again).
        let candidates = [candidate(1, 10.0, 30), candidate(2, 10.0, 30)];
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        assert!(relieve(&shape(30), &before, &candidates, ContributorId(2), &policy, false).moves.is_empty());
        let relief = relieve(&shape(30), &before, &candidates, ContributorId(2), &policy, true);
        assert!(relief.replanned);
        assert_eq!(spans(&relief.plan), vec![(0..30, 1)]);
        assert_eq!(relief.plan.stages[0].standby, Some(ContributorId(2)));
    }

    #[test]
    fn a_join_while_sessions_run_only_stands_by() {
        let policy = Policy::default();
        let mut candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30)];
        let before = plan(&shape(30), &candidates, &policy).unwrap();
        candidates.push(candidate(3, 1000.0, 30));
        // Far faster, but sessions are running: it stands by, nothing moves.
        let busy = admit(&shape(30), &before, &candidates, &policy, false).unwrap();
        assert!(busy.moves.is_empty() && !busy.replanned);
        assert_eq!(spans(&busy.plan), spans(&before));
        assert_eq!(super::loads(&before.roles().into_iter().map(|r| (r.contributor, r.blocks)).collect(), &busy.plan).load, vec![role(3, 0..15, true)]);
        // Idle: the fresh plan is worth it.
        let idle = admit(&shape(30), &before, &candidates, &policy, true).unwrap();
        assert!(idle.replanned);
        assert_eq!(spans(&idle.plan), vec![(0..30, 3)]);
        // A join that gains little moves nothing, even when idle.
        let candidates = vec![candidate(1, 10.0, 30), candidate(2, 10.0, 30), candidate(3, 5.0, 30)];
        let idle = admit(&shape(30), &before, &candidates, &policy, true).unwrap();
        assert!(idle.moves.is_empty() && !idle.replanned, "{idle:?}");
    }

    #[test]
    fn churn_keeps_plans_valid_and_undisturbed() {
        let policy = Policy::default();
        let shape = shape(30);
        let mut rng = Rng::new(42);
        let mut next_id = 0;
        let mut fresh = |rng: &mut Rng| {
            next_id += 1;
            candidate(next_id, f64::from(5 + rng.below(50)), u64::from(8 + rng.below(30)))
        };
        let mut candidates: Vec<Candidate> = (0..6).map(|_| fresh(&mut rng)).collect();
        let mut current = plan(&shape, &candidates, &policy).unwrap();
        let (mut replans, mut moves) = (0, 0);
        for step in 0..2000 {
            if candidates.len() > 2 && rng.below(2) == 0 {
                let i = rng.below(candidates.len() as u32) as usize;
                candidates.remove(i);
            } else if candidates.len() < 12 {
                candidates.push(fresh(&mut rng));
            }
            match repair(&shape, &current, &candidates, &policy) {
                Ok(repair) => {
                    check_valid(&shape, &repair.plan, &candidates);
                    if !repair.replanned {
                        // Every stage whose holder stayed kept its span and holder.
                        for old in &current.stages {
                            if candidates.iter().any(|c| c.contributor == old.contributor) {
                                assert!(repair.plan.stages.iter().any(|s| s.blocks == old.blocks && s.contributor == old.contributor), "step {step}");
                            }
                        }
                    }
                    replans += usize::from(repair.replanned);
                    moves += repair.moves.len();
                    current = repair.plan;
                }
                Err(PlacementError::NotEnoughMemory { .. }) => {
                    let total: u64 = candidates.iter().map(|c| memory_capacity(c, &shape) as u64).sum();
                    assert!(total < 30, "step {step}: {total} blocks of memory should hold the model");
                    candidates.push(fresh(&mut rng));
                    current = plan(&shape, &candidates, &policy).unwrap_or(current);
                }
                Err(e) => panic!("step {step}: {e}"),
            }
        }
        // About a thousand departures: standbys and free contributors absorb nearly all of them
        // (seed 42 gives 40 replans and 428 moved spans).
        assert!(moves > 100, "{moves} moves: the swarm hardly changed");
        assert!(replans < 100, "{replans} replans, {moves} moves in 2000 steps");
    }
}
