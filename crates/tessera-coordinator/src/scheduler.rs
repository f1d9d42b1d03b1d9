//! The scheduler: a sans-IO state machine for membership, liveness, dispatch and
//! reconciliation. The shell feeds it events with the current time (`join`, `heartbeat`,
//! `leave`, `submit`, `report`, `tick`), calls `flush` to commit, and drains `poll` for what to
//! do; `poll_timeout` says when to call `tick` next.
//!
//! Group commit: new jobs, accepted units and finished jobs are staged in a `Batch`, not
//! written one by one. `flush` commits the whole batch in one store transaction and only then
//! releases what it acknowledges (`UnitAccepted`, `JobDone`, `JobFailed`) and dispatches the
//! new jobs' units. A failed commit releases nothing and keeps the batch for the next `flush`;
//! a coordinator that stops before a flush resumes from the store, where staged units are
//! still open, so they are done again and reported once. The shell decides the cadence
//! (e.g. after each burst of messages, or every few milliseconds while `needs_flush`).
//!
//! Indexing: contributors with a free slot wait in a FIFO (`free`); units that need replicas
//! wait in another (`pending`); dispatch pairs their heads, skipping at most `MAX_TRIES`
//! contributors that may not take a unit (they already had a replica of it, or lack memory).
//! Deadlines and heartbeat expiries sit in min-heaps checked lazily. No step scans all
//! contributors or all units.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use tessera_protocol::{Capabilities, ContributorId, JobId, Tensor, UnitId, Work};

use crate::reconcile::JobKind;
use crate::store::{
    AcceptedUnit, Batch, JobOutcome, JobRecord, Snapshot, Store, StoreError, UnitRecord,
};
use crate::time::Millis;

/// Most free contributors looked at for one unit before moving on to the next unit.
const MAX_TRIES: usize = 32;

/// Hashes the coordinator's sequential ids: one multiply, no SipHash.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How often contributors send heartbeats (told to them in `Welcome`).
    pub heartbeat_interval_ms: u64,
    /// A contributor not heard from for this long is lost and its units are reissued.
    pub heartbeat_timeout_ms: u64,
    /// Most units one contributor holds at once, whatever it offers.
    pub max_slots: u32,
    /// A unit with this many results and still no agreement fails its job.
    pub max_results_per_unit: usize,
    /// A unit handed out this many times without agreement fails its job.
    pub max_attempts_per_unit: usize,
    /// A contributor that lost this many votes, more than it won, gets no more work.
    pub exclude_after_rejections: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            max_slots: 4,
            max_results_per_unit: 6,
            max_attempts_per_unit: 32,
            exclude_after_rejections: 3,
        }
    }
}

/// A job to run, as a client asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub kind: JobKind,
    /// The model's CID.
    pub model: String,
    /// Tokenized inputs.
    pub inputs: Vec<Vec<u32>>,
    pub inputs_per_unit: usize,
    /// Agreeing results needed to accept a unit (and replicas first handed out).
    pub replicas: u8,
    pub unit_deadline_ms: u64,
    /// Contributors with a smaller memory budget are not given this job's units.
    pub min_memory_bytes: u64,
}

