//! Thousands of simulated contributors in simulated time: churn, deadlines, crashes, liars,
//! duplicates and late results, a store that fails for a while, and a coordinator restart from
//! its store mid-job, between two flushes. The shell's group commit is a `flush` every
//! `FLUSH_MS`; every acknowledgement is checked against the store when it is released.
//!
//! A run is a function of its seed: the simulation keeps its state in ordered maps (a std
//! `HashMap` iterates in a random order per process, and the restart rejoins contributors in
//! that order), and a failing run prints its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use tessera_coordinator::{
    Config, JobOutcome, JobSpec, MemoryStore, Millis, Output, Scheduler, SchedulerError, Store,
};

/// How often the simulated shell flushes (commits the staged writes).
const FLUSH_MS: u64 = 40;
use tessera_protocol::{ContributorId, JobId, Tensor, UnitId, Work};

use crate::common::{Rng, caps, honest, perturbed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Returns perturbed vectors.
    Liar,
    /// Answers after the deadline.
    Slow,
    /// Sends every result twice.
    Duplicator,
    /// Stops answering and heartbeating at some point, without a word.
    Crasher,
}

#[derive(Debug)]
enum Event {
    Result {
        who: ContributorId,
        unit: UnitId,
        result: Tensor,
    },
    Heartbeat(ContributorId),
    Crash(ContributorId),
    Leave(ContributorId),
    Join,
    Submit(usize),
    Restart,
    Flush,
    /// The store fails every commit from now on, or works again.
    StoreFailing(bool),
}

struct Params {
    seed: u64,
    contributors: usize,
    slots: u32,
    jobs: usize,
    inputs_per_job: usize,
    inputs_per_unit: usize,
    deadline_ms: u64,
    liars: f64,
    restart_at: Option<u64>,
    /// When the store fails every commit, and until when.
    outage: Option<(u64, u64)>,
}

struct Sim {
    rng: Rng,
    now: Millis,
    seq: u64,
    events: BinaryHeap<Reverse<(Millis, u64)>>,
    payloads: BTreeMap<u64, Event>,
    behaviour: BTreeMap<ContributorId, Behaviour>,
    alive: BTreeSet<ContributorId>,
    next_id: u64,
    liar_share: f64,
    slots: u32,
    deadline_ms: u64,
    inputs_per_unit: usize,
    jobs: Vec<Vec<Vec<u32>>>,
    /// The id of each submitted job, by submission (a resubmission replaces it).
    job_ids: Vec<JobId>,
    accepted: BTreeMap<(JobId, u32), Tensor>,
    done: BTreeSet<JobId>,
    lost: usize,
    liar_ids: BTreeSet<ContributorId>,
    failed_flushes: usize,
    /// Accepted units staged but not flushed when the coordinator restarted.
    dropped_at_restart: usize,
    /// Jobs submitted but not flushed before the restart, submitted again (a client retry).
    resubmitted: usize,
    /// Every output in order, folded into one number: equal for two runs of one seed.
    trace: u64,
}

