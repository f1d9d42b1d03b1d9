//! The scheduler's task: the only owner of the `Scheduler`. Peer tasks and HTTP handlers send
//! it `Command`s over one bounded channel; it drains a burst of them, ticks, flushes (group
//! commit) and turns every `Output` into a message for a peer or an answer for a waiting
//! request. It wakes on its own at the scheduler's `poll_timeout`, and at least every
//! `CADENCE` to retry a failed flush.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_protocol::{Capabilities, ContributorId, CoordinatorMessage, ErrorCode, JobId, SignalPayload, Tensor, UnitId};
use tokio::sync::{mpsc, oneshot};

use crate::openai::ApiError;
use crate::scheduler::{JobSpec, Output, Report, Scheduler};
use crate::server::peer::{OUTBOX, Outbound};
use crate::server::{Counters, ServerConfig, ServerError, log};
use crate::sqlite::SqliteStore;
use crate::store::JobOutcome;
use crate::time::Millis;

/// Commands waiting for the actor, at most.
pub const QUEUE: usize = 4096;
/// Commands handled before the actor ticks and flushes.
const BURST: usize = 512;
/// The longest the actor sleeps.
const CADENCE: Duration = Duration::from_millis(200);
/// Finished jobs remembered for `/api/jobs` with who voted how (older ones: state only).
const FINISHED_KEPT: usize = 1024;

/// A job's accepted rows, in unit order, or why it failed.
pub type JobResult = Result<Vec<Tensor>, String>;

pub enum Command {
    /// A peer said hello: answers its id and the heartbeat interval.
    Join {
        capabilities: Capabilities,
        outbox: mpsc::Sender<Outbound>,
        close: tessera_rtc::PeerSender,
        reply: oneshot::Sender<(ContributorId, u64)>,
    },
    Heartbeat(ContributorId),
    /// It said `Leave`, or its DataChannel closed.
    Gone(ContributorId),
    Report { from: ContributorId, unit: UnitId, result: Tensor },
    /// A signal for contributor `to`; `from` is checked to be the sender's own id.
    Relay { from: ContributorId, to: ContributorId, payload: SignalPayload },
    Submit {
        spec: JobSpec,
        reply: oneshot::Sender<Result<(JobId, oneshot::Receiver<JobResult>), ApiError>>,
    },
    Contributors(oneshot::Sender<Value>),
    Job(JobId, oneshot::Sender<Option<Value>>),
}

struct PeerEntry {
    outbox: mpsc::Sender<Outbound>,
    close: tessera_rtc::PeerSender,
}

struct Votes {
    unit: u64,
    agreed: Vec<ContributorId>,
    rejected: Vec<ContributorId>,
}

enum JobState {
    Running,
    Done,
    Failed(String),
}

struct Tracked {
    units_total: u32,
    replicas: u8,
    state: JobState,
    votes: BTreeMap<u32, Votes>,
    assigns: HashMap<UnitId, u32>,
    results: Vec<Option<Tensor>>,
    waiter: Option<oneshot::Sender<JobResult>>,
}

pub struct Actor {
    scheduler: Scheduler<SqliteStore>,
    start: Instant,
    peers: HashMap<ContributorId, PeerEntry>,
    next_contributor: u64,
    jobs: HashMap<JobId, Tracked>,
    finished: VecDeque<JobId>,
    counters: Arc<Counters>,
}