impl JobSpec {
    /// An embedding job with the defaults: 2 replicas, 16 inputs per unit, 60 s deadline.
    pub fn embedding(model: impl Into<String>, inputs: Vec<Vec<u32>>) -> Self {
        JobSpec {
            kind: JobKind::Embedding,
            model: model.into(),
            inputs,
            inputs_per_unit: 16,
            replicas: 2,
            unit_deadline_ms: 60_000,
            min_memory_bytes: 0,
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this unit to this contributor; its result is due by `deadline`.
    Assign {
        contributor: ContributorId,
        job: JobId,
        unit: UnitId,
        deadline: Millis,
        work: Arc<Work>,
    },
    /// Tell this contributor to stop working on this unit.
    Cancel {
        contributor: ContributorId,
        unit: UnitId,
    },
    /// A unit's result was accepted and committed to the store. Every contributor whose
    /// result was counted appears once, in `agreed` (its result was in the accepted majority)
    /// or in `rejected` (outvoted, or the wrong shape), so the shell can give each one verdict.
    /// Results that arrived after the decision (`Report::Stale`) and the discarded votes of an
    /// excluded contributor are in neither.
    UnitAccepted {
        job: JobId,
        unit: UnitId,
        index: u32,
        result: Tensor,
        agreed: Vec<ContributorId>,
        rejected: Vec<ContributorId>,
    },
    /// Every unit of the job is accepted, and that is committed to the store.
    JobDone { job: JobId },
    /// The job cannot complete (committed to the store); the reason says which unit and why.
    JobFailed { job: JobId, reason: String },
    /// No heartbeat within the timeout: its units were reissued; close its connection.
    ContributorLost { contributor: ContributorId },
    /// It lost too many votes and gets no more work; close its connection.
    ContributorExcluded { contributor: ContributorId },
}

/// What became of a reported result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Recorded; the unit waits for more results.
    Recorded,
    /// This result completed the unit's quorum: the unit is accepted and staged, and
    /// `UnitAccepted` follows the next successful `flush`.
    Accepted,
    /// The unit was already decided (accepted, or its job ended); ignored.
    Stale,
    /// This contributor already reported this unit; ignored.
    Duplicate,
    /// This unit was never assigned to this contributor; ignored.
    NotAssigned,
    /// The result has the wrong shape for the unit; counted as a lost vote.
    Invalid(String),
}

/// Errors the shell must act on.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("contributor {0} has not joined")]
    UnknownContributor(ContributorId),
    #[error("contributor {0} has already joined")]
    AlreadyJoined(ContributorId),
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Per-contributor vote counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reputation {
    pub assigned: u64,
    /// Results that agreed with the accepted one.
    pub agreed: u64,
    /// Results that lost a vote or had the wrong shape.
    pub rejected: u64,
    pub missed_deadlines: u64,
    pub duplicates: u64,
    pub unsolicited: u64,
}

#[derive(Debug)]
struct Contributor {
    capabilities: Capabilities,
    slots: u32,
    holding: Vec<UnitId>,
    last_seen: Millis,
    queued: bool,
    excluded: bool,
    reputation: Reputation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptState {
    Running,
    Returned,
    /// Missed its deadline; a late result still counts as a vote.
    Expired,
    /// Its contributor left or was lost.
    Dropped,
}

#[derive(Debug)]
struct Attempt {
    contributor: ContributorId,
    deadline: Millis,
    state: AttemptState,
}

#[derive(Debug)]
struct Unit {
    job: JobId,
    index: u32,
    work: Arc<Work>,
    to_dispatch: u32,
    queued: bool,
    attempts: Vec<Attempt>,
    results: Vec<(ContributorId, Tensor)>,
    /// Contributors whose result had the wrong shape: not a vote, but rejected all the same
    /// (their reputation already counts it).
    invalid: Vec<ContributorId>,
}

#[derive(Debug)]
struct Job {
    record: JobRecord,
    first_unit: u64,
    open_units: u32,
}

/// A job's progress, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub units_total: u32,
    pub units_accepted: u32,
}

enum Decision {
    /// Accept the result at this index; these result indices agreed with it.
    Accept {
        winner: usize,
        agreed: Vec<usize>,
    },
    Wait,
    Fail(String),
}

/// The coordinator's scheduling core. See the module docs.
#[derive(Debug)]
pub struct Scheduler<S: Store> {
    config: Config,
    store: S,
    contributors: IdMap<ContributorId, Contributor>,
    units: IdMap<UnitId, Unit>,
    jobs: IdMap<JobId, Job>,
    free: VecDeque<ContributorId>,
    pending: VecDeque<UnitId>,
    deadlines: BinaryHeap<Reverse<(Millis, UnitId, ContributorId)>>,
    liveness: BinaryHeap<Reverse<(Millis, ContributorId)>>,
    outputs: VecDeque<Output>,
    /// Writes not yet committed; what they acknowledge is released by `flush`.
    staged: Batch,
    next_job: u64,
    next_unit: u64,
    skipped: Vec<ContributorId>,
}

impl<S: Store> Scheduler<S> {
    /// A scheduler resuming whatever unfinished jobs `store` holds (none for a new store).
    /// Units of those jobs that were in flight, or accepted but never flushed, are simply
    /// handed out again. Jobs found complete are finished and flushed before this returns.
    pub fn restore(config: Config, mut store: S, now: Millis) -> Result<Self, SchedulerError> {
        let Snapshot {
            jobs,
            next_job,
            next_unit,
        } = store.load()?;
        let mut s = Scheduler {
            config,
            store,
            contributors: IdMap::default(),
            units: IdMap::default(),
            jobs: IdMap::default(),
            free: VecDeque::new(),
            pending: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            liveness: BinaryHeap::new(),
            outputs: VecDeque::new(),
            staged: Batch::default(),
            next_job,
            next_unit,
            skipped: Vec::new(),
        };
        for job in jobs {
            let first_unit = job.units.first().map_or(s.next_unit, |(u, _)| u.id.0);
            let open: Vec<UnitRecord> = job
                .units
                .into_iter()
                .filter(|(_, accepted)| !accepted)
                .map(|(u, _)| u)
                .collect();
            let id = job.record.id;
            s.insert_job(job.record, first_unit, open);
            if s.jobs.get(&id).is_some_and(|j| j.open_units == 0) {
                s.finish_job(id, JobOutcome::Done);
            }
        }
        s.flush(now)?;
        s.dispatch(now);
        Ok(s)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back, e.g. to restart from it. Staged writes are dropped, as in a
    /// crash: call `flush` first to keep them.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Commits every staged write in one store transaction, then releases the outputs they
    /// acknowledge (`UnitAccepted`, then `JobDone`/`JobFailed`) and dispatches the units of
    /// the jobs it stored. On a store error nothing is released and the batch stays staged,
    /// to be committed whole by the next `flush`; the scheduler keeps running meanwhile.
    pub fn flush(&mut self, now: Millis) -> Result<(), SchedulerError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.store.commit(&self.staged)?;
        let Batch {
            jobs,
            accepted,
            finished,
        } = std::mem::take(&mut self.staged);
        for (record, units) in jobs {
            let first_unit = units.first().map_or(self.next_unit, |u| u.id.0);
            self.insert_job(record, first_unit, units);
        }
        for a in accepted {
            self.outputs.push_back(Output::UnitAccepted {
                job: a.job,
                unit: a.unit,
                index: a.index,
                result: a.result,
                agreed: a.agreed,
                rejected: a.rejected,
            });
        }
        for (job, outcome) in finished {
            self.outputs.push_back(match outcome {
                JobOutcome::Done => Output::JobDone { job },
                JobOutcome::Failed(reason) => Output::JobFailed { job, reason },
            });
        }
        self.dispatch(now);
        Ok(())
    }

