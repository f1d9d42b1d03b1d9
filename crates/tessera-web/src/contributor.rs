//! `Contributor`: the page's volunteer. It opens the GPU, then in the background connects to the
//! coordinator (`rtc`), feeds what arrives to the session machine (`tessera_contributor`), runs
//! the jobs it hands out (`worker`) and reports to the page through `onEvent`. Failure is a
//! state: a lost connection or refused signalling shows as status `error` and reconnects with
//! back-off, a lost GPU is reopened, and `pause`/`resume`/`stop` are honoured wherever the loop
//! is. The direct channels to other contributors that the session asks for are made, fed and
//! closed here too; they end with the connection.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use futures::channel::mpsc;
use futures::future::{Fuse, FusedFuture, LocalBoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt, pin_mut, select};
use gloo_timers::future::TimeoutFuture;
use serde::Serialize;
use tessera_engine::AdapterSummary;
use tessera_contributor::{Event, Outgoing, Output, Policy, Session, SpanJob, Status, next_span_jobs};
use tessera_engine::stage::EXACT_BATCH_ROWS;
use tessera_protocol::{Capabilities, Incoming};
use wasm_bindgen::prelude::*;

use crate::lifecycle::{Backoff, Options, Stats, check_budget};
use crate::rtc::{self, Channel, Received};
use crate::worker::{self, Finished, SpanDone, Worker};
use crate::{js_error, log, now_ms, to_json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Stop,
}

/// What the page's handle and the background loop share.
struct Shared {
    options: Options,
    adapter: AdapterSummary,
    budget: Cell<f64>,
    wanted: Cell<Wanted>,
    /// Set by `resume`: reconnect now rather than at the end of the back-off.
    reconnect_now: Cell<bool>,
    /// Wakes the loop after a change above; holds one wake-up at most.
    wake: RefCell<mpsc::Sender<()>>,
    stats: RefCell<Stats>,
    on_event: js_sys::Function,
}

impl Shared {
    /// Counts the event and hands it to the page, unless it is a status the page has already.
    fn emit(&self, event: Event) {
        if !self.stats.borrow_mut().apply(now_ms(), &event) {
            return;
        }
        let serializer = serde_wasm_bindgen::Serializer::new().serialize_missing_as_null(true);
        match event.serialize(&serializer) {
            Ok(value) => {
                if let Err(e) = self.on_event.call1(&JsValue::NULL, &value) {
                    log(&format!("onEvent threw: {}", crate::js_detail(&e)));
                }
            }
            Err(e) => log(&format!("an event did not convert: {e}")),
        }
    }

    fn status(&self, status: Status, detail: Option<String>) {
        self.emit(Event::Status { status, detail });
    }

    fn want(&self, wanted: Wanted) {
        if self.wanted.get() != Wanted::Stop {
            self.wanted.set(wanted);
        }
        self.wake();
    }

    fn wake(&self) {
        // Full means a wake-up is pending already.
        let _ = self.wake.borrow_mut().try_send(());
    }
}

/// A volunteer contributing this page's GPU to a coordinator.
#[wasm_bindgen]
pub struct Contributor {
    shared: Rc<Shared>,
}

#[wasm_bindgen]
impl Contributor {
    /// Opens the GPU and starts contributing in the background. `options` is JSON
    /// `{coordinator: "http(s)://host[:port]", budget: (0, 1]}`; `on_event` gets plain objects
    /// with a `type` (`status`, `joined`, `download`, `unit`, `verdict`). Rejects on bad options
    /// and when this browser has no WebGPU adapter.
    pub async fn start(options: String, on_event: js_sys::Function) -> Result<Contributor, JsError> {
        let options = Options::parse(&options).map_err(js_error)?;
        let gpu = worker::open_gpu().await.map_err(js_error)?;
        let (wake, woken) = mpsc::channel(0);
        let shared = Rc::new(Shared {
            adapter: worker::describe(&gpu).await,
            budget: Cell::new(options.budget),
            options: options.clone(),
            wanted: Cell::new(Wanted::Run),
            reconnect_now: Cell::new(false),
            wake: RefCell::new(wake),
            stats: RefCell::new(Stats::new(now_ms())),
            on_event,
        });
        let emitter = shared.clone();
        let worker = Rc::new(Worker::new(options, gpu, Box::new(move |event| emitter.emit(event))));
        wasm_bindgen_futures::spawn_local(contribute(shared.clone(), worker, woken));
        Ok(Contributor { shared })
    }

