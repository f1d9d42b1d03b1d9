// The volunteer page: shows the GPU WebGPU offers, starts the contributor when the volunteer
// presses Start (never on load: it downloads ~90 MB and keeps the GPU busy), then shows its
// status and counters, with pause/resume and the share of time busy. The budget is remembered
// in localStorage. `?memory=MiB` caps the GPU memory the coordinator may use here (it decides
// how many blocks of a language model this tab holds). Tests and the benchmark read
// window.tesseraVolunteer: the contributor's events, each with `at` (ms since the page's
// navigation began), and a `start` for the click.
import { STATUS_TEXT, describeAdapter, formatBytes, missingWebGpu, readStats, startContributor } from './common.js';

const $ = (id) => document.getElementById(id);
const BUDGET_KEY = 'tessera.budget';
const LOG_LINES = 12;

const state = { contributor: null, events: [], status: 'off', paused: false, inputs: 0, adapter: null };
window.tesseraVolunteer = state;

function setStatus(status, detail) {
  state.status = status;
  const text = STATUS_TEXT[status] ?? status;
  $('status').dataset.status = status;
  $('status-text').textContent = detail ? `${text} ${detail}` : text;
}

function log(text, className) {
  const list = $('log');
  list.querySelector('.empty')?.remove();
  const item = document.createElement('li');
  item.textContent = `${new Date().toLocaleTimeString()} — ${text}`;
  if (className) {
    item.className = className;
  }
  list.prepend(item);
  while (list.children.length > LOG_LINES) {
    list.lastElementChild.remove();
  }
}

function showStats() {
  const stats = state.contributor && readStats(state.contributor);
  if (!stats) {
    return;
  }
  $('units-done').textContent = String(stats.unitsDone);
  $('units-accepted').textContent = stats.unitsRejected > 0 ? `${stats.unitsAccepted} (${stats.unitsRejected} rejected)` : String(stats.unitsAccepted);
  $('downloaded').textContent = formatBytes(stats.bytesDownloaded) + (stats.cacheHits > 0 ? ' (cached)' : '');
  $('throughput').textContent = stats.busyMs > 0 && state.inputs > 0 ? (state.inputs / (stats.busyMs / 60000)).toFixed(1) : '–';
  $('spans').textContent = stats.spans.map((s) => `${s.start}–${s.end}`).join(', ') || '–';
  $('steps').textContent = String(stats.stepsForwarded);
  $('links').textContent = String(stats.links);
}

function onEvent(event) {
  state.events.push({ ...event, at: performance.now() });
  switch (event.type) {
    case 'status':
      setStatus(event.status, event.detail);
      break;
    case 'joined':
      log(`Joined the network as contributor ${event.contributor}.`);
      break;
    case 'download':
      log(event.cached ? `Found a model file in this browser's cache: ${formatBytes(event.bytes)} (${short(event.cid)}).` : `Downloaded a model file: ${formatBytes(event.bytes)} (${short(event.cid)}).`);
      break;
    case 'unit':
      state.inputs += event.inputs;
      log(`Unit ${event.unit} of job ${event.job}: ${event.inputs} sentence${event.inputs === 1 ? '' : 's'} in ${(event.ms / 1000).toFixed(1)} s.`);
      break;
    case 'spanLoaded':
      log(`Holding blocks ${event.start}–${event.end} of a language model: conversations now pass through this tab.`);
      break;
    case 'spanDropped':
      log('A span of a language model was handed back.');
      break;
    case 'verdict':
      log(`Unit ${event.unit} ${event.accepted ? 'accepted: another volunteer agreed' : 'rejected: it disagreed with other volunteers'}.`, event.accepted ? 'accepted' : 'rejected');
      break;
    default:
      break;
  }
  showStats();
}

const short = (cid) => (cid && cid.length > 16 ? `${cid.slice(0, 10)}…${cid.slice(-4)}` : cid);

function budget() {
  return Number($('budget').value) / 100;
}

/** The options for the contributor: the budget, and `?memory=MiB` when the address has it. */
function options() {
  const memory = new URLSearchParams(location.search).get('memory');
  return memory === null ? { budget: budget() } : { budget: budget(), memoryMib: Number(memory) };
}

async function start() {
  const button = $('start');
  button.disabled = true;
  state.events.push({ type: 'start', at: performance.now() });
  setStatus('loading');
  try {
    state.contributor = await startContributor(options(), onEvent);
  } catch (error) {
    setStatus('error', error.message);
    button.disabled = false;
    button.textContent = 'Try again';
    return;
  }
  button.hidden = true;
  const pause = $('pause');
  pause.hidden = false;
  pause.focus();
  try {
    const adapter = JSON.parse(state.contributor.adapter());
    // Browsers often withhold the adapter's name from wgpu; the page's own description has it.
    const name = adapter.name || state.adapter;
    const software = adapter.device_type === 'Cpu' ? ' It is a software GPU (your processor does the work), so it is slow.' : '';
    $('adapter').textContent = `Contributing with ${name}.${software}`;
  } catch {
    // The line from before start stays.
  }
  setInterval(showStats, 1000);
  // Closing the tab: leave at once rather than after the coordinator's heartbeat timeout.
  window.addEventListener('pagehide', () => state.contributor?.stop());
}

function togglePause() {
  const contributor = state.contributor;
  if (!contributor) {
    return;
  }
  state.paused = !state.paused;
  if (state.paused) {
    contributor.pause();
  } else {
    contributor.resume();
  }
  $('pause').textContent = state.paused ? 'Resume' : 'Pause';
}

function setUpBudget() {
  const input = $('budget');
  const saved = Number(localStorage.getItem(BUDGET_KEY));
  if (saved >= 10 && saved <= 100) {
    input.value = String(saved);
  }
  const show = () => {
    $('budget-value').textContent = `${input.value}%`;
    input.setAttribute('aria-valuetext', `${input.value} percent of the time`);
  };
  show();
  input.addEventListener('input', show);
  input.addEventListener('change', () => {
    localStorage.setItem(BUDGET_KEY, input.value);
    state.contributor?.setBudget(budget());
  });
}

/** No WebGPU: a plain statement, and no controls. */
function unsupported(detail) {
  $('adapter').classList.add('unsupported');
  for (const part of [document.querySelector('.budget'), document.querySelector('.controls'), $('activity')]) {
    part.hidden = true;
  }
  setStatus('unsupported', detail);
}

async function main() {
  setUpBudget();
  $('start').addEventListener('click', start);
  $('pause').addEventListener('click', togglePause);
  const missing = missingWebGpu();
  const adapterLine = $('adapter');
  if (missing) {
    adapterLine.textContent = missing;
    unsupported('No WebGPU in this browser.');
    return;
  }
  let found = null;
  try {
    found = await describeAdapter();
  } catch (error) {
    found = null;
    console.warn('tessera: requestAdapter failed', error);
  }
  if (found === null) {
    adapterLine.textContent = 'This browser has WebGPU but found no GPU adapter to use (it may be switched off, or blocked for this graphics driver), so it cannot contribute.';
    unsupported('No GPU adapter.');
    return;
  }
  state.adapter = found;
  adapterLine.textContent = `Found: ${found}.`;
  $('start').hidden = false;
}

main();
