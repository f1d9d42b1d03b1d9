//! `SqliteStore`: the `Store` in an embedded SQLite database in WAL mode. One `commit` is one
//! transaction (group commit), written with cached prepared statements. Results are stored
//! compactly: the tensor's little-endian element bytes (f32 LE for embeddings) as a BLOB, with
//! its dtype code and dims beside it; token ids and contributor ids are LE BLOBs too, not JSON.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use tessera_protocol::{ContributorId, DType, JobId, Tensor, UnitId, Work};

use crate::reconcile::JobKind;
use crate::store::{
    Batch, JobOutcome, JobRecord, RecoveredJob, Snapshot, Store, StoreError, UnitRecord,
};
use crate::time::Millis;

/// Largest stored result the loader accepts (a unit's embeddings are far smaller).
const MAX_RESULT_BYTES: usize = 256 << 20;
/// The WAL's size at which a commit checkpoints it (copies its frames into the database, so
/// the next commit writes the WAL from its start again), and the size it is truncated back
/// to afterwards: what bounds the `-wal` file under a continuous stream of commits.
pub const WAL_CHECKPOINT_BYTES: u64 = 64 << 20;
const SCHEMA_VERSION: i64 = 2;

/// What a successful `commit` (and so every acknowledgement) survives. Both levels are
/// atomic: after any crash the database holds whole batches only, never part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: the WAL is synced at every commit, so a commit survives a crash of
    /// the coordinator and a power loss or OS crash. Costs one fsync per flush.
    Full,
    /// `synchronous=NORMAL`: the WAL is synced only at checkpoints. A commit survives a crash
    /// of the coordinator process (it is in the OS's page cache), but a power loss or OS crash
    /// may roll back the last commits since the previous checkpoint, results already
    /// acknowledged included (those units are then done again). SQLite's recommended setting
    /// for WAL, and the one the benchmark uses.
    Normal,
}

/// A `Store` in a SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: std::path::PathBuf,
}

/// Copies committed WAL frames into the database from its own connection, so that the
/// store's commits never wait for a checkpoint (see `SqliteStore::checkpoint_elsewhere`).
/// Blocking: run it on a thread of its own (e.g. `spawn_blocking` every few hundred ms).
#[derive(Debug)]
pub struct Checkpointer {
    conn: Connection,
}

impl Checkpointer {
    /// A passive checkpoint: copies what it can without blocking the writer. Returns the
    /// frames in the WAL and how many of them are now in the database.
    pub fn checkpoint(&mut self) -> Result<(u64, u64), StoreError> {
        self.run("PRAGMA wal_checkpoint(PASSIVE)")
    }

    /// Copies every frame and truncates the WAL; waits for the writer (busy timeout) to do
    /// so. For shutdown, or a quiet moment.
    pub fn checkpoint_all(&mut self) -> Result<(u64, u64), StoreError> {
        self.run("PRAGMA wal_checkpoint(TRUNCATE)")
    }

