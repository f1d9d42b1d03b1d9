// The page widget.js frames once a visitor has consented: it runs the contributor and shows one
// line of status. It talks to the host page only by postMessage, both ways checked against the
// host's origin: the one the widget put in `?host=`, which must also be the frame's parent's
// origin where the browser says so (location.ancestorOrigins). Any other message is ignored.
//
// To the host: {tessera: 1, type, detail} with type started | unit | verdict | paused | resumed |
// error | status. From the host: {tessera: 1, type: "pause" | "resume" | "stop"}.
// Work pauses while the tab is hidden and resumes when it is shown again (unless the host paused it).
import { STATUS_TEXT, startContributor, readStats } from './common.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

/** The host page's origin, or null when this page is not framed by the widget as it should be. */
function hostOrigin() {
  if (window.parent === window) {
    return null;
  }
  let host;
  try {
    host = new URL(params.get('host') ?? '').origin;
  } catch {
    return null;
  }
  const ancestors = location.ancestorOrigins;
  if (ancestors && ancestors.length > 0 && ancestors[0] !== host) {
    return null;
  }
  return host;
}

const host = hostOrigin();
let contributor = null;
let pausedByHost = false;
let hidden = document.visibilityState === 'hidden';
let stopped = false;

function show(status, detail) {
  $('status').dataset.status = status;
  $('status-text').textContent = detail ? `${STATUS_TEXT[status] ?? status} ${detail}` : (STATUS_TEXT[status] ?? status);
}

function tell(type, detail = {}) {
  window.parent.postMessage({ tessera: 1, type, detail }, host);
}

function showCount() {
  const stats = contributor && readStats(contributor);
  if (stats) {
    $('count').textContent = `${stats.unitsDone} done · ${stats.unitsAccepted} accepted`;
  }
}

/** Pauses or resumes to match the tab's visibility and the host's wish. */
function apply() {
  if (!contributor || stopped) {
    return;
  }
  if (hidden || pausedByHost) {
    contributor.pause();
    tell('paused', { reason: pausedByHost ? 'host' : 'hidden' });
  } else {
    contributor.resume();
    tell('resumed');
  }
}

function onEvent(event) {
  switch (event.type) {
    case 'status':
      show(event.status, event.status === 'error' ? event.detail : '');
      tell('status', { status: event.status, detail: event.detail });
      if (event.status === 'error') {
        tell('error', { message: event.detail });
      }
      break;
    case 'joined': {
      let adapter = null;
      try {
        adapter = JSON.parse(contributor?.adapter() ?? 'null');
      } catch {
        adapter = null;
      }
      tell('started', { contributor: event.contributor, adapter });
      break;
    }
    case 'unit':
      tell('unit', { unit: event.unit, job: event.job, inputs: event.inputs, ms: event.ms });
      break;
    case 'verdict':
      tell('verdict', { unit: event.unit, accepted: event.accepted });
      break;
    default:
      break;
  }
  showCount();
}

function stop() {
  stopped = true;
  contributor?.stop();
  show('paused', 'Stopped.');
}

async function main() {
  if (host === null) {
    show('error', 'This page runs inside the Tessera widget on other sites. To contribute from here, open the volunteer page.');
    return;
  }
  window.addEventListener('message', (event) => {
    if (event.source !== window.parent || event.origin !== host || event.data?.tessera !== 1) {
      return;
    }
    if (event.data.type === 'pause' || event.data.type === 'resume') {
      pausedByHost = event.data.type === 'pause';
      apply();
    } else if (event.data.type === 'stop') {
      stop();
    }
  });
  document.addEventListener('visibilitychange', () => {
    hidden = document.visibilityState === 'hidden';
    apply();
  });
  const budget = Number(params.get('budget') ?? '1');
  show('loading');
  try {
    contributor = await startContributor({ budget: budget > 0 && budget <= 1 ? budget : 1 }, onEvent);
  } catch (error) {
    show('error', error.message);
    tell('error', { message: error.message });
    return;
  }
  if (stopped) {
    contributor.stop();
    return;
  }
  if (hidden) {
    apply();
  }
  // The frame removed or the tab closed: leave at once rather than after the heartbeat timeout.
  window.addEventListener('pagehide', () => contributor?.stop());
  setInterval(showCount, 2000);
}

main();