impl Actor {
    pub fn new(config: &ServerConfig, store: SqliteStore, counters: Arc<Counters>) -> Result<Actor, ServerError> {
        let scheduler = Scheduler::restore(config.scheduler.clone(), store, Millis(0))?;
        if scheduler.running_jobs() > 0 {
            log(format_args!("resuming {} unfinished job(s) from the database", scheduler.running_jobs()));
        }
        Ok(Actor {
            scheduler,
            start: Instant::now(),
            peers: HashMap::new(),
            next_contributor: 1,
            jobs: HashMap::new(),
            finished: VecDeque::new(),
            counters,
        })
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    pub async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        loop {
            let mut wake = Instant::now() + CADENCE;
            if let Some(t) = self.scheduler.poll_timeout() {
                wake = wake.min(self.start + Duration::from_millis(t.0));
            }
            tokio::select! {
                command = inbox.recv() => {
                    let Some(command) = command else { break };
                    self.handle(command);
                    for _ in 0..BURST {
                        match inbox.try_recv() {
                            Ok(command) => self.handle(command),
                            Err(_) => break,
                        }
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            self.step();
        }
    }

    /// Tick, flush, and act on every output.
    fn step(&mut self) {
        let now = self.now();
        if let Err(e) = self.scheduler.tick(now) {
            log(format_args!("scheduler tick failed: {e}"));
        }
        // A no-op when nothing is staged.
        if let Err(e) = self.scheduler.flush(now) {
            Counters::add(&self.counters.store_errors, 1);
            log(format_args!("committing to the database failed (will retry): {e}"));
        }
        while let Some(output) = self.scheduler.poll() {
            self.act(now, output);
        }
        let c = &self.counters;
        c.contributors_connected.store(self.scheduler.contributor_count() as u64, std::sync::atomic::Ordering::Relaxed);
        c.jobs_running.store(self.scheduler.running_jobs() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn handle(&mut self, command: Command) {
        let now = self.now();
        match command {
            Command::Join { capabilities, outbox, close, reply } => {
                let id = ContributorId(self.next_contributor);
                self.next_contributor += 1;
                let summary = format!("{} ({}, score {:.1})", capabilities.adapter, capabilities.backend, capabilities.benchmark_score);
                match self.scheduler.join(now, id, capabilities) {
                    Ok(()) => {
                        self.peers.insert(id, PeerEntry { outbox, close });
                        Counters::add(&self.counters.contributors_joined, 1);
                        log(format_args!("contributor {id} joined: {summary}"));
                        let _ = reply.send((id, self.scheduler.config().heartbeat_interval_ms));
                    }
                    Err(e) => log(format_args!("contributor {id} could not join: {e}")),
                }
            }
            Command::Heartbeat(id) => {
                let _ = self.scheduler.heartbeat(now, id);
            }
            Command::Gone(id) => {
                if self.peers.remove(&id).is_some() && self.scheduler.leave(now, id).is_ok() {
                    log(format_args!("contributor {id} left"));
                }
            }
            Command::Report { from, unit, result } => {
                Counters::add(&self.counters.results_reported, 1);
                match self.scheduler.report(now, from, unit, result) {
                    // Counted in `results_rejected` with the unit's other losers once it is decided.
                    Ok(Report::Invalid(reason)) => log(format_args!("contributor {from}: result for unit {unit} rejected: {reason}")),
                    Ok(_) => {}
                    Err(e) => log(format_args!("contributor {from}: report for unit {unit}: {e}")),
                }
            }
            Command::Relay { from, to, payload } => self.relay(from, to, payload),
            Command::Submit { spec, reply } => {
                let _ = reply.send(self.submit(now, spec));
            }
            Command::Contributors(reply) => {
                let _ = reply.send(self.contributors());
            }
            Command::Job(id, reply) => {
                let _ = reply.send(self.job(id));
            }
        }
    }

    fn submit(&mut self, now: Millis, spec: JobSpec) -> Result<(JobId, oneshot::Receiver<JobResult>), ApiError> {
        if self.scheduler.contributor_count() == 0 {
            return Err(ApiError::unavailable(
                "No contributor is connected to this coordinator, so nothing can run the job: start one with `tessera contribute --coordinator URL`",
            ));
        }
        let (inputs, replicas) = (spec.inputs.len(), spec.replicas);
        let units = inputs.div_ceil(spec.inputs_per_unit.max(1));
        let id = self
            .scheduler
            .submit(now, spec)
            .map_err(|e| ApiError::invalid(Some("input"), e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        let units_total = u32::try_from(units).unwrap_or(u32::MAX);
        self.jobs.insert(
            id,
            Tracked {
                units_total,
                replicas,
                state: JobState::Running,
                votes: BTreeMap::new(),
                assigns: HashMap::new(),
                results: vec![None; units],
                waiter: Some(tx),
            },
        );
        Counters::add(&self.counters.jobs_submitted, 1);
        log(format_args!("job {id}: {inputs} inputs in {units} units"));
        Ok((id, rx))
    }

    fn act(&mut self, now: Millis, output: Output) {
        match output {
            Output::Assign { contributor, job, unit, deadline, work } => {
                Counters::add(&self.counters.units_dispatched, 1);
                if let Some(t) = self.jobs.get_mut(&job) {
                    let n = t.assigns.entry(unit).or_default();
                    *n += 1;
                    if *n > u32::from(t.replicas) {
                        Counters::add(&self.counters.units_reissued, 1);
                    }
                }
                let message = CoordinatorMessage::Assign { job, unit, deadline_ms: deadline.since(now), work: (*work).clone() };
                self.send(now, contributor, message);
            }
            Output::Cancel { contributor, unit } => {
                Counters::add(&self.counters.units_cancelled, 1);
                self.send(now, contributor, CoordinatorMessage::Cancel { unit });
            }
            Output::UnitAccepted { job, unit, index, result, agreed, rejected } => {
                Counters::add(&self.counters.units_accepted, 1);
                Counters::add(&self.counters.results_rejected, rejected.len() as u64);
                // Committed: each contributor that reported on the unit learns how its result fared.
                for (&contributor, accepted) in agreed.iter().map(|c| (c, true)).chain(rejected.iter().map(|c| (c, false))) {
                    self.send(now, contributor, CoordinatorMessage::Verdict { unit, accepted });
                }
                if let Some(t) = self.jobs.get_mut(&job)
                    && let Some(slot) = t.results.get_mut(index as usize)
                {
                    *slot = Some(result);
                    t.votes.insert(index, Votes { unit: unit.0, agreed, rejected });
                }
            }
            Output::JobDone { job } => {
                Counters::add(&self.counters.jobs_done, 1);
                log(format_args!("job {job} done"));
                if let Some(t) = self.jobs.get_mut(&job) {
                    t.state = JobState::Done;
                    let results: Option<Vec<Tensor>> = std::mem::take(&mut t.results).into_iter().collect();
                    if let Some(waiter) = t.waiter.take() {
                        let _ = waiter.send(results.ok_or_else(|| "a unit's accepted result was lost".to_string()));
                    }
                    self.retire(job);
                }
            }
            Output::JobFailed { job, reason } => {
                Counters::add(&self.counters.jobs_failed, 1);
                log(format_args!("job {job} failed: {reason}"));
                if let Some(t) = self.jobs.get_mut(&job) {
                    t.results.clear();
                    if let Some(waiter) = t.waiter.take() {
                        let _ = waiter.send(Err(reason.clone()));
                    }
                    t.state = JobState::Failed(reason);
                    self.retire(job);
                }
            }
            Output::ContributorLost { contributor } => {
                Counters::add(&self.counters.contributors_lost, 1);
                log(format_args!("contributor {contributor} lost: no heartbeat in time"));
                self.disconnect(contributor, "no heartbeat within the timeout: disconnected");
            }
            Output::ContributorExcluded { contributor } => {
                Counters::add(&self.counters.contributors_excluded, 1);
                log(format_args!("contributor {contributor} excluded: too many results lost their vote"));
                self.disconnect(contributor, "too many of your results disagreed with the others: disconnected");
            }
        }
    }

    fn retire(&mut self, job: JobId) {
        self.finished.push_back(job);
        while self.finished.len() > FINISHED_KEPT {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// Queues `message` for a contributor; one whose queue is full or gone is dropped (its units
    /// are reissued).
    fn send(&mut self, now: Millis, id: ContributorId, message: CoordinatorMessage) {
        let Some(peer) = self.peers.get(&id) else { return };
        if peer.outbox.try_send(Outbound::Control(message)).is_err() {
            log(format_args!("contributor {id}: its send queue is full or closed; dropping it"));
            if let Some(peer) = self.peers.remove(&id) {
                tokio::spawn(async move { peer.close.close().await });
            }
            let _ = self.scheduler.leave(now, id);
        }
    }

    /// Passes a signal on to `to`, or tells `from` why not. A relay never costs the receiver its
    /// connection: it is refused while `to`'s queue is over half full, so the scheduler's own
    /// messages to it always have room.
    fn relay(&mut self, from: ContributorId, to: ContributorId, payload: SignalPayload) {
        let refusal = match self.peers.get(&to) {
            None => (ErrorCode::UnknownPeer, format!("no contributor {to} is connected; the signal was dropped")),
            Some(peer) if peer.outbox.capacity() < OUTBOX / 2 => {
                (ErrorCode::Internal, format!("contributor {to} has too many messages waiting; the signal was dropped, try again later"))
            }
            Some(peer) => match peer.outbox.try_send(Outbound::Control(CoordinatorMessage::Signal { from, to, payload })) {
                Ok(()) => return,
                Err(_) => (ErrorCode::Internal, format!("contributor {to} is going away; the signal was dropped")),
            },
        };
        // The sender's own queue being full only loses this reply.
        if let Some(peer) = self.peers.get(&from) {
            let _ = peer.outbox.try_send(Outbound::Control(CoordinatorMessage::Error { code: refusal.0, message: refusal.1 }));
        }
    }

    /// Tells a contributor the scheduler dropped it, and closes its channel.
    fn disconnect(&mut self, id: ContributorId, why: &str) {
        let Some(peer) = self.peers.remove(&id) else { return };
        let error = CoordinatorMessage::Error { code: ErrorCode::Internal, message: why.into() };
        if peer.outbox.try_send(Outbound::Close(Some(error))).is_err() {
            tokio::spawn(async move { peer.close.close().await });
        }
    }

    fn contributors(&self) -> Value {
        let mut ids: Vec<&ContributorId> = self.peers.keys().collect();
        ids.sort();
        let list: Vec<Value> = ids
            .into_iter()
            .filter_map(|&id| {
                let (caps, held, r) = self.scheduler.contributor(id)?;
                Some(json!({
                    "id": id.0,
                    "adapter": caps.adapter,
                    "backend": caps.backend,
                    "benchmark_score": caps.benchmark_score,
                    "memory_budget_bytes": caps.memory_budget_bytes,
                    "units_held": held,
                    "units_assigned": r.assigned,
                    "units_accepted": r.agreed,
                    "units_rejected": r.rejected,
                    "missed_deadlines": r.missed_deadlines,
                }))
            })
            .collect();
        json!({ "contributors": list })
    }

    fn job(&mut self, id: JobId) -> Option<Value> {
        if let Some(t) = self.jobs.get(&id) {
            let (state, failure) = match &t.state {
                JobState::Running => ("running", None),
                JobState::Done => ("done", None),
                JobState::Failed(reason) => ("failed", Some(reason.clone())),
            };
            let units_done = match t.state {
                JobState::Done => t.units_total,
                _ => self.scheduler.job_status(id).map_or(t.votes.len() as u32, |s| s.units_accepted),
            };
            let units: Vec<Value> = t
                .votes
                .iter()
                .map(|(index, v)| {
                    json!({
                        "index": index,
                        "unit": v.unit,
                        "accepted_from": v.agreed.iter().map(|c| c.0).collect::<Vec<_>>(),
                        "rejected_from": v.rejected.iter().map(|c| c.0).collect::<Vec<_>>(),
                    })
                })
                .collect();
            return Some(json!({
                "id": id.0, "state": state, "failure": failure,
                "units_total": t.units_total, "units_done": units_done, "units": units,
            }));
        }
        if let Some(s) = self.scheduler.job_status(id) {
            return Some(json!({
                "id": id.0, "state": "running", "failure": null,
                "units_total": s.units_total, "units_done": s.units_accepted, "units": [],
            }));
        }
        match self.scheduler.store().outcome(id) {
            Ok(Some(JobOutcome::Done)) => Some(json!({ "id": id.0, "state": "done", "failure": null, "units": [] })),
            Ok(Some(JobOutcome::Failed(reason))) => Some(json!({ "id": id.0, "state": "failed", "failure": reason, "units": [] })),
            Ok(None) | Err(_) => None,
        }
    }
}