    fn run(&mut self, pragma: &str) -> Result<(u64, u64), StoreError> {
        let (_busy, log, done): (i64, i64, i64) = self
            .conn
            .query_row(pragma, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql("checkpointing"))?;
        if log < 0 {
            return Err(StoreError::Unavailable(
                "checkpoint: the connection does not see a WAL".into(),
            ));
        }
        Ok((log as u64, done.max(0) as u64))
    }
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
        // 64 KiB pages (only a new database takes them): a unit's result (12 KiB for 8 x 384
        // f32) shares a page with others instead of spilling into overflow pages, and the WAL
        // gets a few large frames per commit. Measured 29.5k against 21k units/s with 4 KiB.
        conn.execute_batch("PRAGMA page_size=65536")
            .map_err(open_err)?;
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
        // SQLite counts the checkpoint threshold in pages, and an older database may have
        // smaller ones than a new one.
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(open_err)?;
        let checkpoint_pages = WAL_CHECKPOINT_BYTES / page_size.max(512) as u64;
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync};
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;
             PRAGMA cache_size=-65536;
             PRAGMA wal_autocheckpoint={checkpoint_pages};
             PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES};
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY,
                 kind TEXT NOT NULL,
                 model TEXT NOT NULL,
                 replicas INTEGER NOT NULL,
                 unit_deadline_ms INTEGER NOT NULL,
                 min_memory_bytes INTEGER NOT NULL,
                 first_unit INTEGER NOT NULL,
                 unit_count INTEGER NOT NULL,
                 submitted_ms INTEGER NOT NULL,
                 state TEXT NOT NULL DEFAULT 'running',
                 failure TEXT
             );
             -- A job's units have consecutive ids from jobs.first_unit, in idx order.
             -- inputs: per input, its token count then its token ids, all u32 LE.
             CREATE TABLE IF NOT EXISTS units (
                 id INTEGER PRIMARY KEY,
                 job INTEGER NOT NULL REFERENCES jobs(id),
                 idx INTEGER NOT NULL,
                 inputs BLOB NOT NULL
             );
             -- One row per accepted unit. agreed, rejected: contributor ids, u64 LE.
             -- dims: u64 LE; data: the elements, LE (f32 LE for embeddings).
             CREATE TABLE IF NOT EXISTS results (
                 unit INTEGER PRIMARY KEY REFERENCES units(id),
                 idx INTEGER NOT NULL,
                 accepted_ms INTEGER NOT NULL,
                 agreed BLOB NOT NULL,
                 rejected BLOB NOT NULL,
                 dtype INTEGER NOT NULL,
                 dims BLOB NOT NULL,
                 data BLOB NOT NULL
             );
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
        Ok(SqliteStore {
            conn,
            path: path.to_owned(),
        })
    }

    /// Turns off this connection's automatic checkpoints and returns a `Checkpointer` on a
    /// connection of its own, for the shell to run on another thread. Without it, SQLite
    /// checkpoints inside a commit each time the WAL reaches `WAL_CHECKPOINT_BYTES`, and under
    /// `Normal` that commit waits for an fsync of the WAL and one of the database: with 12 KiB
    /// results that more than halves the units committed per second on this machine's disk.
    /// Either way the disk must absorb every result twice (WAL, then database) in the long
    /// run. With checkpoints elsewhere, only the `Checkpointer` bounds the WAL: run it often.
    pub fn checkpoint_elsewhere(&mut self) -> Result<Checkpointer, StoreError> {
        let shown = self.path.display().to_string();
        let conn = Connection::open(&self.path).map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
        // Reading the schema makes the connection see the WAL; until then a checkpoint is a
        // silent no-op.
        conn.execute_batch("PRAGMA busy_timeout=5000; SELECT count(*) FROM sqlite_master;")
            .map_err(|source| StoreError::Open {
                path: shown,
                source,
            })?;
        self.conn
            .execute_batch("PRAGMA wal_autocheckpoint=0")
            .map_err(sql("turning automatic checkpoints off"))?;
        Ok(Checkpointer { conn })
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

fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        detail: detail.into(),
    }
}

fn ids_blob(ids: &[ContributorId]) -> Vec<u8> {
    ids.iter().flat_map(|c| c.0.to_le_bytes()).collect()
}

