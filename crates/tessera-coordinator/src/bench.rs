//! `bench_scheduler`: units dispatched, reconciled and committed per second with thousands of
//! simulated contributors in one process, and the coordinator's memory per connected
//! contributor. The scheduler is flushed (one store transaction) every `reports_per_flush`
//! reports and at the end of each simulated millisecond, as a shell flushes after each burst.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tessera_protocol::{AdapterLimits, Capabilities, ContributorId, Tensor, UnitId, Work};

use crate::scheduler::{Config, JobSpec, Output, Scheduler, SchedulerError};
use crate::sqlite::{Durability, SqliteStore};
use crate::store::{MemoryStore, Store};
use crate::time::Millis;

/// Where the benchmark's scheduler stores units and results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchStore {
    Memory,
    /// A new SQLite database in this directory (WAL, `synchronous=NORMAL`), removed afterwards.
    /// Checkpointed once, after the timed run (`final_checkpoint`).
    Sqlite(PathBuf),
}

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    pub contributors: usize,
    pub units: usize,
    pub jobs: usize,
    /// Inputs per unit, and the embedding width of each result row.
    pub inputs_per_unit: usize,
    pub hidden: usize,
    pub store: BenchStore,
    /// Reports between two `flush`es (group commits); also flushed once per simulated ms.
    pub reports_per_flush: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            contributors: 10_000,
            units: 200_000,
            jobs: 20,
            inputs_per_unit: 8,
            hidden: 384,
            store: BenchStore::Memory,
            reports_per_flush: 256,
        }
    }
}

/// The figures, printable with `Display`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerBenchReport {
    pub contributors: usize,
    pub units: usize,
    pub replicas: u8,
    pub result_bytes: usize,
    pub store: String,
    /// Store transactions (`flush`es that had something to commit).
    pub flushes: usize,
    /// Wall time from the first submission to the last job done.
    pub elapsed: Duration,
    /// For SQLite: the time the last checkpoint took after the run, copying what the
    /// background checkpointer had not yet copied from the WAL into the database (not in
    /// `elapsed`; the disk's share of the work).
    pub final_checkpoint: Option<Duration>,
    /// Units dispatched to `replicas` contributors, reconciled and committed, per second.
    pub units_per_second: f64,
    /// Results compared per second (`replicas` per unit).
    pub results_per_second: f64,
    /// Scheduler state per contributor, counted from the structures' capacities.
    pub state_bytes_per_contributor: f64,
    /// Resident memory added per contributor by joining them all (Linux `VmRSS`), if known.
    pub rss_bytes_per_contributor: Option<f64>,
}

impl fmt::Display for SchedulerBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scheduler: {} contributors, {} units x {} replicas, {} B results, {} store",
            self.contributors, self.units, self.replicas, self.result_bytes, self.store
        )?;
        writeln!(
            f,
            "  group commit:                {:>10} flushes ({:.0} units each)",
            self.flushes,
            self.units as f64 / self.flushes.max(1) as f64
        )?;
        writeln!(
            f,
            "  units dispatched+reconciled: {:>10.0} /s   ({} in {:.3} s; {:.0} results compared /s)",
            self.units_per_second,
            self.units,
            self.elapsed.as_secs_f64(),
            self.results_per_second
        )?;
        writeln!(
            f,
            "  memory per contributor:      {:>10.0} B of scheduler state (counted)",
            self.state_bytes_per_contributor
        )?;
        if let Some(c) = self.final_checkpoint {
            writeln!(
                f,
                "  then the WAL checkpoint:      {:>10.3} s (after the run; {:.0} units/s counting it)",
                c.as_secs_f64(),
                self.units as f64 / (self.elapsed + c).as_secs_f64().max(1e-9)
            )?;
        }
        match self.rss_bytes_per_contributor {
            Some(rss) => writeln!(
                f,
                "                               {rss:>10.0} B of resident memory (VmRSS delta)"
            ),
            None => writeln!(
                f,
                "                               resident memory not measurable on this OS"
            ),
        }
    }
}

/// Resident set size in bytes, from `/proc/self/status` (Linux only).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn capabilities(i: usize) -> Capabilities {
    Capabilities {
        adapter: format!("Simulated GPU {}", i % 7),
        backend: "webgpu".into(),
        limits: AdapterLimits {
            max_storage_buffer_binding_size: 128 << 20,
            max_buffer_size: 256 << 20,
            max_compute_workgroup_storage_size: 16 << 10,
            max_compute_invocations_per_workgroup: 256,
        },
        memory_budget_bytes: 2 << 30,
        benchmark_score: 100.0 + (i % 13) as f64,
        max_concurrent_units: 1,
        lends_blobs: false,
    }
}

/// Runs the benchmark: joins `contributors`, submits `units` across `jobs` embedding jobs, and
/// has every contributor answer each assignment at once with the honest result, until every
/// job is done. Results for one unit are equal, so each unit is accepted at its second result.
pub fn bench_scheduler(config: &BenchConfig) -> Result<SchedulerBenchReport, SchedulerError> {
    match &config.store {
        BenchStore::Memory => run(config, MemoryStore::new(), "in-memory".into()),
        BenchStore::Sqlite(dir) => {
            let path = dir.join(format!("tessera-bench-{}.sqlite", std::process::id()));
            let report = run_sqlite(config, &path);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            report
        }
    }
}

/// The SQLite run: no checkpoint inside the timed run (a checkpoint in the commit path waits
/// for two fsyncs; one on a second thread every 50 ms stalled the writer and measured slower
/// still on this machine), then one full checkpoint, timed apart and reported.
fn run_sqlite(config: &BenchConfig, path: &Path) -> Result<SchedulerBenchReport, SchedulerError> {
    let mut store = SqliteStore::open(path, Durability::Normal)?;
    let mut checkpointer = store.checkpoint_elsewhere()?;
    let mut report = run(config, store, format!("SQLite WAL at {}", path.display()))?;
    let start = Instant::now();
    checkpointer.checkpoint_all()?;
    report.final_checkpoint = Some(start.elapsed());
    Ok(report)
}