    /// The GPU adapter as JSON: `{name, backend, device_type, driver}` (the name as the browser
    /// gives it: `info.description`, or `info.vendor · info.architecture`).
    pub fn adapter(&self) -> Result<String, JsError> {
        to_json(&self.shared.adapter)
    }

    /// Leaves the coordinator (it reissues our units) and stays paused until `resume`.
    pub fn pause(&self) {
        self.shared.want(Wanted::Pause);
    }

    /// Connects again after `pause`, or at once when waiting to reconnect after an error.
    /// Does nothing after `stop`.
    pub fn resume(&self) {
        self.shared.reconnect_now.set(true);
        self.shared.want(Wanted::Run);
    }

    /// The share of time the GPU may be busy, in (0, 1]; takes effect at once.
    #[wasm_bindgen(js_name = setBudget)]
    pub fn set_budget(&self, budget: f64) -> Result<(), JsError> {
        check_budget(budget).map_err(js_error)?;
        self.shared.budget.set(budget);
        self.shared.wake();
        Ok(())
    }

    /// Leaves the coordinator and closes for good.
    pub fn stop(&self) {
        self.shared.want(Wanted::Stop);
    }

    /// The counters as JSON: `{status, detail, contributor, unitsDone, unitsAccepted,
    /// unitsRejected, bytesDownloaded, cacheHits, busyMs, spans, stepsForwarded, rowsForwarded,
    /// links, stepsPassedDirect, startedAtMs, firstAcceptedAtMs}`.
    pub fn stats(&self) -> Result<String, JsError> {
        to_json(&*self.shared.stats.borrow())
    }
}

impl Drop for Contributor {
    /// A handle freed by the page stops the contributor.
    fn drop(&mut self) {
        self.shared.want(Wanted::Stop);
    }
}

/// How one connection ended.
enum Ended {
    /// `pause` or `stop`: the loop's top decides what next.
    ByRequest,
    Failed(String),
}

/// The background loop: connect, contribute, and after a failure wait and connect again.
async fn contribute(shared: Rc<Shared>, worker: Rc<Worker>, mut woken: mpsc::Receiver<()>) {
    let mut backoff = Backoff::default();
    let mut capabilities = None;
    loop {
        match shared.wanted.get() {
            Wanted::Stop => {
                shared.status(Status::Paused, Some("stopped".into()));
                return;
            }
            Wanted::Pause => {
                shared.status(Status::Paused, None);
                woken.next().await;
                continue;
            }
            Wanted::Run => {}
        }
        shared.reconnect_now.set(false);
        shared.status(Status::Connecting, None);
        let started = now_ms();
        let ended = connection(&shared, &worker, &mut capabilities, &mut woken).await;
        // The direct channels went with the connection.
        if shared.stats.borrow().links > 0 {
            shared.emit(Event::Links { open: 0 });
        }
        let reason = match ended {
            Ended::ByRequest => {
                backoff.reset();
                continue;
            }
            Ended::Failed(reason) => reason,
        };
        log(&reason);
        if shared.wanted.get() != Wanted::Run {
            continue;
        }
        let wait = backoff.next_wait_ms(now_ms() - started);
        shared.status(Status::Error, Some(format!("{reason}; reconnecting in {} s", wait / 1000.0)));
        let mut timer = TimeoutFuture::new(wait as u32).fuse();
        loop {
            select! {
                _ = timer => break,
                _ = woken.next() => if shared.wanted.get() != Wanted::Run || shared.reconnect_now.get() {
                    backoff.reset();
                    break;
                },
            }
        }
    }
}