    /// Whether writes are staged, waiting for `flush`.
    pub fn needs_flush(&self) -> bool {
        !self.staged.is_empty()
    }

    /// The writes staged since the last successful `flush`.
    pub fn unflushed(&self) -> &Batch {
        &self.staged
    }

    /// The next thing the shell must do.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `tick` has something to do next (a deadline or a heartbeat expiry), if ever.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let d = self.deadlines.peek().map(|Reverse((t, _, _))| *t);
        let l = self.liveness.peek().map(|Reverse((t, _))| *t);
        d.into_iter().chain(l).min()
    }

    /// A contributor said hello. The shell numbers contributors (one id per connection).
    pub fn join(
        &mut self,
        now: Millis,
        id: ContributorId,
        capabilities: Capabilities,
    ) -> Result<(), SchedulerError> {
        if self.contributors.contains_key(&id) {
            return Err(SchedulerError::AlreadyJoined(id));
        }
        let slots = capabilities
            .max_concurrent_units
            .clamp(1, self.config.max_slots.max(1));
        self.contributors.insert(
            id,
            Contributor {
                capabilities,
                slots,
                holding: Vec::new(),
                last_seen: now,
                queued: true,
                excluded: false,
                reputation: Reputation::default(),
            },
        );
        self.free.push_back(id);
        self.liveness
            .push(Reverse((now.plus(self.config.heartbeat_timeout_ms), id)));
        self.dispatch(now);
        Ok(())
    }

