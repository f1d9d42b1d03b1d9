//! Persistence: the `Store` trait the scheduler writes through before acknowledging anything,
//! and `MemoryStore`, the in-memory implementation simulations use.

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
    pub agreed: Vec<ContributorId>,
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

/// Where units and accepted results live. Every method is durable when it returns `Ok`.
pub trait Store {
    /// Records a new job and all its units, atomically.
    fn create_job(&mut self, job: &JobRecord, units: &[UnitRecord]) -> Result<(), StoreError>;
    /// Records a unit's accepted result.
    fn accept_unit(&mut self, accepted: &AcceptedUnit) -> Result<(), StoreError>;
    /// Records how a job ended; it is not resumed after that.
    fn finish_job(&mut self, job: JobId, outcome: &JobOutcome) -> Result<(), StoreError>;
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

/// A `Store` in memory, for simulations and tests. `set_failing` makes every write fail, to
/// test that nothing is acknowledged without being stored.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    jobs: BTreeMap<JobId, StoredJob>,
    next_unit: u64,
    failing: bool,
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
    fn create_job(&mut self, job: &JobRecord, units: &[UnitRecord]) -> Result<(), StoreError> {
        self.check()?;
        if let Some(last) = units.last() {
            self.next_unit = self.next_unit.max(last.id.0 + 1);
        }
        let stored = StoredJob {
            record: job.clone(),
            units: units.to_vec(),
            accepted: BTreeMap::new(),
            outcome: None,
        };
        self.jobs.insert(job.id, stored);
        Ok(())
    }

    fn accept_unit(&mut self, accepted: &AcceptedUnit) -> Result<(), StoreError> {
        self.check()?;
        let job = self
            .jobs
            .get_mut(&accepted.job)
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("unit {}", accepted.unit),
                detail: format!("job {} does not exist", accepted.job),
            })?;
        job.accepted.insert(accepted.index, accepted.clone());
        Ok(())
    }

    fn finish_job(&mut self, job: JobId, outcome: &JobOutcome) -> Result<(), StoreError> {
        self.check()?;
        if let Some(j) = self.jobs.get_mut(&job) {
            j.outcome = Some(outcome.clone());
        }
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