impl Sim {
    fn at(&mut self, t: Millis, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq)));
        self.payloads.insert(self.seq, e);
    }

    fn pick_behaviour(&mut self) -> Behaviour {
        let x = self.rng.unit();
        if x < self.liar_share {
            Behaviour::Liar
        } else if x < self.liar_share + 0.03 {
            Behaviour::Slow
        } else if x < self.liar_share + 0.08 {
            Behaviour::Duplicator
        } else if x < self.liar_share + 0.12 {
            Behaviour::Crasher
        } else {
            Behaviour::Honest
        }
    }

    fn join(&mut self, s: &mut Scheduler<MemoryStore>, behaviour: Option<Behaviour>) {
        let id = ContributorId(self.next_id);
        self.next_id += 1;
        let b = behaviour.unwrap_or_else(|| self.pick_behaviour());
        s.join(self.now, id, caps(self.slots)).unwrap();
        self.behaviour.insert(id, b);
        self.alive.insert(id);
        if b == Behaviour::Liar {
            self.liar_ids.insert(id);
        }
        let first = self.now.plus(1000 + self.rng.below(4000));
        self.at(first, Event::Heartbeat(id));
        if b == Behaviour::Crasher {
            let t = self.now.plus(self.rng.below(20_000));
            self.at(t, Event::Crash(id));
        }
    }

    fn submit(&mut self, s: &mut Scheduler<MemoryStore>, j: usize) -> JobId {
        let mut spec = JobSpec::embedding("bafkreisim", self.jobs[j].clone());
        spec.inputs_per_unit = self.inputs_per_unit;
        spec.unit_deadline_ms = self.deadline_ms;
        s.submit(self.now, spec).unwrap()
    }

    fn handle_outputs(&mut self, s: &mut Scheduler<MemoryStore>) {
        while let Some(out) = s.poll() {
            self.trace = fold(self.trace, self.now.0, &out);
            match out {
                Output::Assign {
                    contributor,
                    unit,
                    deadline,
                    work,
                    ..
                } => {
                    let Some(&b) = self.behaviour.get(&contributor) else {
                        continue;
                    };
                    let latency = 50 + self.rng.below(3_000);
                    let result = match b {
                        Behaviour::Liar => perturbed(&work, &mut self.rng),
                        _ => honest(&work),
                    };
                    match b {
                        Behaviour::Crasher if self.rng.unit() < 0.5 => {}
                        Behaviour::Slow => {
                            let t = deadline.plus(1 + self.rng.below(2_000));
                            self.at(
                                t,
                                Event::Result {
                                    who: contributor,
                                    unit,
                                    result,
                                },
                            );
                        }
                        Behaviour::Duplicator => {
                            let t = self.now.plus(latency);
                            self.at(
                                t,
                                Event::Result {
                                    who: contributor,
                                    unit,
                                    result: result.clone(),
                                },
                            );
                            let again = t.plus(self.rng.below(5_000));
                            self.at(
                                again,
                                Event::Result {
                                    who: contributor,
                                    unit,
                                    result,
                                },
                            );
                        }
                        _ => {
                            let t = self.now.plus(latency);
                            self.at(
                                t,
                                Event::Result {
                                    who: contributor,
                                    unit,
                                    result,
                                },
                            );
                        }
                    }
                }
                Output::UnitAccepted {
                    job, index, result, ..
                } => {
                    assert!(
                        s.store().is_accepted(job, index),
                        "unit {index} of job {job} acknowledged before it was stored"
                    );
                    let previous = self.accepted.insert((job, index), result);
                    assert!(
                        previous.is_none(),
                        "unit {index} of job {job} accepted twice"
                    );
                }
                Output::JobDone { job } => {
                    assert_eq!(
                        s.store().outcome(job),
                        Some(&JobOutcome::Done),
                        "job {job} acknowledged before its end was stored"
                    );
                    assert!(self.done.insert(job), "job {job} done twice");
                }
                Output::JobFailed { job, reason } => panic!("job {job} failed: {reason}"),
                Output::ContributorLost { contributor }
                | Output::ContributorExcluded { contributor } => {
                    self.lost += 1;
                    self.alive.remove(&contributor);
                }
                Output::Cancel { .. } => {}
            }
        }
    }
}

/// Mixes the time and the ids an output names into `trace`.
fn fold(trace: u64, now: u64, out: &Output) -> u64 {
    let (kind, a, b) = match out {
        Output::Assign {
            contributor, unit, ..
        } => (1, contributor.0, unit.0),
        Output::Cancel { contributor, unit } => (2, contributor.0, unit.0),
        Output::UnitAccepted { unit, agreed, .. } => {
            (3, unit.0, agreed.iter().fold(0, |h, c| h * 31 + c.0))
        }
        Output::JobDone { job } => (4, job.0, 0),
        Output::JobFailed { job, .. } => (5, job.0, 0),
        Output::ContributorLost { contributor } => (6, contributor.0, 0),
        Output::ContributorExcluded { contributor } => (7, contributor.0, 0),
    };
    [now, kind, a, b].iter().fold(trace, |h, &x| {
        (h ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17)
    })
}

/// Prints the seed when the run it guards panics, so the failure can be replayed.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("simulation failed with seed {:#x}", self.0);
        }
    }
}

