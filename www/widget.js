/*
 * Tessera widget: invites a site's visitors to lend their GPU to Tessera.
 *
 * Add one tag where the card should appear (or anywhere, with data-target):
 *
 *   <script src="https://COORDINATOR/widget.js" async></script>
 *
 * Optional attributes:
 *   data-coordinator="https://COORDINATOR"  the coordinator (default: this script's own origin)
 *   data-target="#some-element"             a CSS selector: the card goes inside that element
 *                                           (default: right after this script tag, or at the end of <body>)
 *   data-budget="0.5"                       the share of time the visitor's GPU works (0.1 to 1, default 1)
 *
 * What it does: it renders a small consent card in a shadow root (the site's CSS cannot reach
 * it). Until the visitor clicks "Contribute my GPU", nothing else is downloaded and nothing
 * runs. On consent, it frames `COORDINATOR/embed`, which downloads the model (about 90 MB, once)
 * and computes there, pausing while the tab is hidden. Consent is remembered in this site's
 * localStorage for 24 hours, then asked again; "Stop" in the card withdraws it at once (the
 * frame is removed). The frame and this page talk only by postMessage, each checking the
 * other's origin. Browsers without WebGPU see a short note and no button.
 *
 * For the host page: `window.tessera` (the last widget on the page, if there are several):
 *
 *   const off = tessera.on('unit', (detail) => console.log(detail));  // off() unsubscribes
 *   tessera.state        // 'unsupported' | 'asking' | 'starting' | 'running' | 'paused' | 'stopped' | 'error'
 *   tessera.pause(); tessera.resume(); tessera.withdraw();
 *
 * Every event is also dispatched on `window` as a CustomEvent named `tessera:<type>` (listen
 * before the script has loaded: `addEventListener('tessera:started', (e) => e.detail)`).
 *   consent  {}                                    the visitor agreed (or had within 24 h)
 *   started  {contributor, adapter}                joined the network: contributor id, GPU adapter
 *   unit     {unit, job, inputs, ms}               a unit of work computed and sent
 *   verdict  {unit, accepted}                      the network accepted or rejected that result
 *   paused   {reason: 'hidden' | 'host'}           work paused (tab hidden, or tessera.pause())
 *   resumed  {}
 *   stopped  {}                                    the visitor withdrew consent (or tessera.withdraw())
 *   error    {message}
 */
