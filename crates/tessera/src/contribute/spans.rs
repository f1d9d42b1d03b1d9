//! Span jobs, run in the order the session handed them out by one task: a span's shard (in the
//! verified cache by then) loaded as a `SpanStage`, forwards run on a blocking thread as the
//! session's `next_span_jobs` batches them, sessions ended and spans dropped. A span lives as
//! long as its connection (its sessions' caches would be stale on another).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::anyhow;
use tessera_contributor::{Millis, Session, SpanJob, next_span_jobs};
use tessera_engine::Gpu;
use tessera_engine::cid::Cid;
use tessera_engine::llama::{Llama, Stages};
use tessera_engine::stage::{EXACT_BATCH_ROWS, SpanStage, Step};
use tokio::sync::{Notify, mpsc};

use super::{Done, Machine};

/// A span job's outcome, for the session.
pub(super) enum SpanDone {
    Loaded { shard: String, blocks: Range<usize>, result: Result<(), String> },
    Forwarded(Vec<StepDone>),
}

/// One step of a batch: its session and step, its share of the GPU time in ms, and its output
/// rows with their width, or why not.
pub(super) type StepDone = (u64, u64, f64, Result<(Vec<f32>, usize), String>);

impl SpanDone {
    pub(super) fn report(self, session: &mut Session, now: Millis) {
        match self {
            SpanDone::Loaded { shard, blocks, result } => session.span_loaded(now, shard, blocks, result),
            SpanDone::Forwarded(steps) => {
                for (id, step, busy_ms, result) in steps {
                    session.forwarded(now, id, step, busy_ms, result);
                }
            }
        }
    }
}

/// The queue of span jobs and the task that runs them; the task ends with the connection.
pub(super) struct SpanWorker {
    queue: Arc<Mutex<VecDeque<SpanJob>>>,
    wake: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for SpanWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SpanWorker {
    pub(super) fn start(machine: Machine, done: mpsc::Sender<Done>) -> SpanWorker {
        let (queue, wake) = (Arc::new(Mutex::new(VecDeque::new())), Arc::new(Notify::new()));
        let task = tokio::spawn(work(machine, queue.clone(), wake.clone(), done)).abort_handle();
        SpanWorker { queue, wake, task }
    }

    /// Queues `job` behind the ones before it.
    pub(super) fn push(&self, job: SpanJob) {
        lock(&self.queue).push_back(job);
        self.wake.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn work(machine: Machine, queue: Arc<Mutex<VecDeque<SpanJob>>>, wake: Arc<Notify>, done: mpsc::Sender<Done>) {
    let mut spans: HashMap<String, Arc<Mutex<SpanStage>>> = HashMap::new();
    loop {
        let jobs = next_span_jobs(&mut lock(&queue), EXACT_BATCH_ROWS);
        let Some(first) = jobs.first() else {
            wake.notified().await;
            continue;
        };
        let report = match first.clone() {
            SpanJob::Load { shard, blocks, max_sessions } => {
                let result = load(&machine, &mut spans, &shard, blocks.clone(), max_sessions).await.map_err(|e| format!("{e:#}"));
                Some(SpanDone::Loaded { shard, blocks, result })
            }
            SpanJob::Forward { shard, .. } => Some(SpanDone::Forwarded(forward(&machine.gpu, spans.get(&shard).cloned(), jobs).await)),
            SpanJob::End { session } => {
                for stage in spans.values() {
                    lock(stage).end(session);
                }
                None
            }
            SpanJob::Unload { shard } => {
                spans.remove(&shard);
                None
            }
        };
        if let Some(report) = report
            && done.send(Done::Span(report)).await.is_err()
        {
            return;
        }
    }
}

/// Loads `blocks` of the shard, which the session had fetched into the verified cache.
async fn load(
    machine: &Machine,
    spans: &mut HashMap<String, Arc<Mutex<SpanStage>>>,
    shard: &str,
    blocks: Range<usize>,
    max_sessions: usize,
) -> anyhow::Result<()> {
    if spans.contains_key(shard) {
        return Ok(());
    }
    let started = Instant::now();
    let mut blob = machine.blobs.get(&shard.parse::<Cid>()?)?;
    let (gpu, name, range) = (machine.gpu.clone(), format!("span shard {shard}"), blocks.clone());
    let stage = tokio::task::spawn_blocking(move || -> anyhow::Result<SpanStage> {
        let model = Llama::load(&gpu, &name, &mut blob.file, &Stages { embedding: false, blocks: range.clone(), head: false })?;
        Ok(SpanStage::new(model, range, max_sessions.max(1))?)
    })
    .await??;
    eprintln!("tessera contribute: span {}..{} ({shard}) loaded in {:.1} s", blocks.start, blocks.end, started.elapsed().as_secs_f64());
    spans.insert(shard.to_string(), Arc::new(Mutex::new(stage)));
    Ok(())
}

/// Runs a batch of forwards through `stage` on a blocking thread: each step's outcome, with the
/// GPU time shared among them.
async fn forward(gpu: &Arc<Gpu>, stage: Option<Arc<Mutex<SpanStage>>>, jobs: Vec<SpanJob>) -> Vec<StepDone> {
    let steps: Vec<(u64, u64, usize, usize, Vec<f32>)> = jobs
        .into_iter()
        .filter_map(|job| match job {
            SpanJob::Forward { session, step, start, capacity, hidden, .. } => Some((session, step, capacity, start, hidden)),
            _ => None,
        })
        .collect();
    let ids: Vec<(u64, u64)> = steps.iter().map(|&(session, step, ..)| (session, step)).collect();
    let Some(stage) = stage else {
        return ids.into_iter().map(|(session, step)| (session, step, 0.0, Err("this span is not loaded here".to_string()))).collect();
    };
    let (gpu, started) = (gpu.clone(), Instant::now());
    let outputs = match tokio::task::spawn_blocking(move || run_steps(&stage, &gpu, &steps)).await {
        Ok(outputs) => outputs,
        Err(e) => ids.iter().map(|_| Err(anyhow!("the span's thread failed: {e}"))).collect(),
    };
    let busy_ms = started.elapsed().as_secs_f64() * 1e3 / ids.len().max(1) as f64;
    ids.into_iter().zip(outputs).map(|((session, step), output)| (session, step, busy_ms, output.map_err(|e| format!("{e:#}")))).collect()
}

/// Runs `steps` (session, step, capacity, start, hidden states) through `stage` as one batch:
/// each step's output rows and their width. A batch fails whole when one step is bad, changing
/// nothing, so then each step runs alone for an answer of its own.
fn run_steps(stage: &Mutex<SpanStage>, gpu: &Gpu, steps: &[(u64, u64, usize, usize, Vec<f32>)]) -> Vec<anyhow::Result<(Vec<f32>, usize)>> {
    let mut stage = lock(stage);
    let dim = stage.dim();
    let batch: Vec<Step> =
        steps.iter().map(|(session, _, capacity, start, hidden)| Step { session: *session, capacity: *capacity, start: *start, hidden }).collect();
    let outputs: Vec<anyhow::Result<Vec<f32>>> = match pollster::block_on(stage.forward_batch(gpu, &batch)) {
        Ok(outputs) => outputs.into_iter().map(Ok).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e.into())],
        Err(_) => batch.iter().map(|s| Ok(pollster::block_on(stage.forward(gpu, s.session, s.capacity, s.start, s.hidden))?)).collect(),
    };
    outputs.into_iter().map(|output| output.map(|rows| (rows, dim))).collect()
}
