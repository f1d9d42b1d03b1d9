//! Persistence: the `Batch` of writes the scheduler stages, the `Store` trait that commits a
//! batch atomically before anything in it is acknowledged, and `MemoryStore`, the in-memory
//! implementation simulations use.

use std::collections::BTreeMap;

use tessera_protocol::{ContributorId, JobId, Tensor, UnitId, Work};

use crate::reconcile::JobKind;
use crate::time::Millis;

/// A job as stored: what is needed to resume it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: JobKind,
    pub model: String,
    pub replicas: u8,
    pub unit_deadline_ms: u64,
    pub min_memory_bytes: u64,
    pub unit_count: u32,
    pub submitted: Millis,
}

/// A unit as stored. Unit ids of one job are consecutive, in `index` order.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRecord {
    pub id: UnitId,
    pub job: JobId,
    pub index: u32,
    pub work: Work,
}

/// A unit's accepted result and who voted which way.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedUnit {
    pub unit: UnitId,
    pub job: JobId,
    pub index: u32,
    pub result: Tensor,
    /// Contributors whose result was in the accepted majority.
    pub agreed: Vec<ContributorId>,
    /// Contributors whose result lost the vote or had the wrong shape.
    pub rejected: Vec<ContributorId>,
    pub at: Millis,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Done,
    Failed(String),
}

/// An unfinished job found in the store, with which of its units are already accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredJob {
    pub record: JobRecord,
    pub units: Vec<(UnitRecord, bool)>,
}

/// What a restarted coordinator resumes from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub jobs: Vec<RecoveredJob>,
    /// Smallest id never used, so ids are not reused across restarts.
    pub next_job: u64,
    pub next_unit: u64,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the coordinator database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("the coordinator database {path} is not usable: {detail}")]
    Unusable { path: String, detail: String },
    #[error("database {op} failed: {source}")]
    Sqlite {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("corrupt database row ({what}): {detail}")]
    Corrupt { what: String, detail: String },
    #[error("value {value} of {what} does not fit the database's 63-bit integers")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The writes staged between two flushes, committed in one transaction (group commit).
/// A store applies them in field order: new jobs, then accepted units, then finished jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// New jobs, each with all its units.
    pub jobs: Vec<(JobRecord, Vec<UnitRecord>)>,
    /// Units whose result was accepted.
    pub accepted: Vec<AcceptedUnit>,
    /// Jobs that ended, and how.
    pub finished: Vec<(JobId, JobOutcome)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.accepted.is_empty() && self.finished.is_empty()
    }

    /// Staged writes: jobs created + units accepted + jobs finished.
    pub fn len(&self) -> usize {
        self.jobs.len() + self.accepted.len() + self.finished.len()
    }
}

/// Where units and accepted results live.
pub trait Store {
    /// Applies every write in `batch` in one transaction: when it returns `Ok` all of them
    /// are durable (as far as the store's durability level promises), when it returns `Err`
    /// none of them is, and the same batch may be committed again.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// The unfinished jobs and the next free ids.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// A job's accepted results, by unit index.
    fn results(&mut self, job: JobId) -> Result<Vec<(u32, Tensor)>, StoreError>;
}

#[derive(Debug, Clone)]
struct StoredJob {
    record: JobRecord,
    units: Vec<UnitRecord>,
    accepted: BTreeMap<u32, AcceptedUnit>,
    outcome: Option<JobOutcome>,
}

/// A `Store` in memory, for simulations and tests. `set_failing` makes every commit fail, to
/// test that nothing is acknowledged without being stored.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    jobs: BTreeMap<JobId, StoredJob>,
    next_unit: u64,
    failing: bool,
    commits: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_failing(&mut self, failing: bool) {
        self.failing = failing;
    }

    /// How a job ended, if it did.
    pub fn outcome(&self, job: JobId) -> Option<&JobOutcome> {
        self.jobs.get(&job).and_then(|j| j.outcome.as_ref())
    }

    /// Whether unit `index` of `job` has a stored accepted result.
    pub fn is_accepted(&self, job: JobId, index: u32) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|j| j.accepted.contains_key(&index))
    }

    /// Successful commits so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Every accepted unit of a job, with its votes.
    pub fn accepted(&self, job: JobId) -> impl Iterator<Item = &AcceptedUnit> {
        self.jobs
            .get(&job)
            .into_iter()
            .flat_map(|j| j.accepted.values())
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing {
            return Err(StoreError::Unavailable("memory store set to fail".into()));
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.check()?;
        // Check everything first, so that a failed commit changes nothing.
        let known = |job: &JobId| {
            self.jobs.contains_key(job) || batch.jobs.iter().any(|(j, _)| j.id == *job)
        };
        if let Some(a) = batch.accepted.iter().find(|a| !known(&a.job)) {
            return Err(StoreError::Corrupt {
                what: format!("unit {}", a.unit),
                detail: format!("job {} does not exist", a.job),
            });
        }
        if let Some(a) = batch.accepted.iter().find(|a| {
            self.jobs
                .get(&a.job)
                .is_some_and(|j| j.accepted.contains_key(&a.index))
        }) {
            return Err(StoreError::Corrupt {
                what: format!("unit {}", a.unit),
                detail: format!("accepted twice in job {}", a.job),
            });
        }
        for (job, units) in &batch.jobs {
            if let Some(last) = units.last() {
                self.next_unit = self.next_unit.max(last.id.0 + 1);
            }
            let stored = StoredJob {
                record: job.clone(),
                units: units.clone(),
                accepted: BTreeMap::new(),
                outcome: None,
            };
            self.jobs.insert(job.id, stored);
        }
        for a in &batch.accepted {
            if let Some(job) = self.jobs.get_mut(&a.job) {
                job.accepted.insert(a.index, a.clone());
            }
        }
        for (job, outcome) in &batch.finished {
            if let Some(j) = self.jobs.get_mut(job) {
                j.outcome = Some(outcome.clone());
            }
        }
        self.commits += 1;
        Ok(())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let jobs = self
            .jobs
            .values()
            .filter(|j| j.outcome.is_none())
            .map(|j| RecoveredJob {
                record: j.record.clone(),
                units: j
                    .units
                    .iter()
                    .map(|u| (u.clone(), j.accepted.contains_key(&u.index)))
                    .collect(),
            })
            .collect();
        let next_job = self.jobs.keys().next_back().map_or(1, |j| j.0 + 1);
        Ok(Snapshot {
            jobs,
            next_job,
            next_unit: self.next_unit.max(1),
        })
    }

    fn results(&mut self, job: JobId) -> Result<Vec<(u32, Tensor)>, StoreError> {
        Ok(self
            .accepted(job)
            .map(|a| (a.index, a.result.clone()))
            .collect())
    }
}