fn run(p: Params) -> (Sim, MemoryStore, BTreeMap<ContributorId, u64>) {
    // With up to a fifth of the contributors lying and churning, six results of one unit are
    // all lies or misses often enough, over thousands of units, to fail a job now and then (a
    // unit no one agrees on fails its job by design); ten makes that vanishingly rare.
    let config = Config {
        heartbeat_timeout_ms: 15_000,
        max_results_per_unit: 10,
        ..Config::default()
    };
    let mut rng = Rng(p.seed);
    let jobs: Vec<Vec<Vec<u32>>> = (0..p.jobs)
        .map(|_| {
            (0..p.inputs_per_job)
                .map(|_| {
                    (0..1 + rng.below(6))
                        .map(|_| rng.below(30_000) as u32)
                        .collect()
                })
                .collect()
        })
        .collect();
    let mut sim = Sim {
        rng,
        now: Millis(0),
        seq: 0,
        events: BinaryHeap::new(),
        payloads: BTreeMap::new(),
        behaviour: BTreeMap::new(),
        alive: BTreeSet::new(),
        next_id: 1,
        liar_share: p.liars,
        slots: p.slots,
        deadline_ms: p.deadline_ms,
        inputs_per_unit: p.inputs_per_unit,
        jobs,
        job_ids: Vec::new(),
        accepted: BTreeMap::new(),
        done: BTreeSet::new(),
        lost: 0,
        liar_ids: BTreeSet::new(),
        failed_flushes: 0,
        dropped_at_restart: 0,
        resubmitted: 0,
        trace: 0,
    };
    let mut s = Scheduler::restore(config.clone(), MemoryStore::new(), sim.now).unwrap();
    for _ in 0..p.contributors {
        sim.join(&mut s, None);
    }
    for j in 0..p.jobs {
        let t = Millis(j as u64 * 1_500);
        sim.at(t, Event::Submit(j));
    }
    // Churn: graceful leaves and new joins spread over the run.
    for _ in 0..p.contributors / 10 {
        let t = Millis(sim.rng.below(30_000));
        let who = ContributorId(1 + sim.rng.below(p.contributors as u64));
        sim.at(t, Event::Leave(who));
        let t = Millis(sim.rng.below(30_000));
        sim.at(t, Event::Join);
    }
    if let Some(t) = p.restart_at {
        sim.at(Millis(t), Event::Restart);
    }
    if let Some((from, to)) = p.outage {
        sim.at(Millis(from), Event::StoreFailing(true));
        sim.at(Millis(to), Event::StoreFailing(false));
    }
    sim.at(Millis(0), Event::Flush);
    let mut missed: BTreeMap<ContributorId, u64> = BTreeMap::new();
    let mut steps = 0u64;
    while sim.done.len() < p.jobs {
        steps += 1;
        assert!(steps < 5_000_000, "simulation did not finish");
        let next_event = sim.events.peek().map(|Reverse((t, _))| *t);
        let next = match (next_event, s.poll_timeout()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => panic!(
                "nothing left to happen, {} of {} jobs done",
                sim.done.len(),
                p.jobs
            ),
        };
        sim.now = sim.now.max(next);
        if next_event == Some(next) {
            let Some(Reverse((_, seq))) = sim.events.pop() else {
                unreachable!()
            };
            let Some(event) = sim.payloads.remove(&seq) else {
                unreachable!()
            };
            match event {
                Event::Result { who, unit, result } => {
                    if sim.alive.contains(&who) {
                        s.report(sim.now, who, unit, result).unwrap();
                    }
                }
                Event::Heartbeat(who) => {
                    if sim.alive.contains(&who) {
                        s.heartbeat(sim.now, who).unwrap();
                        let t = sim.now.plus(5_000);
                        sim.at(t, Event::Heartbeat(who));
                    }
                }
                Event::Crash(who) => {
                    sim.alive.remove(&who);
                }
                Event::Leave(who) => {
                    if sim.alive.remove(&who) {
                        s.leave(sim.now, who).unwrap();
                    }
                }
                Event::Join => sim.join(&mut s, None),
                Event::Submit(j) => {
                    let id = sim.submit(&mut s, j);
                    sim.job_ids.push(id);
                }
                Event::Flush => {
                    match s.flush(sim.now) {
                        Ok(()) => {}
                        Err(SchedulerError::Store(_)) => sim.failed_flushes += 1,
                        Err(e) => panic!("flush: {e}"),
                    }
                    let t = sim.now.plus(FLUSH_MS);
                    sim.at(t, Event::Flush);
                }
                Event::StoreFailing(failing) => s.store().set_failing(failing),
                Event::Restart => {
                    // The coordinator stops between two flushes: what is staged is lost,
                    // every connection drops, contributors come back under new ids, and
                    // results in flight are lost.
                    sim.handle_outputs(&mut s);
                    sim.dropped_at_restart += s.unflushed().accepted.len();
                    for id in sim.behaviour.keys() {
                        if let Some((_, _, r)) = s.contributor(*id) {
                            *missed.entry(*id).or_default() += r.missed_deadlines;
                        }
                    }
                    let store = s.into_store();
                    s = Scheduler::restore(config.clone(), store, sim.now).unwrap();
                    // A job whose submission was never flushed is gone; its client retries.
                    for j in 0..sim.job_ids.len() {
                        let id = sim.job_ids[j];
                        if !sim.done.contains(&id) && s.job_status(id).is_none() {
                            sim.job_ids[j] = sim.submit(&mut s, j);
                            sim.resubmitted += 1;
                        }
                    }
                    let back: Vec<Behaviour> = std::mem::take(&mut sim.alive)
                        .into_iter()
                        .map(|id| sim.behaviour[&id])
                        .collect();
                    for b in back {
                        sim.join(&mut s, Some(b));
                    }
                }
            }
        }
        s.tick(sim.now).unwrap();
        sim.handle_outputs(&mut s);
    }
    for id in sim.behaviour.keys() {
        if let Some((_, _, r)) = s.contributor(*id) {
            *missed.entry(*id).or_default() += r.missed_deadlines;
        }
    }
    (sim, s.into_store(), missed)
}