    /// A contributor is alive (any message from it counts).
    pub fn heartbeat(&mut self, now: Millis, id: ContributorId) -> Result<(), SchedulerError> {
        let c = self
            .contributors
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownContributor(id))?;
        c.last_seen = c.last_seen.max(now);
        Ok(())
    }

    /// A contributor left (said so, or its connection closed). Its units are reissued.
    pub fn leave(&mut self, now: Millis, id: ContributorId) -> Result<(), SchedulerError> {
        if !self.contributors.contains_key(&id) {
            return Err(SchedulerError::UnknownContributor(id));
        }
        self.remove_contributor(id);
        self.dispatch(now);
        Ok(())
    }

    /// Splits a job into units and stages them; returns the job's id. The job is written by
    /// the next successful `flush`, and its units are handed out only after that.
    pub fn submit(&mut self, now: Millis, spec: JobSpec) -> Result<JobId, SchedulerError> {
        let invalid = |m: &str| Err(SchedulerError::InvalidJob(m.to_owned()));
        if spec.inputs.is_empty() {
            return invalid("no inputs");
        }
        if spec.inputs_per_unit == 0 {
            return invalid("inputs_per_unit must be at least 1");
        }
        if spec.replicas == 0 || usize::from(spec.replicas) > self.config.max_results_per_unit {
            return invalid(&format!(
                "replicas must be between 1 and {}, got {}",
                self.config.max_results_per_unit, spec.replicas
            ));
        }
        if spec.unit_deadline_ms == 0 {
            return invalid("unit_deadline_ms must be positive");
        }
        let unit_count = u32::try_from(spec.inputs.len().div_ceil(spec.inputs_per_unit))
            .map_err(|_| SchedulerError::InvalidJob("too many units".into()))?;
        let id = JobId(self.next_job);
        let first_unit = self.next_unit;
        let units: Vec<UnitRecord> = spec
            .inputs
            .chunks(spec.inputs_per_unit)
            .enumerate()
            .map(|(i, inputs)| UnitRecord {
                id: UnitId(first_unit + i as u64),
                job: id,
                index: i as u32,
                work: Work::Embedding {
                    model: spec.model.clone(),
                    inputs: inputs.to_vec(),
                },
            })
            .collect();
        let record = JobRecord {
            id,
            kind: spec.kind,
            model: spec.model,
            replicas: spec.replicas,
            unit_deadline_ms: spec.unit_deadline_ms,
            min_memory_bytes: spec.min_memory_bytes,
            unit_count,
            submitted: now,
        };
        self.next_job += 1;
        self.next_unit += u64::from(unit_count);
        self.staged.jobs.push((record, units));
        Ok(id)
    }

    /// A contributor returned a unit's result. An accepted unit is staged, not yet written:
    /// its `UnitAccepted` comes after the next successful `flush`.
    pub fn report(
        &mut self,
        now: Millis,
        from: ContributorId,
        unit_id: UnitId,
        result: Tensor,
    ) -> Result<Report, SchedulerError> {
        let c = self
            .contributors
            .get_mut(&from)
            .ok_or(SchedulerError::UnknownContributor(from))?;
        c.last_seen = c.last_seen.max(now);
        let Some(unit) = self.units.get_mut(&unit_id) else {
            return Ok(Report::Stale);
        };
        let Some(attempt) = unit.attempts.iter().position(|a| a.contributor == from) else {
            c.reputation.unsolicited += 1;
            return Ok(Report::NotAssigned);
        };
        let previous = unit.attempts[attempt].state;
        if previous == AttemptState::Returned {
            c.reputation.duplicates += 1;
            return Ok(Report::Duplicate);
        }
        let Some(job) = self.jobs.get(&unit.job) else {
            return Ok(Report::Stale);
        };
        let kind = job.record.kind;
        let quorum = usize::from(job.record.replicas);
        if previous == AttemptState::Running {
            c.holding.retain(|&u| u != unit_id);
            if !c.queued && !c.excluded {
                c.queued = true;
                self.free.push_back(from);
            }
        }
        unit.attempts[attempt].state = AttemptState::Returned;
        if let Err(reason) = kind.check_shape(&unit.work, &result) {
            c.reputation.rejected += 1;
            unit.invalid.push(from);
            let excluded = self.maybe_exclude(from);
            self.top_up(unit_id, quorum);
            if excluded {
                self.remove_contributor(from);
                self.discard_votes(from);
            }
            self.dispatch(now);
            return Ok(Report::Invalid(reason));
        }
        unit.results.push((from, result));
        match decide(
            kind,
            quorum,
            self.config.max_results_per_unit,
            &unit.results,
        ) {
            Decision::Accept { winner, agreed } => {
                let outvoted: Vec<ContributorId> = (0..unit.results.len())
                    .filter(|i| !agreed.contains(i))
                    .map(|i| unit.results[i].0)
                    .collect();
                let accepted = AcceptedUnit {
                    unit: unit_id,
                    job: unit.job,
                    index: unit.index,
                    // Moved out, not copied: the unit is dropped once accepted.
                    result: std::mem::replace(&mut unit.results[winner].1, empty_tensor()),
                    agreed: agreed.iter().map(|&i| unit.results[i].0).collect(),
                    rejected: outvoted.iter().chain(&unit.invalid).copied().collect(),
                    at: now,
                };
                self.on_accepted(accepted, &outvoted);
                self.dispatch(now);
                Ok(Report::Accepted)
            }
            Decision::Wait => {
                self.top_up(unit_id, quorum);
                self.dispatch(now);
                Ok(Report::Recorded)
            }
            Decision::Fail(reason) => {
                let job = unit.job;
                self.fail_job(job, reason);
                self.dispatch(now);
                Ok(Report::Recorded)
            }
        }
    }

    /// Handles what is due at `now`: missed deadlines and lost contributors.
    pub fn tick(&mut self, now: Millis) -> Result<(), SchedulerError> {
        while let Some(&Reverse((due, unit_id, contributor))) = self.deadlines.peek() {
            if due > now {
                break;
            }
            self.deadlines.pop();
            let Some(unit) = self.units.get_mut(&unit_id) else {
                continue;
            };
            let Some(a) = unit.attempts.iter_mut().find(|a| {
                a.contributor == contributor
                    && a.state == AttemptState::Running
                    && a.deadline <= now
            }) else {
                continue;
            };
            a.state = AttemptState::Expired;
            if let Some(c) = self.contributors.get_mut(&contributor) {
                c.reputation.missed_deadlines += 1;
                c.holding.retain(|&u| u != unit_id);
                if !c.queued && !c.excluded {
                    c.queued = true;
                    self.free.push_back(contributor);
                }
            }
            let quorum = self.quorum_of(unit_id);
            self.top_up(unit_id, quorum);
        }
        while let Some(&Reverse((due, id))) = self.liveness.peek() {
            if due > now {
                break;
            }
            self.liveness.pop();
            let Some(c) = self.contributors.get(&id) else {
                continue;
            };
            let expires = c.last_seen.plus(self.config.heartbeat_timeout_ms);
            if expires > now {
                self.liveness.push(Reverse((expires, id)));
                continue;
            }
            self.remove_contributor(id);
            self.outputs
                .push_back(Output::ContributorLost { contributor: id });
        }
        self.dispatch(now);
        Ok(())
    }

    /// Connected contributors.
    pub fn contributor_count(&self) -> usize {
        self.contributors.len()
    }

    /// A contributor's capabilities, units held and vote counters.
    pub fn contributor(&self, id: ContributorId) -> Option<(&Capabilities, usize, Reputation)> {
        self.contributors
            .get(&id)
            .map(|c| (&c.capabilities, c.holding.len(), c.reputation))
    }

    /// Progress of a running (or staged) job; `None` once it ended (see the store) or if
    /// unknown. Units accepted but not yet flushed count as accepted.
    pub fn job_status(&self, job: JobId) -> Option<JobStatus> {
        if let Some(j) = self.jobs.get(&job) {
            return Some(JobStatus {
                units_total: j.record.unit_count,
                units_accepted: j.record.unit_count - j.open_units,
            });
        }
        self.staged
            .jobs
            .iter()
            .find(|(r, _)| r.id == job)
            .map(|(r, _)| JobStatus {
                units_total: r.unit_count,
                units_accepted: 0,
            })
    }

    /// Jobs running.
    pub fn running_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Bytes of scheduler state that grow with the number of contributors: the contributor
    /// table (at its allocated capacity), each contributor's heap data, the free queue and the
    /// liveness heap. Counted from capacities and `size_of`, not sampled from the allocator.
    pub fn contributor_state_bytes(&self) -> usize {
        use std::mem::size_of;
        let table = self.contributors.capacity() * (size_of::<(ContributorId, Contributor)>() + 1);
        let heap: usize = self
            .contributors
            .values()
            .map(|c| {
                c.holding.capacity() * size_of::<UnitId>()
                    + c.capabilities.adapter.capacity()
                    + c.capabilities.backend.capacity()
            })
            .sum();
        table
            + heap
            + self.free.capacity() * size_of::<ContributorId>()
            + self.liveness.capacity() * size_of::<Reverse<(Millis, ContributorId)>>()
    }

    fn insert_job(&mut self, record: JobRecord, first_unit: u64, open: Vec<UnitRecord>) {
        let replicas = u32::from(record.replicas);
        let id = record.id;
        self.jobs.insert(
            id,
            Job {
                record,
                first_unit,
                open_units: open.len() as u32,
            },
        );
        for u in open {
            self.units.insert(
                u.id,
                Unit {
                    job: id,
                    index: u.index,
                    work: Arc::new(u.work),
                    to_dispatch: replicas,
                    queued: true,
                    attempts: Vec::new(),
                    results: Vec::new(),
                    invalid: Vec::new(),
                },
            );
            self.pending.push_back(u.id);
        }
    }

    fn quorum_of(&self, unit: UnitId) -> usize {
        self.units
            .get(&unit)
            .and_then(|u| self.jobs.get(&u.job))
            .map_or(1, |j| usize::from(j.record.replicas))
    }

    /// Plans enough further replicas that a quorum is still reachable, counting results that
    /// agree and replicas still running; fails the job past the attempt limit.
    fn top_up(&mut self, unit_id: UnitId, quorum: usize) {
        let Some(unit) = self.units.get_mut(&unit_id) else {
            return;
        };
        let Some(job) = self.jobs.get(&unit.job) else {
            return;
        };
        let best = best_support(job.record.kind, &unit.results);
        let running = unit
            .attempts
            .iter()
            .filter(|a| a.state == AttemptState::Running)
            .count();
        let outstanding = running + unit.to_dispatch as usize;
        let needed = quorum.saturating_sub(best);
        if outstanding >= needed {
            return;
        }
        let more = needed - outstanding;
        if unit.attempts.len() + unit.to_dispatch as usize + more
            > self.config.max_attempts_per_unit
        {
            let (job, index) = (unit.job, unit.index);
            let reason = format!(
                "unit {unit_id} (index {index}) was handed out {} times without {quorum} agreeing results",
                unit.attempts.len()
            );
            self.fail_job(job, reason);
            return;
        }
        unit.to_dispatch += more as u32;
        if !unit.queued {
            unit.queued = true;
            // Reissues go first: their job is furthest along.
            self.pending.push_front(unit_id);
        }
    }

    fn maybe_exclude(&mut self, id: ContributorId) -> bool {
        let limit = u64::from(self.config.exclude_after_rejections);
        let Some(c) = self.contributors.get_mut(&id) else {
            return false;
        };
        let r = c.reputation;
        if limit > 0 && !c.excluded && r.rejected >= limit && r.rejected > r.agreed {
            c.excluded = true;
            self.outputs
                .push_back(Output::ContributorExcluded { contributor: id });
            return true;
        }
        false
    }

    /// An excluded contributor's results stop counting: its votes leave every open unit, which
    /// gets the replicas it now lacks. (Otherwise a liar that comes back under a new identity
    /// could agree with its own earlier lie.) Exclusions are rare, so the scan is cheap overall.
    fn discard_votes(&mut self, id: ContributorId) {
        let affected: Vec<UnitId> = self
            .units
            .iter()
            .filter(|(_, unit)| {
                unit.results.iter().any(|(from, _)| *from == id) || unit.invalid.contains(&id)
            })
            .map(|(&unit_id, _)| unit_id)
            .collect();
        for unit_id in affected {
            if let Some(unit) = self.units.get_mut(&unit_id) {
                unit.results.retain(|(from, _)| *from != id);
                unit.invalid.retain(|&from| from != id);
            }
            let quorum = self.quorum_of(unit_id);
            self.top_up(unit_id, quorum);
        }
    }

    fn remove_contributor(&mut self, id: ContributorId) {
        let Some(c) = self.contributors.remove(&id) else {
            return;
        };
        for unit_id in c.holding {
            let Some(unit) = self.units.get_mut(&unit_id) else {
                continue;
            };
            for a in unit.attempts.iter_mut() {
                if a.contributor == id && a.state == AttemptState::Running {
                    a.state = AttemptState::Dropped;
                }
            }
            let quorum = self.quorum_of(unit_id);
            self.top_up(unit_id, quorum);
        }
    }

    /// Stages an accepted unit and frees what it held; `flush` releases `UnitAccepted`.
    /// `outvoted` are the contributors whose results lost this vote (the wrong-shaped ones in
    /// `accepted.rejected` were counted when they arrived).
    fn on_accepted(&mut self, accepted: AcceptedUnit, outvoted: &[ContributorId]) {
        let Some(unit) = self.units.remove(&accepted.unit) else {
            return;
        };
        for a in &unit.attempts {
            if a.state == AttemptState::Running {
                self.outputs.push_back(Output::Cancel {
                    contributor: a.contributor,
                    unit: accepted.unit,
                });
                if let Some(c) = self.contributors.get_mut(&a.contributor) {
                    c.holding.retain(|&u| u != accepted.unit);
                    if !c.queued && !c.excluded {
                        c.queued = true;
                        self.free.push_back(a.contributor);
                    }
                }
            }
        }
        for &id in &accepted.agreed {
            if let Some(c) = self.contributors.get_mut(&id) {
                c.reputation.agreed += 1;
            }
        }
        for &id in outvoted {
            if let Some(c) = self.contributors.get_mut(&id) {
                c.reputation.rejected += 1;
            }
            if self.maybe_exclude(id) {
                self.remove_contributor(id);
                self.discard_votes(id);
            }
        }
        let job_id = accepted.job;
        self.staged.accepted.push(accepted);
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.open_units -= 1;
            if job.open_units == 0 {
                self.finish_job(job_id, JobOutcome::Done);
            }
        }
    }

    fn fail_job(&mut self, job_id: JobId, reason: String) {
        self.finish_job(job_id, JobOutcome::Failed(reason));
    }

    /// Stages how a job ended and cancels its running replicas; `flush` releases
    /// `JobDone`/`JobFailed`.
    fn finish_job(&mut self, job_id: JobId, outcome: JobOutcome) {
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        for u in job.first_unit..job.first_unit + u64::from(job.record.unit_count) {
            let Some(unit) = self.units.remove(&UnitId(u)) else {
                continue;
            };
            for a in unit
                .attempts
                .iter()
                .filter(|a| a.state == AttemptState::Running)
            {
                self.outputs.push_back(Output::Cancel {
                    contributor: a.contributor,
                    unit: UnitId(u),
                });
                if let Some(c) = self.contributors.get_mut(&a.contributor) {
                    c.holding.retain(|&h| h != UnitId(u));
                    if !c.queued && !c.excluded {
                        c.queued = true;
                        self.free.push_back(a.contributor);
                    }
                }
            }
        }
        self.staged.finished.push((job_id, outcome));
    }

    /// Pairs units that need replicas with contributors that have a free slot.
    fn dispatch(&mut self, now: Millis) {
        let mut skipped = std::mem::take(&mut self.skipped);
        let mut unserved = 0;
        while let Some(&unit_id) = self.pending.front() {
            if self.free.is_empty() || unserved > self.pending.len() {
                break;
            }
            let Some(unit) = self.units.get_mut(&unit_id).filter(|u| u.to_dispatch > 0) else {
                self.pending.pop_front();
                if let Some(u) = self.units.get_mut(&unit_id) {
                    u.queued = false;
                }
                continue;
            };
            let Some(job) = self.jobs.get(&unit.job) else {
                self.pending.pop_front();
                continue;
            };
            let mut chosen = None;
            let mut tries = 0;
            while tries < MAX_TRIES {
                let Some(id) = self.free.pop_front() else {
                    break;
                };
                let Some(c) = self.contributors.get_mut(&id) else {
                    continue;
                };
                c.queued = false;
                if c.excluded || c.holding.len() >= c.slots as usize {
                    continue;
                }
                tries += 1;
                let eligible = c.capabilities.memory_budget_bytes >= job.record.min_memory_bytes
                    && !unit.attempts.iter().any(|a| a.contributor == id);
                if eligible {
                    chosen = Some(id);
                    break;
                }
                c.queued = true;
                skipped.push(id);
            }
            for &id in skipped.iter().rev() {
                self.free.push_front(id);
            }
            skipped.clear();
            let Some(id) = chosen else {
                // Nobody free may take this unit now: let the next one try.
                self.pending.pop_front();
                self.pending.push_back(unit_id);
                unserved += 1;
                continue;
            };
            unserved = 0;
            let deadline = now.plus(job.record.unit_deadline_ms);
            unit.attempts.push(Attempt {
                contributor: id,
                deadline,
                state: AttemptState::Running,
            });
            unit.to_dispatch -= 1;
            self.outputs.push_back(Output::Assign {
                contributor: id,
                job: unit.job,
                unit: unit_id,
                deadline,
                work: Arc::clone(&unit.work),
            });
            if unit.to_dispatch == 0 {
                unit.queued = false;
                self.pending.pop_front();
            }
            self.deadlines.push(Reverse((deadline, unit_id, id)));
            if let Some(c) = self.contributors.get_mut(&id) {
                c.holding.push(unit_id);
                c.reputation.assigned += 1;
                if c.holding.len() < c.slots as usize {
                    c.queued = true;
                    self.free.push_back(id);
                }
            }
        }
        self.skipped = skipped;
    }
}