(() => {
  const script = document.currentScript;
  const DAY_MS = 24 * 60 * 60 * 1000;
  let coordinator;
  try {
    coordinator = new URL(script?.dataset.coordinator || script?.src || '').origin;
  } catch {
    console.error('tessera widget: no coordinator (set data-coordinator on the script tag)');
    return;
  }
  const consentKey = `tessera.consent:${coordinator}`;
  const budget = Math.min(1, Math.max(0.1, Number(script?.dataset.budget) || 1));
  const listeners = {};
  let state = 'asking';
  let frame = null;

  function emit(type, detail = {}) {
    for (const fn of listeners[type] ?? []) {
      try {
        fn(detail);
      } catch (error) {
        console.error('tessera widget: a listener failed', error);
      }
    }
    window.dispatchEvent(new CustomEvent(`tessera:${type}`, { detail }));
  }

  const storage = {
    consented() {
      try {
        return Number(localStorage.getItem(consentKey)) > Date.now();
      } catch {
        return false;
      }
    },
    set(until) {
      try {
        if (until) {
          localStorage.setItem(consentKey, String(until));
        } else {
          localStorage.removeItem(consentKey);
        }
      } catch {
        // Storage is off: consent lasts as long as this page.
      }
    },
  };

  const STYLE = `
    :host { all: initial; display: block; margin: 1rem 0; }
    .card { box-sizing: border-box; max-width: 26rem; padding: 14px 16px; border: 1px solid #d0d7de; border-radius: 12px;
      background: #fff; color: #1b1f24; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
      box-shadow: 0 1px 3px rgba(0,0,0,.08); text-align: left; letter-spacing: normal; word-spacing: normal;
      text-transform: none; text-indent: 0; text-shadow: none; white-space: normal; visibility: visible; direction: ltr; }
    .title { display: flex; align-items: center; gap: 8px; font-weight: 700; font-size: 15px; margin: 0 0 6px; }
    .logo { width: 18px; height: 18px; border-radius: 4px; background: linear-gradient(135deg, #0b5fcf 50%, #59a6ff 50%); flex: none; }
    p { margin: 0 0 10px; }
    .fine { color: #57606a; font-size: 12.5px; }
    .row { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
    button { font: inherit; font-weight: 600; min-height: 36px; padding: 6px 14px; border-radius: 8px; cursor: pointer;
      border: 1px solid #d0d7de; background: #fff; color: #1b1f24; }
    button.primary { background: #0b5fcf; border-color: #0b5fcf; color: #fff; }
    button:focus-visible, a:focus-visible { outline: 3px solid #ff9f1c; outline-offset: 2px; }
    a { color: #0b5fcf; }
    iframe { display: block; width: 100%; height: 34px; border: 0; margin: 0 0 8px; color-scheme: light; }
    [hidden] { display: none !important; }
  `;

  // A name of our own, so the site's `div { … }` rules miss it; the card itself sits in a shadow root.
  const element = document.createElement('tessera-widget');
  const root = element.attachShadow({ mode: 'open' });
  root.innerHTML = `<style>${STYLE}</style>
    <section class="card" aria-label="Tessera: lend your GPU">
      <p class="title"><span class="logo" aria-hidden="true"></span><span data-part="title">Lend your GPU to Tessera?</span></p>
      <div data-part="ask">
        <p data-part="invite"></p>
        <p class="fine">Nothing is downloaded and nothing runs until you agree. Work pauses while this tab is hidden;
          you can stop at any time. We ask again after 24 hours.</p>
        <div class="row">
          <button type="button" class="primary" data-part="yes">Contribute my GPU</button>
          <button type="button" data-part="no">Not now</button>
          <a data-part="about" target="_blank" rel="noopener">What is Tessera?</a>
        </div>
      </div>
      <div data-part="run" hidden>
        <div data-part="slot"></div>
        <div class="row">
          <button type="button" data-part="stop">Stop contributing</button>
          <span class="fine">Thank you! It pauses while this tab is hidden.</span>
        </div>
      </div>
      <p data-part="unsupported" hidden>This browser cannot contribute: it has no WebGPU. Thank you for looking!</p>
    </section>`;
  const part = (name) => root.querySelector(`[data-part="${name}"]`);
  const site = location.hostname || 'This site';
  part('invite').textContent = `${site} invites you to lend your graphics card to Tessera, a volunteer network that runs AI models for anyone. If you agree, this tab downloads a small model once (about 90 MB) and computes with it (its results are checked against other volunteers'); it may also pass conversations through a few layers of a chat model (it handles the model's intermediate numbers, not text, and connects directly to the volunteers before and after it, which shows them your network address).`;
  part('about').href = `${coordinator}/`;

  function show(which) {
    part('title').textContent = which === 'run' ? 'Contributing to Tessera' : 'Lend your GPU to Tessera?';
    part('ask').hidden = which !== 'ask';
    part('run').hidden = which !== 'run';
    part('unsupported').hidden = which !== 'unsupported';
  }

  function send(type) {
    frame?.contentWindow?.postMessage({ tessera: 1, type }, coordinator);
  }

  function onMessage(event) {
    if (!frame || event.source !== frame.contentWindow || event.origin !== coordinator || event.data?.tessera !== 1) {
      return;
    }
    const { type, detail } = event.data;
    if (type === 'started' || type === 'resumed') {
      state = 'running';
    } else if (type === 'paused') {
      state = 'paused';
    } else if (type === 'error') {
      state = 'error';
    }
    if (type !== 'status') {
      emit(type, detail ?? {});
    }
  }

  function start() {
    state = 'starting';
    show('run');
    frame = document.createElement('iframe');
    frame.title = 'Tessera contributor status';
    // No `allow`: Chromium has no "webgpu" permissions-policy feature (it warns "Unrecognized
    // feature") and gives cross-origin frames WebGPU as it is.
    frame.referrerPolicy = 'no-referrer';
    frame.setAttribute('sandbox', 'allow-scripts allow-same-origin');
    frame.src = `${coordinator}/embed?host=${encodeURIComponent(location.origin)}&budget=${budget}`;
    part('slot').append(frame);
    emit('consent');
  }

  function withdraw() {
    storage.set(0);
    if (frame) {
      send('stop');
      frame.remove();
      frame = null;
    }
    state = 'stopped';
    show('ask');
    emit('stopped');
  }

  part('yes').addEventListener('click', () => {
    storage.set(Date.now() + DAY_MS);
    start();
    part('stop').focus();
  });
  part('no').addEventListener('click', () => {
    element.remove();
  });
  part('stop').addEventListener('click', () => {
    withdraw();
    part('yes').focus();
  });
  window.addEventListener('message', onMessage);

  window.tessera = {
    on(type, fn) {
      (listeners[type] ??= []).push(fn);
      return () => {
        listeners[type] = listeners[type].filter((f) => f !== fn);
      };
    },
    get state() {
      return state;
    },
    pause: () => send('pause'),
    resume: () => send('resume'),
    withdraw,
  };

  function place() {
    const target = script?.dataset.target && document.querySelector(script.dataset.target);
    if (target) {
      target.append(element);
    } else if (script?.parentNode && document.body?.contains(script)) {
      script.after(element);
    } else {
      document.body.append(element);
    }
    if (!window.isSecureContext || !('gpu' in navigator)) {
      state = 'unsupported';
      show('unsupported');
    } else if (storage.consented()) {
      start();
    } else {
      show('ask');
    }
  }

  if (document.body) {
    place();
  } else {
    document.addEventListener('DOMContentLoaded', place, { once: true });
  }
})();
