//! `SqliteStore`: the `Store` in an embedded SQLite database in WAL mode.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use tessera_protocol::{ContributorId, JobId, Tensor, UnitId, Work};

use crate::reconcile::JobKind;
use crate::store::{
    AcceptedUnit, JobOutcome, JobRecord, RecoveredJob, Snapshot, Store, StoreError, UnitRecord,
};
use crate::time::Millis;

/// Largest stored result the loader accepts (a unit's embeddings are far smaller).
const MAX_RESULT_BYTES: usize = 256 << 20;
const SCHEMA_VERSION: i64 = 1;

/// How hard each commit pushes to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives power loss.
    Full,
    /// `synchronous=NORMAL`: a commit survives a crash of the coordinator (WAL), not of the
    /// machine. SQLite's recommended setting for WAL.
    Normal,
}

/// A `Store` in a SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

fn to_i64(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

fn to_u64(what: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what: what.to_owned(),
        detail: format!("negative value {value}"),
    })
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, in WAL mode, with the schema.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let open_err = |source| StoreError::Open {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unusable {
                path: shown,
                detail: format!("journal mode is {mode:?}, WAL is required"),
            });
        }
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync};
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY,
                 kind TEXT NOT NULL,
                 model TEXT NOT NULL,
                 replicas INTEGER NOT NULL,
                 unit_deadline_ms INTEGER NOT NULL,
                 min_memory_bytes INTEGER NOT NULL,
                 unit_count INTEGER NOT NULL,
                 submitted_ms INTEGER NOT NULL,
                 state TEXT NOT NULL DEFAULT 'running',
                 failure TEXT
             );
             CREATE TABLE IF NOT EXISTS units (
                 id INTEGER PRIMARY KEY,
                 job INTEGER NOT NULL REFERENCES jobs(id),
                 idx INTEGER NOT NULL,
                 work TEXT NOT NULL,
                 result BLOB,
                 agreed TEXT,
                 rejected TEXT,
                 accepted_ms INTEGER
             );
             CREATE INDEX IF NOT EXISTS units_by_job ON units(job, idx);
             INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION});"
        ))
        .map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let version: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Unusable {
                path: path.display().to_string(),
                detail: format!("schema version {version}, this build reads {SCHEMA_VERSION}"),
            });
        }
        Ok(SqliteStore { conn })
    }

    /// How a job ended, if it did: `Ok(None)` while it runs.
    pub fn outcome(&self, job: JobId) -> Result<Option<JobOutcome>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn
            .query_row(
                "SELECT state, failure FROM jobs WHERE id = ?1",
                [to_i64("job id", job.0)?],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading a job's state"))?;
        Ok(match row {
            None => None,
            Some((state, failure)) => match state.as_str() {
                "running" => None,
                "done" => Some(JobOutcome::Done),
                _ => Some(JobOutcome::Failed(failure.unwrap_or_default())),
            },
        })
    }
}

fn ids_json(ids: &[ContributorId]) -> String {
    let raw: Vec<u64> = ids.iter().map(|c| c.0).collect();
    serde_json::to_string(&raw).unwrap_or_else(|_| "[]".into())
}