/// One connection, from opening the GPU (if it was lost) to its end.
async fn connection(shared: &Shared, worker: &Rc<Worker>, capabilities: &mut Option<Capabilities>, woken: &mut mpsc::Receiver<()>) -> Ended {
    let gpu = match worker.gpu().await {
        Ok(gpu) => gpu,
        Err(e) => return Ended::Failed(e),
    };
    let capabilities = match capabilities {
        Some(known) => known.clone(),
        None => match worker::capabilities(&gpu, &shared.adapter.name, shared.options.memory_mib).await {
            Ok(measured) => capabilities.insert(measured).clone(),
            Err(e) => return Ended::Failed(e),
        },
    };
    drop(gpu);
    let url = shared.options.signalling_url();
    let connect = Channel::connect(&url).fuse();
    pin_mut!(connect);
    let mut channel = loop {
        select! {
            connected = connect => match connected {
                Ok(channel) => break channel,
                Err(e) => return Ended::Failed(format!("connecting to {}: {e}", shared.options.coordinator)),
            },
            _ = woken.next() => if shared.wanted.get() != Wanted::Run {
                return Ended::ByRequest;
            },
        }
    };
    log(&format!("connected to {}; the DataChannel takes messages of up to {} bytes", shared.options.coordinator, channel.max_message()));
    // Spans belong to the connection that placed them.
    for shard in worker.drop_spans() {
        shared.emit(Event::SpanDropped { shard });
    }
    let mut session = Session::new(capabilities, Policy::TAB, shared.budget.get(), channel.max_message());
    let mut unit: Fuse<LocalBoxFuture<'static, Finished>> = Fuse::terminated();
    // Span jobs run one at a time, in the order the session gave them.
    let mut span_jobs: VecDeque<SpanJob> = VecDeque::new();
    let mut span: Fuse<LocalBoxFuture<'static, SpanDone>> = Fuse::terminated();
    // Direct channels to other contributors by the session's link numbers, and the ones being
    // made (or given the peer's answer).
    let mut links: HashMap<u64, Channel> = HashMap::new();
    let mut setups: FuturesUnordered<LocalBoxFuture<'static, Setup>> = FuturesUnordered::new();
    let mut leaving = false;
    loop {
        if shared.wanted.get() != Wanted::Run && !leaving {
            session.leave();
            leaving = true;
        }
        while let Some(output) = session.poll() {
            match output {
                Output::Send(message) => {
                    if let Err(e) = channel.send(message).await {
                        return Ended::Failed(e);
                    }
                }
                Output::Run(assignment) => unit = worker.clone().run(assignment).boxed_local().fuse(),
                Output::Span(job) => span_jobs.push_back(job),
                Output::Offer { link, peer } => {
                    setups.push(async move { Setup::Described { link, result: Channel::offer(&format!("contributor {peer}")).await } }.boxed_local());
                }
                Output::Answer { link, peer, sdp } => {
                    let answer = async move { Setup::Described { link, result: Channel::answer(&format!("contributor {peer}"), &sdp).await } };
                    setups.push(answer.boxed_local());
                }
                Output::Accept { link, sdp } => match links.get(&link) {
                    Some(channel) => setups.push(channel.accept(&sdp).map(move |result| Setup::Accepted { link, result }).boxed_local()),
                    None => session.link_closed(now_ms(), link, "its connection is gone".into()),
                },
                Output::Close { link } => drop(links.remove(&link)),
                Output::Pass { link, session: id, step, messages } => {
                    let result = pass(links.get_mut(&link), messages).await;
                    session.passed(now_ms(), link, id, step, result);
                }
                Output::SendOn { link, messages } => {
                    if let Err(reason) = pass(links.get_mut(&link), messages).await {
                        session.link_closed(now_ms(), link, format!("sending on it failed: {reason}"));
                    }
                }
                // A tab's policy neither fetches blobs over its channel nor lends them.
                Output::Blob(_) | Output::Fetched { .. } => log("a blob job, which a tab does not take, ignored"),
                Output::Event(event) => shared.emit(event),
                Output::Log(line) => log(&line),
                Output::Restart(reason) => return Ended::Failed(reason),
            }
        }
        if span.is_terminated() && !span_jobs.is_empty() {
            span = worker.clone().span(next_span_jobs(&mut span_jobs, EXACT_BATCH_ROWS)).boxed_local().fuse();
        }
        if leaving {
            channel.close_after_sending().await;
            return Ended::ByRequest;
        }
        let mut timer = match session.poll_timeout() {
            Some(at) => TimeoutFuture::new((at - now_ms()).clamp(0.0, 1e9) as u32).fuse(),
            None => Fuse::terminated(),
        };
        let woke = select! {
            received = channel.recv().fuse() => Woke::Coordinator(received),
            (link, received) = rtc::recv_any(&mut links).fuse() => Woke::Link(link, received),
            setup = setups.select_next_some() => Woke::Setup(setup),
            finished = unit => Woke::Unit(finished),
            done = span => Woke::Span(done),
            _ = timer => Woke::Timer,
            _ = woken.next() => Woke::Budget,
        };
        match woke {
            Woke::Coordinator(received) => match received {
                Received::Text(text) => session.handle(now_ms(), Incoming::Text(&text)),
                Received::Binary(bytes) => session.handle(now_ms(), Incoming::Binary(&bytes)),
                Received::Open => {}
                Received::Closed(reason) => return Ended::Failed(reason),
            },
            Woke::Link(link, received) => match received {
                Received::Open => {
                    if let Some(max_message) = links.get_mut(&link).map(Channel::opened) {
                        session.link_open(now_ms(), link, max_message);
                    }
                }
                Received::Text(text) => session.link_message(now_ms(), link, Incoming::Text(&text)),
                Received::Binary(bytes) => session.link_message(now_ms(), link, Incoming::Binary(&bytes)),
                Received::Closed(reason) => session.link_closed(now_ms(), link, reason),
            },
            Woke::Setup(Setup::Described { link, result }) => {
                let result = result.map(|(channel, sdp)| {
                    links.insert(link, channel);
                    sdp
                });
                session.described(now_ms(), link, result);
            }
            Woke::Setup(Setup::Accepted { link, result: Err(reason) }) => session.link_closed(now_ms(), link, reason),
            Woke::Setup(Setup::Accepted { result: Ok(()), .. }) => {}
            Woke::Unit(finished) => {
                if finished.gpu_lost
                    && let Err(e) = worker.gpu().await
                {
                    return Ended::Failed(format!("the GPU was lost and could not be reopened: {e}"));
                }
                session.finished(now_ms(), finished.unit, finished.busy_ms, finished.result);
            }
            Woke::Span(done) => match done {
                SpanDone::Loaded { shard, blocks, result } => session.span_loaded(now_ms(), shard, blocks, result),
                SpanDone::Forwarded(steps) => {
                    for done in steps {
                        session.forwarded(now_ms(), done.session, done.step, done.busy_ms, done.result);
                    }
                }
                SpanDone::Freed => {}
            },
            Woke::Timer => session.handle_timeout(now_ms()),
            Woke::Budget => session.set_budget(now_ms(), shared.budget.get()),
        }
    }
}

/// What woke a connection's loop.
enum Woke {
    Coordinator(Received),
    Link(u64, Received),
    Setup(Setup),
    Unit(Finished),
    Span(SpanDone),
    Timer,
    /// `woken`: the budget changed, or `pause`/`stop`.
    Budget,
}

/// A direct channel's connection made, with this side's offer or answer, or the peer's answer
/// applied to it.
enum Setup {
    Described { link: u64, result: Result<(Channel, String), String> },
    Accepted { link: u64, result: Result<(), String> },
}

/// Sends a step's output over a direct channel, in order.
async fn pass(channel: Option<&mut Channel>, messages: Vec<Outgoing>) -> Result<(), String> {
    let channel = channel.ok_or("the channel is gone")?;
    for message in messages {
        channel.send(message).await?;
    }
    Ok(())
}