fn run<S: Store>(
    config: &BenchConfig,
    store: S,
    store_name: String,
) -> Result<SchedulerBenchReport, SchedulerError> {
    let sched_config = Config {
        heartbeat_timeout_ms: u64::MAX / 4,
        ..Config::default()
    };
    let mut now = Millis(0);
    let mut s = Scheduler::restore(sched_config, store, now)?;
    let rss_before = rss_bytes();
    let state_before = s.contributor_state_bytes();
    for i in 0..config.contributors {
        s.join(now, ContributorId(i as u64 + 1), capabilities(i))?;
    }
    let rss_after = rss_bytes();
    let n = config.contributors.max(1) as f64;
    let state_bytes_per_contributor = (s.contributor_state_bytes() - state_before) as f64 / n;
    let rss_bytes_per_contributor = match (rss_before, rss_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / n),
        _ => None,
    };

    // A pool of distinct honest results; unit i's result is pool[i % len].
    let rows = config.inputs_per_unit.max(1);
    let hidden = config.hidden.max(1);
    let pool: Vec<Tensor> = (0..64)
        .map(|p| {
            let values: Vec<f32> = (0..rows * hidden)
                .map(|k| (((k * 31 + p * 17) % 97) as f32 - 48.0) / 97.0)
                .collect();
            Tensor::from_f32(vec![rows as u64, hidden as u64], &values)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| SchedulerError::InvalidJob(e.to_string()))?;
    let units_per_job = config.units.div_ceil(config.jobs.max(1)).max(1);
    let replicas = 2;

    let start = Instant::now();
    let mut submitted = 0;
    let mut jobs_left = 0;
    while submitted < config.units {
        let count = units_per_job.min(config.units - submitted);
        let inputs = vec![vec![101u32, 7592, 102]; count * rows];
        let mut spec = JobSpec::embedding("bafkreibenchmarkmodel", inputs);
        spec.inputs_per_unit = rows;
        spec.replicas = replicas;
        s.submit(now, spec)?;
        submitted += count;
        jobs_left += 1;
    }
    let mut flushes = 0usize;
    let mut flush = |s: &mut Scheduler<S>, now: Millis| -> Result<(), SchedulerError> {
        if s.needs_flush() {
            s.flush(now)?;
            flushes += 1;
        }
        Ok(())
    };
    flush(&mut s, now)?;
    let every = config.reports_per_flush.max(1);
    let mut answers: Vec<(ContributorId, UnitId, usize)> = Vec::new();
    let mut units_accepted = 0usize;
    while jobs_left > 0 {
        while let Some(out) = s.poll() {
            match out {
                Output::Assign {
                    contributor,
                    unit,
                    work,
                    ..
                } => {
                    let Work::Embedding { .. } = &*work;
                    answers.push((contributor, unit, unit.0 as usize % pool.len()));
                }
                Output::UnitAccepted { .. } => units_accepted += 1,
                Output::JobDone { .. } => jobs_left -= 1,
                Output::JobFailed { job, reason } => {
                    return Err(SchedulerError::InvalidJob(format!(
                        "benchmark job {job} failed: {reason}"
                    )));
                }
                Output::Cancel { .. }
                | Output::ContributorLost { .. }
                | Output::ContributorExcluded { .. } => {}
            }
        }
        if answers.is_empty() && jobs_left > 0 {
            return Err(SchedulerError::InvalidJob(
                "benchmark stalled: no work handed out".into(),
            ));
        }
        now = now.plus(1);
        for (i, (contributor, unit, p)) in answers.drain(..).enumerate() {
            s.report(now, contributor, unit, pool[p].clone())?;
            if (i + 1) % every == 0 {
                flush(&mut s, now)?;
            }
        }
        flush(&mut s, now)?;
    }
    let elapsed = start.elapsed();
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(SchedulerBenchReport {
        contributors: config.contributors,
        units: units_accepted,
        replicas,
        result_bytes: rows * hidden * 4,
        store: store_name,
        flushes,
        elapsed,
        final_checkpoint: None,
        units_per_second: units_accepted as f64 / secs,
        results_per_second: (units_accepted * usize::from(replicas)) as f64 / secs,
        state_bytes_per_contributor,
        rss_bytes_per_contributor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_completes_every_unit() {
        let config = BenchConfig {
            contributors: 50,
            units: 500,
            jobs: 3,
            hidden: 8,
            ..BenchConfig::default()
        };
        let report = bench_scheduler(&config).unwrap();
        assert_eq!(report.units, 500);
        assert!(report.units_per_second > 0.0);
        assert!(report.state_bytes_per_contributor > 0.0);
        let text = report.to_string();
        assert!(
            text.contains("50 contributors, 500 units x 2 replicas"),
            "{text}"
        );
    }

    #[test]
    fn small_sqlite_bench_commits_in_groups_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let config = BenchConfig {
            contributors: 50,
            units: 500,
            jobs: 3,
            hidden: 8,
            store: BenchStore::Sqlite(dir.path().to_owned()),
            reports_per_flush: 16,
            ..BenchConfig::default()
        };
        let report = bench_scheduler(&config).unwrap();
        assert_eq!(report.units, 500);
        // At least one flush per 16 reports (two per unit), and far fewer than one per unit.
        assert!(
            (500 / 8..250).contains(&report.flushes),
            "{} flushes",
            report.flushes
        );
        assert!(report.final_checkpoint.is_some());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