impl Store for SqliteStore {
    fn create_job(&mut self, job: &JobRecord, units: &[UnitRecord]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        tx.execute(
            "INSERT INTO jobs (id, kind, model, replicas, unit_deadline_ms, min_memory_bytes, unit_count, submitted_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                to_i64("job id", job.id.0)?,
                job.kind.name(),
                job.model,
                job.replicas,
                to_i64("unit deadline", job.unit_deadline_ms)?,
                to_i64("memory", job.min_memory_bytes)?,
                job.unit_count,
                to_i64("time", job.submitted.0)?,
            ],
        )
        .map_err(sql("inserting a job"))?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO units (id, job, idx, work) VALUES (?1, ?2, ?3, ?4)")
                .map_err(sql("preparing a unit insert"))?;
            for u in units {
                let work = serde_json::to_string(&u.work).map_err(|e| StoreError::Corrupt {
                    what: format!("unit {}", u.id),
                    detail: e.to_string(),
                })?;
                insert
                    .execute(params![
                        to_i64("unit id", u.id.0)?,
                        to_i64("job id", u.job.0)?,
                        u.index,
                        work
                    ])
                    .map_err(sql("inserting a unit"))?;
            }
        }
        tx.commit().map_err(sql("committing a job"))
    }

    fn accept_unit(&mut self, a: &AcceptedUnit) -> Result<(), StoreError> {
        let (at, unit, job) = (
            to_i64("time", a.at.0)?,
            to_i64("unit id", a.unit.0)?,
            to_i64("job id", a.job.0)?,
        );
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE units SET result = ?1, agreed = ?2, rejected = ?3, accepted_ms = ?4 WHERE id = ?5 AND job = ?6",
            )
            .and_then(|mut s| {
                s.execute(params![
                    a.result.encode(),
                    ids_json(&a.agreed),
                    ids_json(&a.rejected),
                    at,
                    unit,
                    job,
                ])
            })
            .map_err(sql("storing an accepted result"))?;
        if changed != 1 {
            return Err(StoreError::Corrupt {
                what: format!("unit {}", a.unit),
                detail: format!("no such unit in job {}", a.job),
            });
        }
        Ok(())
    }

    fn finish_job(&mut self, job: JobId, outcome: &JobOutcome) -> Result<(), StoreError> {
        let (state, failure) = match outcome {
            JobOutcome::Done => ("done", None),
            JobOutcome::Failed(reason) => ("failed", Some(reason.as_str())),
        };
        self.conn
            .execute(
                "UPDATE jobs SET state = ?1, failure = ?2 WHERE id = ?3",
                params![state, failure, to_i64("job id", job.0)?],
            )
            .map_err(sql("finishing a job"))?;
        Ok(())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let mut jobs_stmt = self
            .conn
            .prepare(
                "SELECT id, kind, model, replicas, unit_deadline_ms, min_memory_bytes, unit_count, submitted_ms
                 FROM jobs WHERE state = 'running' ORDER BY id",
            )
            .map_err(sql("reading jobs"))?;
        let rows = jobs_stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u8>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, u32>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(sql("reading jobs"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading jobs"))?;
        let mut units_stmt = self
            .conn
            .prepare(
                "SELECT id, idx, work, result IS NOT NULL FROM units WHERE job = ?1 ORDER BY idx",
            )
            .map_err(sql("reading units"))?;
        let mut jobs = Vec::with_capacity(rows.len());
        for (id, kind, model, replicas, deadline, memory, unit_count, submitted) in rows {
            let what = format!("job {id}");
            let kind = JobKind::from_name(&kind).ok_or_else(|| StoreError::Corrupt {
                what: what.clone(),
                detail: format!("unknown job kind {kind:?}"),
            })?;
            let record = JobRecord {
                id: JobId(to_u64(&what, id)?),
                kind,
                model,
                replicas,
                unit_deadline_ms: to_u64(&what, deadline)?,
                min_memory_bytes: to_u64(&what, memory)?,
                unit_count,
                submitted: Millis(to_u64(&what, submitted)?),
            };
            let units = units_stmt
                .query_map([id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })
                .map_err(sql("reading units"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("reading units"))?;
            if units.len() != unit_count as usize {
                return Err(StoreError::Corrupt {
                    what,
                    detail: format!("{} units stored, {unit_count} expected", units.len()),
                });
            }
            let mut recovered = Vec::with_capacity(units.len());
            for (uid, index, work, accepted) in units {
                let uwhat = format!("unit {uid}");
                let work: Work = serde_json::from_str(&work).map_err(|e| StoreError::Corrupt {
                    what: uwhat.clone(),
                    detail: e.to_string(),
                })?;
                let unit = UnitRecord {
                    id: UnitId(to_u64(&uwhat, uid)?),
                    job: record.id,
                    index,
                    work,
                };
                recovered.push((unit, accepted));
            }
            jobs.push(RecoveredJob {
                record,
                units: recovered,
            });
        }
        let next = |table: &str| -> Result<u64, StoreError> {
            let max: i64 = self
                .conn
                .query_row(
                    &format!("SELECT COALESCE(MAX(id), 0) FROM {table}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(sql("reading the largest id"))?;
            Ok(to_u64(table, max)? + 1)
        };
        Ok(Snapshot {
            jobs,
            next_job: next("jobs")?,
            next_unit: next("units")?,
        })
    }

    fn results(&mut self, job: JobId) -> Result<Vec<(u32, Tensor)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT idx, result FROM units WHERE job = ?1 AND result IS NOT NULL ORDER BY idx",
            )
            .map_err(sql("reading results"))?;
        let rows = stmt
            .query_map([to_i64("job id", job.0)?], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(sql("reading results"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading results"))?;
        rows.into_iter()
            .map(|(index, bytes)| {
                Tensor::decode(&bytes, MAX_RESULT_BYTES)
                    .map(|t| (index, t))
                    .map_err(|e| StoreError::Corrupt {
                        what: format!("result {index} of job {job}"),
                        detail: e.to_string(),
                    })
            })
            .collect()
    }
}
