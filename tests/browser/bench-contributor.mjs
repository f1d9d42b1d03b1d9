// The browser contributor's benchmark (`cargo run -p xtask -- bench-web`, part of `npm run bench`):
// - the time from opening the volunteer page to its first accepted unit, with the model not in
//   the browser's cache (a fresh profile) and then cached (the same profile, a new page);
// - the wasm module's size, raw and gzip;
// - what the widget downloads before consent, and what the volunteer page downloads before Start.
// The coordinator is the release `tessera serve` with one replica per unit, so that a unit is
// accepted on the page's own result: the figure is the page's path (wasm, WebGPU, signalling,
// model, one unit), not a second contributor's. Runs in a private network namespace like the
// end-to-end test. Prints the figures and writes them to target/test-artifacts/bench/contributor.json.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { chromium } from 'playwright-core';
import { WEBGPU_FLAGS } from './chromium.mjs';
import { WWW, artifactsDir, hostPageHtml, requirePrivateNetwork, serveHostPage, startCoordinator, waitFor } from './network.mjs';

const SENTENCE = 'The cat sits on the mat.';
const TIMEOUT_MS = Number(process.env.TESSERA_BENCH_TIMEOUT_MS ?? 600_000);

function size(path) {
  const bytes = readFileSync(path);
  return { raw: bytes.length, gzip: gzipSync(bytes, { level: 9 }).length };
}

/** Bytes of every response from `origin` a page received so far (bodies, as sent). */
function recordBytes(page, origin) {
  const seen = [];
  page.on('response', async (response) => {
    if (!response.url().startsWith(origin)) {
      return;
    }
    const entry = { path: new URL(response.url()).pathname, bytes: 0 };
    seen.push(entry);
    try {
      entry.bytes = (await response.body()).length;
    } catch {
      entry.bytes = 0; // A redirect or an aborted body.
    }
  });
  return seen;
}

/**
 * Opens the volunteer page and presses Start at once; submits a one-sentence job as soon as the
 * page has joined (the coordinator refuses jobs while no contributor is connected). Resolves to
 * milestones in ms since the page's navigation began.
 */
async function timeToFirstAccepted(context, { url: coordinator, log: serveLog }) {
  const page = await context.newPage();
  const log = [];
  let opened = Date.now();
  let connected = null;
  page.on('console', (m) => {
    log.push(`${m.type()}: ${m.text()}`);
    // The contributor logs when its DataChannel opens (before it says hello).
    if (connected === null && m.text().includes('tessera: connected')) {
      connected = Date.now() - opened;
    }
  });
  const events = () => page.evaluate(() => window.tesseraVolunteer.events);
  const explain = async () => `events: ${JSON.stringify(await events())}\npage: ${log.join('\n')}\ncoordinator: ${serveLog.join('').slice(-3000)}`;
  const failIfError = (seen) => {
    if (seen.some((e) => e.type === 'status' && e.status === 'error')) {
      throw new Error(`the page reported an error: ${JSON.stringify(seen.filter((e) => e.type === 'status'))}\n${log.join('\n')}`);
    }
  };
  opened = Date.now();
  await page.goto(`${coordinator}/`);
  await page.getByRole('button', { name: 'Start contributing' }).click();
  await waitFor('the page to join', async () => {
    const seen = await events();
    failIfError(seen);
    return seen.some((e) => e.type === 'joined');
  }, { timeoutMs: TIMEOUT_MS, intervalMs: 50, explain });
  let refused = null;
  const job = fetch(`${coordinator}/v1/embeddings`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'minilm', input: [SENTENCE] }),
    signal: AbortSignal.timeout(TIMEOUT_MS),
  }).then(async (response) => {
    if (response.status !== 200) {
      refused = `the job failed: ${response.status} ${await response.text()}`;
    }
  });
  const seen = await waitFor('an accepted unit', async () => {
    if (refused) {
      throw new Error(refused);
    }
    const all = await events();
    failIfError(all);
    return all.some((e) => e.type === 'verdict' && e.accepted) && all;
  }, { timeoutMs: TIMEOUT_MS, explain });
  const at = (test) => seen.find(test)?.at ?? null;
  const model = seen.filter((e) => e.type === 'download').sort((a, b) => b.bytes - a.bytes)[0];
  const milestones = {
    clicked: at((e) => e.type === 'start'),
    connecting: at((e) => e.type === 'status' && e.status === 'connecting'),
    channelOpen: connected,
    joined: at((e) => e.type === 'joined'),
    model: model?.at ?? null,
    modelBytes: model?.bytes ?? null,
    modelCached: model?.cached ?? null,
    unit: at((e) => e.type === 'unit'),
    unitMs: seen.find((e) => e.type === 'unit')?.ms ?? null,
    accepted: at((e) => e.type === 'verdict' && e.accepted),
  };
  await job;
  if (refused) {
    throw new Error(refused);
  }
  // The next run must find the network empty, or its unit could go to this page's ghost first.
  const closed = Date.now();
  await page.close();
  await waitFor('the closed page to leave the network', async () => {
    const response = await fetch(`${coordinator}/api/contributors`);
    return (await response.json()).contributors.length === 0;
  }, { timeoutMs: 60_000, intervalMs: 100, explain });
  milestones.leftAfterClose = Date.now() - closed;
  return milestones;
}

