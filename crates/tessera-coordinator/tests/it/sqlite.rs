//! The SQLite store: round trip, resuming a job after a restart between two flushes, atomic
//! group commits, and clear errors for a corrupt or unreachable database.

use tessera_coordinator::{
    AcceptedUnit, Batch, Config, Durability, JobKind, JobOutcome, JobRecord, JobSpec, Millis,
    Output, Scheduler, Snapshot, SqliteStore, Store, StoreError, UnitRecord,
};
use tessera_protocol::{ContributorId, JobId, Tensor, UnitId, Work};

use crate::common::{caps, honest};

fn spec(n: u32) -> JobSpec {
    let mut spec = JobSpec::embedding("bafkreistore", (0..n).map(|i| vec![101, i, 102]).collect());
    spec.inputs_per_unit = 2;
    spec
}

/// Answers every assignment among the outputs honestly at `t`; returns the units accepted.
fn answer_round(s: &mut Scheduler<SqliteStore>, t: u64) -> Vec<u32> {
    let outs: Vec<Output> = std::iter::from_fn(|| s.poll()).collect();
    let mut accepted = Vec::new();
    for out in outs {
        match out {
            Output::Assign {
                contributor,
                unit,
                work,
                ..
            } => {
                s.report(Millis(t), contributor, unit, honest(&work))
                    .unwrap();
            }
            Output::UnitAccepted { index, .. } => accepted.push(index),
            _ => {}
        }
    }
    accepted
}

#[test]
fn a_restarted_coordinator_resumes_its_jobs_from_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.sqlite");
    let store = SqliteStore::open(&path, Durability::Full).unwrap();
    let mut s = Scheduler::restore(Config::default(), store, Millis(0)).unwrap();
    for i in 1..=4 {
        s.join(Millis(0), ContributorId(i), caps(1)).unwrap();
    }
    let job = s.submit(Millis(0), spec(9)).unwrap();
    s.flush(Millis(0)).unwrap();
    // Round one: units 0 and 1 get both replicas and are accepted and flushed.
    assert!(answer_round(&mut s, 10).is_empty());
    s.flush(Millis(10)).unwrap();
    // Round two: units 2 and 3 are accepted but only staged when the coordinator stops.
    let accepted_before = answer_round(&mut s, 20);
    assert_eq!(accepted_before, vec![0, 1]);
    assert_eq!(s.unflushed().accepted.len(), 2);
    assert!(std::iter::from_fn(|| s.poll()).all(|o| !matches!(o, Output::UnitAccepted { .. })));
    drop(s);

    // Restart: a new process opens the same file; units 2 and 3 were never stored.
    let store = SqliteStore::open(&path, Durability::Full).unwrap();
    let mut s = Scheduler::restore(Config::default(), store, Millis(100)).unwrap();
    assert_eq!(
        s.job_status(job).map(|j| (j.units_accepted, j.units_total)),
        Some((2, 5))
    );
    for i in 10..=13 {
        s.join(Millis(100), ContributorId(i), caps(1)).unwrap();
    }
    let mut t = 100;
    let mut accepted_after = Vec::new();
    while s.job_status(job).is_some() || s.needs_flush() {
        t += 1;
        accepted_after.extend(answer_round(&mut s, t));
        s.flush(Millis(t)).unwrap();
        assert!(t < 200, "job did not finish after restart");
    }
    accepted_after.extend(answer_round(&mut s, t));
    accepted_after.sort_unstable();
    assert_eq!(
        accepted_after,
        vec![2, 3, 4],
        "each unit reported accepted once"
    );
    assert_eq!(s.store().outcome(job).unwrap(), Some(JobOutcome::Done));
    let results = s.store().results(job).unwrap();
    assert_eq!(
        results.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    for (index, result) in results {
        let inputs = (index * 2..(index * 2 + 2).min(9))
            .map(|i| vec![101, i, 102])
            .collect();
        assert_eq!(
            result,
            honest(&Work::Embedding {
                model: "bafkreistore".into(),
                inputs
            })
        );
    }
    // Finished jobs are not resumed, and ids are not reused.
    drop(s);
    let mut store = SqliteStore::open(&path, Durability::Normal).unwrap();
    let snapshot = store.load().unwrap();
    assert!(snapshot.jobs.is_empty());
    assert_eq!((snapshot.next_job, snapshot.next_unit), (2, 6));
}

/// Job 1, an embedding job of `units` units, as the store records it.
fn job_record(units: u32) -> JobRecord {
    JobRecord {
        id: JobId(1),
        kind: JobKind::Embedding,
        model: "bafkreistore".into(),
        replicas: 2,
        unit_deadline_ms: 1000,
        min_memory_bytes: 0,
        unit_count: units,
        submitted: Millis(0),
    }
}

