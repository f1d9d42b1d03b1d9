//! The SQLite store: round trip, resuming a job after a restart, and clear errors for a
//! corrupt or unreachable database.

use tessera_coordinator::{
    Config, Durability, JobOutcome, JobSpec, Millis, Output, Scheduler, SqliteStore, Store,
    StoreError,
};
use tessera_protocol::{ContributorId, Work};

use crate::common::{caps, honest};

fn spec(n: u32) -> JobSpec {
    let mut spec = JobSpec::embedding("bafkreistore", (0..n).map(|i| vec![101, i, 102]).collect());
    spec.inputs_per_unit = 2;
    spec
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
    // Answer one round: units 0 and 1 get both replicas; the rest stay in flight or queued.
    let mut answered = Vec::new();
    while let Some(out) = s.poll() {
        if let Output::Assign {
            contributor,
            unit,
            work,
            ..
        } = out
        {
            answered.push((contributor, unit, honest(&work)));
        }
    }
    assert_eq!(answered.len(), 4);
    for (who, unit, result) in answered {
        s.report(Millis(10), who, unit, result).unwrap();
    }
    let accepted_before: Vec<u32> = std::iter::from_fn(|| s.poll())
        .filter_map(|o| match o {
            Output::UnitAccepted { index, .. } => Some(index),
            _ => None,
        })
        .collect();
    assert_eq!(accepted_before.len(), 2);
    drop(s);

    // Restart: a new process opens the same file.
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
    let mut done = false;
    while !done {
        t += 1;
        let outs: Vec<Output> = std::iter::from_fn(|| s.poll()).collect();
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
                Output::UnitAccepted { index, .. } => {
                    assert!(
                        !accepted_before.contains(&index),
                        "unit {index} accepted again after restart"
                    )
                }
                Output::JobDone { .. } => done = true,
                _ => {}
            }
        }
        assert!(t < 200, "job did not finish after restart");
    }
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

#[test]
fn the_database_is_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.sqlite");
    let store = SqliteStore::open(&path, Durability::Normal).unwrap();
    let mut s = Scheduler::restore(Config::default(), store, Millis(0)).unwrap();
    s.submit(Millis(0), spec(2)).unwrap();
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