async function main() {
  requirePrivateNetwork();
  const figures = { wasm: size(join(WWW, 'pkg', 'tessera_web_bg.wasm')), glue: size(join(WWW, 'pkg', 'tessera_web.js')), widgetFile: size(join(WWW, 'widget.js')) };
  const coordinator = await startCoordinator({ unitInputs: 1, replicas: 1, profile: 'release' });
  const host = await serveHostPage(hostPageHtml(coordinator.url));
  const profile = mkdtempSync(join(tmpdir(), 'tessera-bench-profile-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: WEBGPU_FLAGS, viewport: { width: 1000, height: 900 },
  });
  try {
    // What the widget costs a site's visitor who has not (yet) agreed.
    const hostPage = await context.newPage();
    const widgetBytes = recordBytes(hostPage, coordinator.url);
    await hostPage.goto(host.url);
    await hostPage.getByRole('button', { name: 'Contribute my GPU' }).waitFor();
    await hostPage.waitForLoadState('networkidle');
    figures.widgetBeforeConsent = { requests: widgetBytes.map((r) => r.path), bytes: widgetBytes.reduce((n, r) => n + r.bytes, 0) };
    await hostPage.close();

    // What the volunteer page costs before Start.
    const pagePage = await context.newPage();
    const pageBytes = recordBytes(pagePage, coordinator.url);
    await pagePage.goto(`${coordinator.url}/`);
    await pagePage.getByRole('button', { name: 'Start contributing' }).waitFor();
    await pagePage.waitForLoadState('networkidle');
    figures.volunteerBeforeStart = { requests: pageBytes.map((r) => r.path), bytes: pageBytes.reduce((n, r) => n + r.bytes, 0) };
    await pagePage.close();

    figures.notCached = await timeToFirstAccepted(context, coordinator);
    figures.cached = [await timeToFirstAccepted(context, coordinator), await timeToFirstAccepted(context, coordinator)];
  } finally {
    await context.close();
    await host.close();
    await coordinator.close();
    rmSync(profile, { recursive: true, force: true });
  }

  const kb = (n) => `${(n / 1024).toFixed(1)} KiB`;
  const s = (ms) => (ms === null ? '–' : `${(ms / 1000).toFixed(1)} s`);
  const run = (m) => `${s(m.accepted)}: engine ready ${s(m.connecting)}, channel open ${s(m.channelOpen)}, joined ${s(m.joined)}, model ${m.modelCached ? 'from cache' : 'downloaded'} ${s(m.model)}, `
    + `unit sent ${s(m.unit)} (${s(m.unitMs)} of it computing); gone ${s(m.leftAfterClose)} after its tab closed`;
  console.log('Browser contributor (Chromium, WebGPU on SwiftShader; release coordinator, 1 replica, 1 sentence a unit)');
  console.log(`  open volunteer page -> first accepted unit, model not cached: ${run(figures.notCached)}`);
  figures.cached.forEach((m, i) => console.log(`  open volunteer page -> first accepted unit, model cached (${i + 1}): ${run(m)}   target <= 10 s`));
  console.log(`  wasm module: ${kb(figures.wasm.raw)}, gzip ${kb(figures.wasm.gzip)}; JS glue ${kb(figures.glue.raw)}, gzip ${kb(figures.glue.gzip)}`);
  console.log(`  widget before consent: ${kb(figures.widgetBeforeConsent.bytes)} in ${figures.widgetBeforeConsent.requests.length} request(s) (${figures.widgetBeforeConsent.requests.join(', ')}); gzip ${kb(figures.widgetFile.gzip)}   target <= 20 KB`);
  console.log(`  volunteer page before Start: ${kb(figures.volunteerBeforeStart.bytes)} in ${figures.volunteerBeforeStart.requests.length} requests (no wasm)`);
  const out = join(artifactsDir('bench'), 'contributor.json');
  writeFileSync(out, `${JSON.stringify(figures, null, 2)}\n`);
  console.log(`  written to ${out}`);
}

await main();
