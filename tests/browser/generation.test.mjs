// A language model split across a browser tab and native contributors, end to end: `tessera
// serve`, one volunteer page (WebGPU on SwiftShader) and two `tessera contribute` processes, each
// lending about eleven blocks' worth of memory, so SmolLM2's 30 blocks need all three and the
// tab holds a span. A chat completion at temperature 0 through the official OpenAI client
// (npm `openai`), whole and streamed, gives exactly the text of `tessera run --chat` on this
// machine; so does one during which a fourth contributor joins, and one during which a native
// span holder is killed (its span moves, the sessions replay). Screenshots of the volunteer page
// and the swarm view go to target/test-artifacts/generation.
//
// Needs a private network namespace (see network.mjs): `cargo run -p xtask -- e2e`.
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { launchChromium } from './chromium.mjs';
import { artifactsDir, requirePrivateNetwork, startCoordinator, tesseraBinary, waitFor } from './network.mjs';

const MODEL = 'smollm2';
const PROMPT = 'Write a short poem about the sea.';
const MAX_TOKENS = 12;
/**
 * GPU memory each contributor lends, in MiB: with the KV cache the coordinator reserves for its
 * sessions, eleven blocks. Three hold the model's 30; two do not.
 */
const MEMORY_MIB = 300;
/** Deadlines for what SwiftShader on two shared cores does slowly; never a sleep. */
const JOIN_TIMEOUT = 180_000;
const ANSWER_TIMEOUT = 900_000;
/** The longest a stage may take for one step: SwiftShader's prompt step through ten blocks is slow. */
const STAGE_DEADLINE_MS = 300_000;
/**
 * The least a stage is given for one step, however fast it has been: not the default 1 s, which a
 * busy machine's pauses reach, moving spans (and barring the holder from lending its shard) in a
 * test that asserts who holds what. A killed holder is still noticed in about 10 s, by its missed
 * deadline or its missing heartbeats.
 */
const STAGE_FLOOR_MS = 10_000;