#[test]
fn a_failed_commit_writes_nothing_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("atomic.sqlite");
    let mut store = SqliteStore::open(&path, Durability::Normal).unwrap();
    let record = job_record(1);
    let work = Work::Embedding {
        model: "bafkreistore".into(),
        inputs: vec![vec![101, 7, 102], vec![], vec![5]],
    };
    let unit = UnitRecord {
        id: UnitId(1),
        job: JobId(1),
        index: 0,
        work: work.clone(),
    };
    let accepted = |unit: u64| AcceptedUnit {
        unit: UnitId(unit),
        job: JobId(1),
        index: 0,
        result: Tensor::from_f32(vec![3, 2], &[0.5, -1.0, 2.0, 0.25, 0.0, 1e-3]).unwrap(),
        agreed: vec![ContributorId(3), ContributorId(u64::MAX >> 1)],
        rejected: vec![ContributorId(4)],
        at: Millis(5),
    };
    // The new job is fine, the result is for a unit that does not exist: nothing is written.
    let bad = Batch {
        jobs: vec![(record.clone(), vec![unit.clone()])],
        accepted: vec![accepted(99)],
        finished: vec![],
    };
    assert!(matches!(
        store.commit(&bad).unwrap_err(),
        StoreError::Sqlite { .. }
    ));
    assert_eq!(
        store.load().unwrap(),
        Snapshot {
            jobs: vec![],
            next_job: 1,
            next_unit: 1
        }
    );
    // The same writes without the bad one commit, and read back as they went in.
    let good = Batch {
        accepted: vec![accepted(1)],
        ..bad
    };
    store.commit(&good).unwrap();
    let snapshot = store.load().unwrap();
    assert_eq!(snapshot.jobs.len(), 1);
    assert_eq!(snapshot.jobs[0].units, vec![(unit, true)]);
    assert_eq!(
        store.results(JobId(1)).unwrap(),
        vec![(0, accepted(1).result)]
    );
    // Accepting a unit twice is refused, not silently overwritten.
    let twice = Batch {
        accepted: vec![accepted(1)],
        ..Batch::default()
    };
    assert!(store.commit(&twice).is_err());
    assert!(store.commit(&Batch::default()).is_ok());
}

#[test]
fn the_database_is_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.sqlite");
    let store = SqliteStore::open(&path, Durability::Normal).unwrap();
    let mut s = Scheduler::restore(Config::default(), store, Millis(0)).unwrap();
    s.submit(Millis(0), spec(2)).unwrap();
    s.flush(Millis(0)).unwrap();
    assert!(
        dir.path().join("wal.sqlite-wal").exists(),
        "no write-ahead log next to the database"
    );
}

#[test]
fn a_corrupt_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.sqlite");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStore::open(&path, Durability::Normal).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot open the coordinator database {}: ",
            path.display()
        )) && text.contains("not a database"),
        "{text}"
    );
}

#[test]
fn an_unreachable_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // The parent "directory" is a file, so nothing can be created there (even as root).
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let path = blocker.join("db.sqlite");
    let err = SqliteStore::open(&path, Durability::Normal).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot open the coordinator database {}: ",
            path.display()
        )),
        "{text}"
    );
}

/// Commits `units` accepted units of 32 x 384 floats one transaction each, as a busy
/// coordinator does; with `checkpoint_every`, automatic checkpoints are off and a
/// `Checkpointer` runs after every that many commits instead (what a shell using
/// `checkpoint_elsewhere` does). Returns the largest size the `-wal` file reached and the
/// result bytes committed.
fn commit_continuously(units: u32, checkpoint_every: Option<u32>) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sustained.sqlite");
    let wal = dir.path().join("sustained.sqlite-wal");
    let mut store = SqliteStore::open(&path, Durability::Normal).unwrap();
    let mut checkpointer = checkpoint_every.map(|_| store.checkpoint_elsewhere().unwrap());
    let (rows, hidden) = (32usize, 384usize);
    let record = job_record(units);
    let unit_records = (0..units)
        .map(|i| UnitRecord {
            id: UnitId(1 + u64::from(i)),
            job: JobId(1),
            index: i,
            work: Work::Embedding {
                model: "bafkreistore".into(),
                inputs: vec![vec![101, i, 102]; rows],
            },
        })
        .collect();
    store
        .commit(&Batch {
            jobs: vec![(record, unit_records)],
            ..Batch::default()
        })
        .unwrap();
    let (mut largest, mut written) = (0u64, 0u64);
    for i in 0..units {
        let values: Vec<f32> = (0..rows * hidden)
            .map(|k| ((k as u32 ^ i) % 97) as f32 / 97.0)
            .collect();
        let result = Tensor::from_f32(vec![rows as u64, hidden as u64], &values).unwrap();
        written += result.data().len() as u64;
        let batch = Batch {
            accepted: vec![AcceptedUnit {
                unit: UnitId(1 + u64::from(i)),
                job: JobId(1),
                index: i,
                result,
                agreed: vec![ContributorId(1), ContributorId(2)],
                rejected: vec![],
                at: Millis(u64::from(i)),
            }],
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        if let (Some(c), Some(every)) = (checkpointer.as_mut(), checkpoint_every)
            && (i + 1) % every == 0
        {
            c.checkpoint().unwrap();
        }
    }
    assert_eq!(store.results(JobId(1)).unwrap().len(), units as usize);
    (largest, written)
}

/// Under a continuous stream of commits the `-wal` file stays under a bound, because
/// checkpoints let SQLite write it from its start again. Each case commits more than the
/// bound, so a WAL that never restarted would exceed it.
#[test]
fn the_wal_stays_bounded_under_sustained_commits() {
    let automatic = tessera_coordinator::sqlite::WAL_CHECKPOINT_BYTES;
    // A commit's frames can land past the threshold before the checkpoint that follows it.
    let cases = [
        ("automatic checkpoints", 2_200, None, automatic + (1 << 20)),
        ("a Checkpointer every 64 commits", 400, Some(64), 16 << 20),
    ];
    for (name, units, checkpoint_every, bound) in cases {
        let (largest, written) = commit_continuously(units, checkpoint_every);
        assert!(
            written > bound,
            "{name}: only {written} bytes committed, the WAL could hold them all"
        );
        assert!(
            largest <= bound,
            "{name}: the WAL grew to {largest} bytes; the bound is {bound}"
        );
    }
}