/// A placeholder for a result moved out of its unit.
fn empty_tensor() -> Tensor {
    Tensor::from_f32(vec![0], &[]).unwrap_or_else(|_| unreachable!("an empty tensor is valid"))
}

/// The most results that agree with any one result (itself included).
fn best_support(kind: JobKind, results: &[(ContributorId, Tensor)]) -> usize {
    (0..results.len())
        .map(|i| {
            (0..results.len())
                .filter(|&j| i == j || kind.agree(&results[i].1, &results[j].1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Whether the newest result completes a quorum, and with whom.
fn decide(
    kind: JobKind,
    quorum: usize,
    max_results: usize,
    results: &[(ContributorId, Tensor)],
) -> Decision {
    let Some((_, newest)) = results.last() else {
        return Decision::Wait;
    };
    let agreed: Vec<usize> = (0..results.len())
        .filter(|&i| i + 1 == results.len() || kind.agree(&results[i].1, newest))
        .collect();
    if agreed.len() >= quorum {
        // The earliest agreeing result stands for the group.
        return Decision::Accept {
            winner: agreed[0],
            agreed,
        };
    }
    if results.len() >= max_results {
        return Decision::Fail(format!(
            "{} results without {quorum} agreeing within the {} tolerance",
            results.len(),
            kind.name()
        ));
    }
    Decision::Wait
}