fn check(sim: &Sim, store: &mut MemoryStore, p: &Params) {
    assert_eq!(sim.job_ids.len(), p.jobs);
    let units_per_job = p.inputs_per_job.div_ceil(p.inputs_per_unit);
    for (j, &job) in sim.job_ids.iter().enumerate() {
        assert_eq!(store.outcome(job), Some(&JobOutcome::Done), "job {job}");
        let stored = store.results(job).unwrap();
        assert_eq!(
            stored.len(),
            units_per_job,
            "job {job}: every unit stored once"
        );
        for (index, result) in stored {
            let start = index as usize * p.inputs_per_unit;
            let end = (start + p.inputs_per_unit).min(p.inputs_per_job);
            let work = Work::Embedding {
                model: "bafkreisim".into(),
                inputs: sim.jobs[j][start..end].to_vec(),
            };
            assert_eq!(
                result,
                honest(&work),
                "job {job} unit {index}: accepted result is not the honest one"
            );
            assert_eq!(
                sim.accepted.get(&(job, index)),
                Some(&result),
                "job {job} unit {index}: reported as stored"
            );
        }
        for a in store.accepted(job) {
            for who in &a.agreed {
                assert!(
                    !sim.liar_ids.contains(who),
                    "a liar's result was accepted for unit {}",
                    a.unit
                );
            }
        }
    }
    assert_eq!(
        sim.accepted.len(),
        units_per_job * p.jobs,
        "no unit accepted outside the jobs"
    );
}

#[test]
fn thousands_of_contributors_with_churn_liars_and_a_restart() {
    let p = Params {
        seed: 0x5eed_0001,
        contributors: 2_000,
        slots: 1,
        jobs: 6,
        inputs_per_job: 600,
        inputs_per_unit: 2,
        deadline_ms: 8_000,
        liars: 0.08,
        restart_at: Some(4_000),
        outage: Some((6_000, 9_000)),
    };
    let _seed = SeedOnFailure(p.seed);
    let (sim, mut store, missed) = run(Params { ..p });
    check(&sim, &mut store, &p);
    assert!(sim.failed_flushes > 0, "no flush failed during the outage");
    assert!(
        sim.dropped_at_restart > 0,
        "nothing was staged and unflushed at the restart"
    );
    // The scenario really exercised what it claims to.
    assert!(sim.lost > 0, "no contributor was lost or excluded");
    assert!(missed.values().sum::<u64>() > 0, "no deadline was missed");
    let rejected: usize = sim
        .job_ids
        .iter()
        .flat_map(|&j| store.accepted(j))
        .map(|a| a.rejected.len())
        .sum();
    assert!(rejected > 0, "no vote was lost");
}

#[test]
fn few_contributors_many_units_with_slots_and_heavy_lying() {
    let p = Params {
        seed: 0x5eed_0002,
        contributors: 300,
        slots: 3,
        jobs: 4,
        inputs_per_job: 1_500,
        inputs_per_unit: 3,
        deadline_ms: 6_000,
        liars: 0.2,
        // Between the submission at 4,500 and the flush at 4,520.
        restart_at: Some(4_510),
        outage: Some((2_000, 4_000)),
    };
    let _seed = SeedOnFailure(p.seed);
    let (sim, mut store, _) = run(Params { ..p });
    check(&sim, &mut store, &p);
    assert!(sim.failed_flushes > 0, "no flush failed during the outage");
    assert_eq!(sim.resubmitted, 1, "the unflushed submission was lost");
}

/// Two runs of one seed make the same outputs at the same times, restart included (where the
/// contributors still alive rejoin, in the simulation's order).
#[test]
fn a_run_is_a_function_of_its_seed() {
    let p = Params {
        seed: 0x5eed_0003,
        contributors: 200,
        slots: 2,
        jobs: 2,
        inputs_per_job: 300,
        inputs_per_unit: 2,
        deadline_ms: 6_000,
        liars: 0.1,
        restart_at: Some(2_000),
        outage: Some((1_000, 1_500)),
    };
    let _seed = SeedOnFailure(p.seed);
    let (first, mut store, _) = run(Params { ..p });
    check(&first, &mut store, &p);
    let (second, _, _) = run(Params { ..p });
    assert_ne!(first.trace, 0, "no output was traced");
    assert_eq!(
        (first.trace, first.now, first.lost),
        (second.trace, second.now, second.lost),
        "two runs of seed {:#x} differ",
        p.seed
    );
}
