// End to end in real Chromium: `tessera serve`, two volunteer pages and a page from another site
// that embeds the widget, all on WebGPU (SwiftShader) over WebRTC. The widget asks before
// anything else is fetched; an embeddings job then completes with the results a local run gives,
// every browser's units are in the job's votes, and closing a volunteer tab mid-job does not stop
// it. Screenshots go to target/test-artifacts/e2e (look at them).
//
// Needs a private network namespace (see network.mjs): run it with `cargo run -p xtask -- e2e`,
// or `npm test`, which builds the wasm (www/pkg) and the debug `tessera` first.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { launchChromium } from './chromium.mjs';
import {
  artifactsDir, cosine, embedLocally, hostPageHtml, requirePrivateNetwork, serveHostPage, startCoordinator, waitFor,
} from './network.mjs';

/** Short, so that SwiftShader (a few seconds a sentence) finishes soon; one a unit, so several units. */
const SENTENCES = [
  'The cat sits on the mat.',
  'A feline rests on a rug.',
  'Volunteers lend their graphics cards.',
  'The river flows past the old mill.',
  'Rain is expected tomorrow morning.',
  'She repaired the broken clock.',
];
const MIN_COSINE = 0.999;
const WIDGET_MAX_BYTES = 20 * 1024;
/** Deadlines for what SwiftShader on two shared cores does slowly; never a sleep. */
const JOIN_TIMEOUT = 180_000;
const JOB_TIMEOUT = 900_000;