fn u64s_blob(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn blob_u64s(what: &str, bytes: &[u8]) -> Result<Vec<u64>, StoreError> {
    if !bytes.len().is_multiple_of(8) {
        return Err(corrupt(
            what,
            format!("{} bytes is not a list of u64", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect())
}

/// A unit's work as stored: the model lives in its job's row.
fn inputs_blob(work: &Work) -> Vec<u8> {
    let Work::Embedding { inputs, .. } = work;
    let words: usize = inputs.iter().map(|i| i.len() + 1).sum();
    let mut out = Vec::with_capacity(words * 4);
    for input in inputs {
        // Inputs are token lists far below 2^32 tokens.
        out.extend_from_slice(&(input.len() as u32).to_le_bytes());
        for t in input {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    out
}

fn blob_inputs(what: &str, bytes: &[u8]) -> Result<Vec<Vec<u32>>, StoreError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(corrupt(what, format!("{} bytes of token ids", bytes.len())));
    }
    let mut words = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut inputs = Vec::new();
    while let Some(len) = words.next() {
        let len = len as usize;
        if len > words.len() {
            return Err(corrupt(
                what,
                format!("an input of {len} tokens overruns its blob"),
            ));
        }
        inputs.push(words.by_ref().take(len).collect());
    }
    Ok(inputs)
}

impl Store for SqliteStore {
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Dropped without `commit` on any error below: rolled back, nothing written.
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        if !batch.jobs.is_empty() {
            let mut insert_job = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, kind, model, replicas, unit_deadline_ms, min_memory_bytes, first_unit, unit_count, submitted_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sql("preparing a job insert"))?;
            let mut insert_unit = tx
                .prepare_cached("INSERT INTO units (id, job, idx, inputs) VALUES (?1, ?2, ?3, ?4)")
                .map_err(sql("preparing a unit insert"))?;
            for (job, units) in &batch.jobs {
                let first_unit = units.first().map_or(0, |u| u.id.0);
                let job_id = to_i64("job id", job.id.0)?;
                insert_job
                    .execute(params![
                        job_id,
                        job.kind.name(),
                        job.model,
                        job.replicas,
                        to_i64("unit deadline", job.unit_deadline_ms)?,
                        to_i64("memory", job.min_memory_bytes)?,
                        to_i64("unit id", first_unit)?,
                        job.unit_count,
                        to_i64("time", job.submitted.0)?,
                    ])
                    .map_err(sql("inserting a job"))?;
                for (i, u) in units.iter().enumerate() {
                    if u.id.0 != first_unit + i as u64 || u.index != i as u32 || u.job != job.id {
                        return Err(corrupt(
                            format!("unit {}", u.id),
                            format!("not unit {i} of job {} (ids must be consecutive)", job.id),
                        ));
                    }
                    insert_unit
                        .execute(params![
                            to_i64("unit id", u.id.0)?,
                            job_id,
                            u.index,
                            inputs_blob(&u.work)
                        ])
                        .map_err(sql("inserting a unit"))?;
                }
            }
        }
        if !batch.accepted.is_empty() {
            let mut insert_result = tx
                .prepare_cached(
                    "INSERT INTO results (unit, idx, accepted_ms, agreed, rejected, dtype, dims, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(sql("preparing a result insert"))?;
            for a in &batch.accepted {
                insert_result
                    .execute(params![
                        to_i64("unit id", a.unit.0)?,
                        a.index,
                        to_i64("time", a.at.0)?,
                        ids_blob(&a.agreed),
                        ids_blob(&a.rejected),
                        a.result.dtype() as u8,
                        u64s_blob(a.result.dims()),
                        a.result.data(),
                    ])
                    .map_err(sql("storing an accepted result"))?;
            }
        }
        if !batch.finished.is_empty() {
            let mut finish = tx
                .prepare_cached("UPDATE jobs SET state = ?1, failure = ?2 WHERE id = ?3")
                .map_err(sql("preparing a job update"))?;
            for (job, outcome) in &batch.finished {
                let (state, failure) = match outcome {
                    JobOutcome::Done => ("done", None),
                    JobOutcome::Failed(reason) => ("failed", Some(reason.as_str())),
                };
                finish
                    .execute(params![state, failure, to_i64("job id", job.0)?])
                    .map_err(sql("finishing a job"))?;
            }
        }
        tx.commit().map_err(sql("committing"))
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let mut jobs_stmt = self
            .conn
            .prepare(
                "SELECT id, kind, model, replicas, unit_deadline_ms, min_memory_bytes, first_unit, unit_count, submitted_ms
                 FROM jobs WHERE state = 'running' ORDER BY id",
            )
            .map_err(sql("reading jobs"))?;
        let rows = jobs_stmt
            .query_map([], |r| {
                Ok((
                    (
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ),
                    (r.get::<_, u8>(3)?, r.get::<_, i64>(4)?, r.get::<_, i64>(5)?),
                    (
                        r.get::<_, i64>(6)?,
                        r.get::<_, u32>(7)?,
                        r.get::<_, i64>(8)?,
                    ),
                ))
            })
            .map_err(sql("reading jobs"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading jobs"))?;
        let mut units_stmt = self
            .conn
            .prepare(
                "SELECT u.id, u.idx, u.inputs, r.unit IS NOT NULL FROM units u
                 LEFT JOIN results r ON r.unit = u.id
                 WHERE u.id >= ?1 AND u.id < ?2 ORDER BY u.id",
            )
            .map_err(sql("reading units"))?;
        let mut jobs = Vec::with_capacity(rows.len());
        for ((id, kind, model), (replicas, deadline, memory), (first, unit_count, submitted)) in
            rows
        {
            let what = format!("job {id}");
            let kind = JobKind::from_name(&kind)
                .ok_or_else(|| corrupt(&what, format!("unknown job kind {kind:?}")))?;
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
                .query_map([first, first + i64::from(unit_count)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })
                .map_err(sql("reading units"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("reading units"))?;
            if units.len() != unit_count as usize {
                return Err(corrupt(
                    what,
                    format!("{} units stored, {unit_count} expected", units.len()),
                ));
            }
            let mut recovered = Vec::with_capacity(units.len());
            for (uid, index, inputs, accepted) in units {
                let uwhat = format!("unit {uid}");
                let work = Work::Embedding {
                    model: record.model.clone(),
                    inputs: blob_inputs(&uwhat, &inputs)?,
                };
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
        let job_id = to_i64("job id", job.0)?;
        let range: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT first_unit, unit_count FROM jobs WHERE id = ?1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading a job"))?;
        let Some((first, count)) = range else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT idx, dtype, dims, data FROM results
                 WHERE unit >= ?1 AND unit < ?2 ORDER BY unit",
            )
            .map_err(sql("reading results"))?;
        let rows = stmt
            .query_map([first, first + count], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(sql("reading results"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading results"))?;
        rows.into_iter()
            .map(|(index, dtype, dims, data)| {
                let what = format!("result {index} of job {job}");
                if data.len() > MAX_RESULT_BYTES {
                    return Err(corrupt(what, format!("{} bytes", data.len())));
                }
                let dtype = DType::from_code(dtype).map_err(|e| corrupt(&what, e.to_string()))?;
                let dims = blob_u64s(&what, &dims)?;
                Tensor::new(dtype, dims, data)
                    .map(|t| (index, t))
                    .map_err(|e| corrupt(what, e.to_string()))
            })
            .collect()
    }
}