/** `tessera run --chat` on this machine: the text greedy decoding gives. */
async function reference() {
  const child = spawn(tesseraBinary(), ['run', '--model', MODEL, '--chat', '--json', '--prompt', PROMPT, '--max-tokens', String(MAX_TOKENS)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const code = await new Promise((done) => child.on('exit', done));
  assert.equal(code, 0, `tessera run failed: ${err}`);
  return JSON.parse(out).text;
}

/** The span holders a response names (`x-tessera-spans: 0-10=3,10-20=5,20-30=7`), by block. */
function parseSpans(header) {
  assert.ok(header, 'the response names its span holders');
  const spans = header.split(',').map((span) => {
    const [blocks, holder] = span.split('=');
    const [start, end] = blocks.split('-').map(Number);
    return { start, end, holder: Number(holder) };
  }).sort((a, b) => a.start - b.start);
  assert.equal(spans[0].start, 0, header);
  assert.equal(spans.at(-1).end, 30, header);
  spans.slice(1).forEach((span, i) => assert.equal(span.start, spans[i].end, header));
  return spans;
}

describe('a model split across a browser and native contributors', { timeout: 45 * 60_000 }, () => {
  let coordinator, browser, page, shots, client, expected, cache;
  /** The browser's contributor id. */
  let tab;
  /** Native contributors: { child, log, exited }. */
  const natives = [];
  const consoleLines = [];

  const explain = () => [
    `coordinator:\n${coordinator.log.join('').slice(-6000)}`,
    ...natives.map((n, i) => `native ${i}:\n${n.log.join('').slice(-2000)}`),
    `browser:\n${consoleLines.slice(-40).join('\n')}`,
  ].join('\n');

  function startNative() {
    const child = spawn(tesseraBinary(), ['contribute', '--coordinator', coordinator.url, '--cache', cache, '--memory-budget-mib', String(MEMORY_MIB)], { stdio: ['ignore', 'ignore', 'pipe'] });
    const native = { child, log: [], exited: new Promise((done) => child.on('exit', done)) };
    child.stderr.on('data', (d) => native.log.push(String(d)));
    natives.push(native);
    return native;
  }

  const contributors = async () => (await (await fetch(`${coordinator.url}/api/contributors`)).json()).contributors;

  /** A native contributor's id, from its log ("joined as contributor N"). */
  const nativeId = (native) => {
    const m = /joined as contributor (\d+)/.exec(native.log.join(''));
    return m ? Number(m[1]) : null;
  };

  /**
   * A streamed chat completion; `during({ spans, request })` runs once after the first piece of
   * text, with the span holders the stream started on and its request id.
   */
  async function streamed(during = async () => {}) {
    const { data: stream, response } = await client.chat.completions
      .create({ model: MODEL, messages: [{ role: 'user', content: PROMPT }], temperature: 0, max_tokens: MAX_TOKENS, stream: true, stream_options: { include_usage: true } })
      .withResponse();
    const spans = parseSpans(response.headers.get('x-tessera-spans'));
    const request = response.headers.get('x-tessera-request');
    let text = '', pieces = 0, usage = null, finish = null;
    for await (const chunk of stream) {
      usage = chunk.usage ?? usage;
      for (const choice of chunk.choices) {
        const piece = choice.delta?.content ?? '';
        text += piece;
        finish = choice.finish_reason ?? finish;
        if (piece && ++pieces === 1) {
          await during({ spans, request });
        }
      }
    }
    return { text, usage, finish, request, spans };
  }

  before(async () => {
    requirePrivateNetwork();
    shots = artifactsDir('generation');
    cache = mkdtempSync(join(tmpdir(), 'tessera-contributors-'));
    coordinator = await startCoordinator({ args: ['--stage-deadline-ms', String(STAGE_DEADLINE_MS), '--stage-floor-ms', String(STAGE_FLOOR_MS)] });
    client = new OpenAI({ baseURL: `${coordinator.url}/v1`, apiKey: 'not-needed', maxRetries: 0, timeout: ANSWER_TIMEOUT });
    browser = await launchChromium();
  });

  afterEach(async (t) => {
    if (t.passed === false) {
      console.log(explain());
    }
  });

  after(async () => {
    for (const native of natives) {
      native.child.kill('SIGKILL');
    }
    await browser?.close();
    await coordinator?.close();
    if (cache) {
      rmSync(cache, { recursive: true, force: true });
    }
  });

  test('a volunteer tab and two native contributors join', { timeout: JOIN_TIMEOUT * 2 }, async () => {
    const context = await browser.newContext({ viewport: { width: 1000, height: 1000 } });
    // Playwright's own 30 s for a page to load or a click: too little for a busy machine.
    context.setDefaultTimeout(JOIN_TIMEOUT);
    page = await context.newPage();
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
    await page.goto(`${coordinator.url}/?memory=${MEMORY_MIB}`);
    await page.getByRole('button', { name: 'Start contributing' }).click();
    startNative();
    startNative();
    expected = await reference();
    const joined = await waitFor('the tab to join', async () => {
      const { events, status } = await page.evaluate(() => ({ events: window.tesseraVolunteer.events, status: window.tesseraVolunteer.status }));
      if (status === 'error' && !events.some((e) => e.type === 'joined')) {
        throw new Error(`the tab failed to start: ${(await page.locator('#status-text').textContent()).trim()}\n${explain()}`);
      }
      return events.find((e) => e.type === 'joined');
    }, { timeoutMs: JOIN_TIMEOUT, explain });
    tab = joined.contributor;
    await waitFor('three contributors', async () => (await contributors()).length === 3, { timeoutMs: JOIN_TIMEOUT, explain });
    const listed = await contributors();
    assert.equal(listed.find((c) => c.id === tab)?.memory_budget_bytes, MEMORY_MIB * 2 ** 20, JSON.stringify(listed));
  });

  test('a chat completion, whole and streamed, is the local greedy text, with the tab holding a span', { timeout: ANSWER_TIMEOUT * 2 }, async () => {
    assert.ok(tab, 'the contributors joined');
    const started = Date.now();
    const { data: whole, response } = await client.chat.completions
      .create({ model: MODEL, messages: [{ role: 'user', content: PROMPT }], temperature: 0, max_tokens: MAX_TOKENS })
      .withResponse();
    const spans = parseSpans(response.headers.get('x-tessera-spans'));
    assert.equal(spans.length, 3, `three spans: ${JSON.stringify(spans)}`);
    assert.ok(spans.some((s) => s.holder === tab), `the tab (${tab}) holds a span: ${JSON.stringify(spans)}`);
    assert.equal(whole.choices[0].message.content, expected, explain());
    assert.equal(whole.usage.completion_tokens, MAX_TOKENS);

    const wholeMs = Date.now() - started;
    const stream = await streamed();
    const streamMs = Date.now() - started - wholeMs;
    assert.equal(stream.text, expected);
    assert.equal(stream.usage?.completion_tokens, MAX_TOKENS);
    assert.equal(stream.finish, 'length');

    const stats = await page.evaluate(() => window.tesseraVolunteer.contributor.stats()).then(JSON.parse);
    const held = spans.find((s) => s.holder === tab);
    assert.deepEqual(stats.spans.map((s) => [s.start, s.end]), [[held.start, held.end]], JSON.stringify(stats));
    assert.ok(stats.stepsForwarded >= 2 * MAX_TOKENS, JSON.stringify(stats));
    // The hidden states went from stage to stage over direct channels, the tab's included: it
    // holds one with each neighbouring stage's holder, and most hops went straight on.
    const at = spans.findIndex((s) => s.holder === tab);
    const neighbours = Number(at > 0) + Number(at < spans.length - 1);
    assert.equal(stats.links, neighbours, JSON.stringify(stats));
    const { hops } = await fetch(`${coordinator.url}/api/swarm`).then((r) => r.json());
    assert.ok(hops.direct > hops.relayed, `hops: ${JSON.stringify(hops)}`);
    console.log(`whole ${wholeMs} ms (with the span loads), streamed ${streamMs} ms for ${MAX_TOKENS} tokens; the tab's blocks ${held.start}-${held.end}: `
      + `${stats.stepsForwarded} steps, ${stats.rowsForwarded} positions, ${Math.round(stats.busyMs)} ms of GPU time; `
      + `${stats.links} direct link(s), ${stats.stepsPassedDirect} outputs passed on directly; hops ${JSON.stringify(hops)}`);
    await page.screenshot({ path: join(shots, 'volunteer-holding-a-span.png'), fullPage: true });
  });

  test('a fourth contributor joining mid-stream changes nothing in the text', { timeout: ANSWER_TIMEOUT }, async () => {
    assert.ok(expected, 'the first answer came');
    const stream = await streamed(async ({ request }) => {
      startNative();
      await waitFor('the fourth contributor', async () => (await contributors()).length === 4, { timeoutMs: JOIN_TIMEOUT, explain });
      // It joined while this request was still generating.
      const record = await (await fetch(`${coordinator.url}/api/requests/${request}`)).json();
      assert.notEqual(record.state, 'done', `the fourth joined only after the stream ended: ${JSON.stringify(record)}`);
    });
    assert.equal(stream.text, expected, explain());
  });

  test('a native span holder killed mid-stream: the stream completes with the same text', { timeout: ANSWER_TIMEOUT }, async () => {
    assert.equal((await contributors()).length, 4, 'a spare contributor is connected');
    let victim = null;
    const stream = await streamed(async ({ spans }) => {
      const native = natives.find((n) => spans.some((s) => s.holder === nativeId(n) && s.holder !== tab));
      assert.ok(native, `a native contributor holds one of ${JSON.stringify(spans)}`);
      victim = nativeId(native);
      native.child.kill('SIGKILL');
      await native.exited;
    });
    assert.ok(victim !== null, 'a holder was killed');
    assert.equal(stream.text, expected, explain());
    assert.equal(stream.usage?.completion_tokens, MAX_TOKENS);
    const record = await (await fetch(`${coordinator.url}/api/requests/${stream.request}`)).json();
    assert.equal(record.state, 'done', JSON.stringify(record));
    assert.ok(record.replans >= 1, `the span moved: ${JSON.stringify(record)}`);
    await waitFor('the victim to be gone', async () => !(await contributors()).some((c) => c.id === victim), { timeoutMs: JOIN_TIMEOUT, explain });

    // The next request runs on the repaired plan, without the victim, and still agrees.
    const { data: after, response } = await client.chat.completions
      .create({ model: MODEL, messages: [{ role: 'user', content: PROMPT }], temperature: 0, max_tokens: MAX_TOKENS })
      .withResponse();
    const spans = parseSpans(response.headers.get('x-tessera-spans'));
    assert.ok(!spans.some((s) => s.holder === victim), `${victim} was killed: ${JSON.stringify(spans)}`);
    assert.equal(after.choices[0].message.content, expected);

    // The coordinator's swarm view shows who holds what and the requests served.
    const swarm = await page.context().newPage();
    await swarm.goto(`${coordinator.url}/swarm`);
    await waitFor('the swarm view to list contributors and requests', async () => (
      (await swarm.locator('#contributors tr').count()) >= 3 && (await swarm.locator('#requests tr').count()) >= 4
    ), { timeoutMs: JOIN_TIMEOUT, explain });
    assert.ok((await swarm.locator('#contributors').textContent()).includes(String(tab)), 'the tab is listed');
    await swarm.screenshot({ path: join(shots, 'swarm.png'), fullPage: true });
    await swarm.close();
  });
});