describe('the browser contributor, end to end', { timeout: 30 * 60_000 }, () => {
  let coordinator, host, browser, shots;
  /** The contributor ids the three browsers joined as: [volunteer A, volunteer B, widget]. */
  let ids;
  const pages = {};
  const console = [];
  const requests = [];

  /** A page in a context of its own (its own storage: each is another volunteer). */
  async function open(name, url, viewport = { width: 1000, height: 900 }) {
    const context = await browser.newContext({ viewport });
    // Playwright's own 30 s for a page to load, a button to show or a click: too little for a
    // busy machine; an event still ends each wait.
    context.setDefaultTimeout(JOIN_TIMEOUT);
    const page = await context.newPage();
    page.on('console', (m) => console.push(`${name} ${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.push(`${name} pageerror: ${e.message}`));
    page.on('request', (r) => requests.push({ page: name, url: r.url() }));
    pages[name] = page;
    await page.goto(url);
    return page;
  }

  const explain = () => `coordinator:\n${coordinator.log.join('').slice(-4000)}\nbrowsers:\n${console.slice(-60).join('\n')}`;
  const volunteerEvents = (name) => pages[name].evaluate(() => window.tesseraVolunteer.events);
  const widgetEvents = () => pages.host.evaluate(() => window.seen);
  const getJson = async (path) => {
    const response = await fetch(`${coordinator.url}${path}`);
    assert.equal(response.status, 200, `GET ${path}`);
    return response.json();
  };

  before(async () => {
    requirePrivateNetwork();
    shots = artifactsDir('e2e');
    coordinator = await startCoordinator({ unitInputs: 1, replicas: 2 });
    host = await serveHostPage(hostPageHtml(coordinator.url));
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await host?.close();
    await coordinator?.close();
  });

  test('the coordinator serves the pages, the widget and the wasm with their types', async () => {
    const rows = [
      ['/', 'text/html; charset=utf-8'],
      ['/embed', 'text/html; charset=utf-8'],
      ['/widget.js', 'text/javascript; charset=utf-8'],
      ['/volunteer.js', 'text/javascript; charset=utf-8'],
      ['/tessera.css', 'text/css; charset=utf-8'],
      ['/pkg/tessera_web.js', 'text/javascript; charset=utf-8'],
      ['/pkg/tessera_web_bg.wasm', 'application/wasm'],
    ];
    for (const [path, type] of rows) {
      const response = await fetch(`${coordinator.url}${path}`);
      assert.equal(response.status, 200, path);
      assert.equal(response.headers.get('content-type'), type, path);
      if (path === '/widget.js') {
        const size = (await response.arrayBuffer()).byteLength;
        assert.ok(size <= WIDGET_MAX_BYTES, `widget.js is ${size} bytes, over ${WIDGET_MAX_BYTES}`);
        assert.equal(response.headers.get('cross-origin-resource-policy'), 'cross-origin');
      }
    }
    for (const path of ['/../Cargo.toml', '/%2e%2e/Cargo.toml', '/pkg/../../Cargo.toml', '/.git/HEAD']) {
      const response = await fetch(`${coordinator.url}${path}`);
      assert.equal(response.status, 404, `${path} must not be served`);
    }
  });

  test('the widget on another site fetches nothing but itself before consent', async () => {
    const page = await open('host', host.url);
    await page.evaluate(() => {
      window.seen = [];
      for (const type of ['consent', 'started', 'unit', 'verdict', 'paused', 'resumed', 'stopped', 'error']) {
        window.addEventListener(`tessera:${type}`, (e) => window.seen.push({ type, detail: e.detail }));
      }
    });
    await page.getByRole('button', { name: 'Contribute my GPU' }).waitFor();
    await page.waitForLoadState('networkidle');
    const fetched = requests.filter((r) => r.page === 'host' && r.url.startsWith(coordinator.url)).map((r) => new URL(r.url).pathname);
    assert.deepEqual(fetched, ['/widget.js'], 'before consent the widget may fetch itself only');
    await page.screenshot({ path: join(shots, 'widget-before-consent.png') });
  });

  test('without WebGPU, the page and the widget say so and offer no button', async () => {
    const context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
    context.setDefaultTimeout(JOIN_TIMEOUT);
    await context.addInitScript(() => {
      delete Navigator.prototype.gpu;
    });
    try {
      const page = await context.newPage();
      await page.goto(`${coordinator.url}/`);
      await page.getByText('This browser does not offer WebGPU').waitFor();
      assert.equal(await page.getByRole('button', { name: 'Start contributing' }).isVisible(), false);
      await page.screenshot({ path: join(shots, 'volunteer-no-webgpu.png') });
      await page.goto(host.url);
      await page.getByText('This browser cannot contribute').waitFor();
      assert.equal(await page.getByRole('button', { name: 'Contribute my GPU' }).isVisible(), false);
      assert.equal(await page.evaluate(() => window.tessera.state), 'unsupported');
    } finally {
      await context.close();
    }
  });

  test('two volunteer pages and the widget join the network', async () => {
    for (const name of ['volunteerA', 'volunteerB']) {
      const page = await open(name, `${coordinator.url}/`);
      const start = page.getByRole('button', { name: 'Start contributing' });
      await start.waitFor();
      if (name === 'volunteerA') {
        await page.screenshot({ path: join(shots, 'volunteer-before-start.png'), fullPage: true });
        await start.click();
      } else {
        // By keyboard: the first Tab reaches Start, Enter presses it.
        await page.keyboard.press('Tab');
        assert.equal(await page.evaluate(() => document.activeElement?.id), 'start');
        await page.keyboard.press('Enter');
      }
    }
    await pages.host.getByRole('button', { name: 'Contribute my GPU' }).click();
    for (const name of ['volunteerA', 'volunteerB']) {
      await waitFor(`${name} to join`, async () => {
        const { events, status } = await pages[name].evaluate(() => ({ events: window.tesseraVolunteer.events, status: window.tesseraVolunteer.status }));
        if (status === 'error' && !events.some((e) => e.type === 'joined')) {
          throw new Error(`${name} failed to start: ${(await pages[name].locator('#status-text').textContent()).trim()}\n${explain()}`);
        }
        return events.some((e) => e.type === 'joined');
      }, { timeoutMs: JOIN_TIMEOUT, explain });
    }
    await waitFor('the widget to start', async () => {
      const events = await widgetEvents();
      const error = events.find((e) => e.type === 'error');
      if (error && !events.some((e) => e.type === 'started')) {
        throw new Error(`the widget failed to start: ${error.detail.message}\n${explain()}`);
      }
      return events.some((e) => e.type === 'started');
    }, { timeoutMs: JOIN_TIMEOUT, explain });
    const listed = (await getJson('/api/contributors')).contributors.map((c) => c.id);
    const joined = async (name) => (await volunteerEvents(name)).find((e) => e.type === 'joined').contributor;
    ids = [await joined('volunteerA'), await joined('volunteerB'), (await widgetEvents()).find((e) => e.type === 'started').detail.contributor];
    assert.equal(new Set(ids).size, 3, `three contributors: ${ids}`);
    for (const id of ids) {
      assert.ok(listed.includes(id), `contributor ${id} is not in /api/contributors (${listed})`);
    }
    await pages.host.screenshot({ path: join(shots, 'widget-after-consent.png') });
  });

  test('an embeddings job matches the local run, counts every browser, and survives a closed tab', { timeout: JOB_TIMEOUT + 120_000 }, async () => {
    const [a, b, widget] = ids;
    const expected = await embedLocally(SENTENCES);
    const posted = fetch(`${coordinator.url}/v1/embeddings`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'minilm', input: SENTENCES }),
      signal: AbortSignal.timeout(JOB_TIMEOUT),
    });
    // Volunteer B leaves once the network has accepted one of its results, while units remain.
    const accepted = await waitFor('an accepted unit from volunteer B', async () => {
      const events = await volunteerEvents('volunteerB');
      const verdict = events.find((e) => e.type === 'verdict' && e.accepted);
      return verdict && events.find((e) => e.type === 'unit' && e.unit === verdict.unit);
    }, { timeoutMs: JOB_TIMEOUT, explain });
    const job = accepted.job;
    const before = await getJson(`/api/jobs/${job}`);
    assert.equal(before.state, 'running', `the job finished before a tab could be closed mid-job: ${JSON.stringify(before)}`);
    assert.ok(before.units_done < before.units_total, JSON.stringify(before));
    await pages.volunteerA.screenshot({ path: join(shots, 'volunteer-working.png'), fullPage: true });
    await pages.volunteerB.context().close();

    const response = await posted;
    const body = await response.json();
    assert.equal(response.status, 200, `${JSON.stringify(body)}\n${explain()}`);
    assert.equal(response.headers.get('x-tessera-job'), String(job));
    const got = body.data.map((d) => d.embedding);
    assert.equal(got.length, SENTENCES.length);
    got.forEach((vector, i) => {
      const c = cosine(vector, expected[i]);
      assert.ok(c >= MIN_COSINE, `input ${i} has cosine ${c} against tessera embed`);
    });

    const done = await getJson(`/api/jobs/${job}`);
    assert.equal(done.state, 'done');
    const voters = new Set(done.units.flatMap((u) => u.accepted_from));
    for (const [who, id] of [['volunteer A', a], ['volunteer B (closed mid-job)', b], ['the widget', widget]]) {
      assert.ok(voters.has(id), `${who} (contributor ${id}) has no accepted unit in job ${job}: ${JSON.stringify(done.units)}`);
    }
    await waitFor('volunteer A to show its accepted units', () => pages.volunteerA.evaluate(() => Number(document.getElementById('units-accepted').textContent) > 0));
    await pages.volunteerA.screenshot({ path: join(shots, 'volunteer-after-job.png'), fullPage: true });
    await pages.volunteerA.setViewportSize({ width: 375, height: 800 });
    assert.ok(await pages.volunteerA.evaluate(() => document.documentElement.scrollWidth <= 375), 'the page scrolls sideways at 375 px');
    await pages.volunteerA.screenshot({ path: join(shots, 'volunteer-375px.png'), fullPage: true });
    await pages.host.screenshot({ path: join(shots, 'widget-working.png') });
  });

  test('the widget pauses while its tab is hidden and resumes when it is shown', async () => {
    // Headless tabs never hide, so the frame is told it is hidden the way the browser would.
    const frame = pages.host.frames().find((f) => f.url().startsWith(`${coordinator.url}/embed`));
    assert.ok(frame, 'the widget frame is there');
    const setVisibility = (state) => frame.evaluate((s) => {
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => s });
      document.dispatchEvent(new Event('visibilitychange'));
    }, state);
    const [, , widget] = ids;
    const count = async (type) => (await widgetEvents()).filter((e) => e.type === type).length;
    const started = await count('started');
    await setVisibility('hidden');
    await waitFor('the widget to pause', async () => (await widgetEvents()).some((e) => e.type === 'paused' && e.detail.reason === 'hidden'), { explain });
    await waitFor('the paused widget to leave the network', async () => !(await getJson('/api/contributors')).contributors.some((c) => c.id === widget), { timeoutMs: JOIN_TIMEOUT, explain });
    await setVisibility('visible');
    await waitFor('the widget to join again', async () => (await count('started')) > started, { timeoutMs: JOIN_TIMEOUT, explain });
    ids[2] = (await widgetEvents()).filter((e) => e.type === 'started').at(-1).detail.contributor;
  });

  test('withdrawing consent in the widget stops work and removes the frame', async () => {
    const page = pages.host;
    const [, , widget] = ids;
    await page.getByRole('button', { name: 'Stop contributing' }).click();
    assert.equal(await page.locator('tessera-widget').evaluate((el) => el.shadowRoot.querySelector('iframe')), null);
    assert.equal(await page.evaluate(() => window.tessera.state), 'stopped');
    assert.equal(await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('tessera.consent')).length), 0);
    assert.ok((await widgetEvents()).some((e) => e.type === 'stopped'));
    await waitFor('the widget to leave the network', async () => !(await getJson('/api/contributors')).contributors.some((c) => c.id === widget), { timeoutMs: JOIN_TIMEOUT, explain });
    await page.getByRole('button', { name: 'Contribute my GPU' }).waitFor();
  });

  test('no page fetched anything outside this machine\'s two test origins', () => {
    const allowed = new Set([new URL(coordinator.url).origin, new URL(host.url).origin]);
    const outside = requests.filter((r) => !r.url.startsWith('data:') && !allowed.has(new URL(r.url).origin));
    assert.deepEqual(outside, []);
  });
});
