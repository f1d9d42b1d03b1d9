// The two launch models, compiled to wasm, on WebGPU in headless Chromium (SwiftShader), checked
// against the float64 references in crates/tessera-engine/tests/data with the criteria:
// SmolLM2 run as three spans [0,10) [10,20) [20,30), each with its own KV cache and the
// activations read back to the CPU between spans; MiniLM embeddings batched and alone.
// Needs `www/pkg` (built by `cargo xtask test`) and the models (`tessera models fetch`).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium, modelCacheDir, serveStatic } from './chromium.mjs';

const WWW = fileURLToPath(new URL('../../www', import.meta.url));
const FIXTURES = fileURLToPath(new URL('../../crates/tessera-engine/tests/data', import.meta.url));
const SMOLLM2 = 'smollm2/SmolLM2-135M-Instruct.Q4_1.gguf';
const MINILM = ['minilm/config.json', 'minilm/model.safetensors'];
const SPANS = [[0, 10], [10, 20], [20, 30]];
/** The reference's own bound on a logit, and the margin below which either top choice is legitimate. */
const TOLERANCE = 0.05;

const fixture = (name) => JSON.parse(readFileSync(join(FIXTURES, name), 'utf8'));
const margin = (top5) => top5.logits[0] - top5.logits[1];

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < b.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb);
}

describe('the launch models on WebGPU in Chromium', () => {
  let server, browser, page;
  const log = [];
  /** Calls window.tesseraModels[name](...args) in the page; errors carry the page's console. */
  const call = async (name, ...args) => {
    try {
      return await page.evaluate(([n, a]) => window.tesseraModels[n](...a), [name, args]);
    } catch (error) {
      throw new Error(`${name} failed: ${error.message}\n${log.join('\n')}`);
    }
  };
  /** The message of the Error that window.tesseraModels[name](...args) rejects with. */
  const rejection = (name, ...args) => page.evaluate(([n, a]) => window.tesseraModels[n](...a).then(
    () => null,
    (error) => String(error.message ?? error),
  ), [name, args]);

  before(async () => {
    const cache = modelCacheDir();
    const missing = [SMOLLM2, ...MINILM].filter((file) => !existsSync(join(cache, file)));
    if (missing.length > 0) {
      throw new Error(`model files missing from ${cache}: ${missing.join(', ')}; run \`cargo run -p tessera -- models fetch\``);
    }
    server = await serveStatic(WWW, { '/models/': cache, '/fixtures/': FIXTURES });
    browser = await launchChromium();
    page = await browser.newPage();
    page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
    await page.goto(`${server.url}/models.html`);
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  describe('SmolLM2-135M-Instruct as three spans', () => {
    const { cases } = fixture('smollm2-135m-instruct-q4_1.json');

    before(async () => {
      const model = await call('loadLlama', `/models/${SMOLLM2}`, { embedding: true, blocks: [0, 30], head: true });
      assert.equal(model.blocks, 30);
    });

    test('teacher-forced logits match the reference', async () => {
      const failures = [];
      for (const c of cases) {
        const ids = [...c.prompt_ids, ...c.greedy_ids].slice(0, c.top5.length);
        const result = await call('teacherForced', { ids, spans: SPANS, requested: c.top5.map((t) => t.ids) });
        assert.equal(result.submits, SPANS.length, 'one submission per span');
        c.top5.forEach((reference, position) => {
          const got = result.positions[position];
          if (margin(reference) > TOLERANCE && got.top1 !== reference.ids[0]) {
            failures.push(`${JSON.stringify(c.text)} position ${position}: top-1 ${got.top1}, reference ${reference.ids[0]}`);
          }
          reference.ids.forEach((id, k) => {
            if (!(Math.abs(got.logits[k] - reference.logits[k]) <= TOLERANCE)) {
              failures.push(`${JSON.stringify(c.text)} position ${position}, token ${id}: logit ${got.logits[k]}, reference ${reference.logits[k]}`);
            }
          });
        });
      }
      assert.deepEqual(failures, []);
    });

    test('greedy decoding reproduces the reference up to its first near-tie', async () => {
      for (const c of cases) {
        // Generated position `step` is predicted at prompt position prompt_ids.length - 1 + step.
        const tie = c.greedy_ids.findIndex((_, step) => margin(c.top5[c.prompt_ids.length - 1 + step]) < TOLERANCE);
        const checked = tie === -1 ? c.greedy_ids.length : tie;
        if (checked === 0) {
          continue;
        }
        const result = await call('greedy', { prompt: c.prompt_ids, tokens: checked, spans: SPANS });
        assert.deepEqual(result.ids, c.greedy_ids.slice(0, checked), `${JSON.stringify(c.text)}: ${checked} greedy tokens`);
      }
    });

    test('bad input is an Error that says what is wrong', async () => {
      const prompt = cases[0].prompt_ids;
      const checks = [
        [['greedy', { prompt, tokens: 1, spans: [[0, 10], [20, 30]] }], 'do not run blocks 0..30 in order'],
        [['greedy', { prompt: [1, 60000], tokens: 1, spans: SPANS }], 'token id 60000 is outside the vocabulary'],
        [['teacherForced', { ids: prompt, spans: SPANS, requested: [[99999]] }], 'token id 99999 is outside the vocabulary'],
        [['greedy', { prompt, tokens: 1, spans: SPANS, temperature: 1 }], 'unknown field `temperature`'],
        [['loadLlama', '/fixtures/all-minilm-l6-v2.json', { embedding: true, blocks: [0, 30], head: true }], '/fixtures/all-minilm-l6-v2.json: '],
        [['loadLlama', `/models/${SMOLLM2}`, { embedding: true, blocks: [20, 40], head: true }], 'blocks [20, 40) are not a span of the model\'s 30 blocks'],
      ];
      for (const [[name, ...args], expected] of checks) {
        const message = await rejection(name, ...args);
        assert.ok(message?.includes(expected), `${name}(${JSON.stringify(args)}): ${JSON.stringify(message)} does not say ${JSON.stringify(expected)}`);
      }
    });
  });

  describe('all-MiniLM-L6-v2', () => {
    const { cases } = fixture('all-minilm-l6-v2.json');

    before(async () => {
      await call('loadBert', `/models/${MINILM[0]}`, `/models/${MINILM[1]}`);
    });

    test('embeddings match the reference, batched and alone', async () => {
      // All eight padded into one batch, and the shortest alone (SwiftShader takes seconds per call).
      const batched = await call('embed', cases.map((c) => c.ids));
      const shortest = cases.reduce((a, b) => (b.ids.length < a.ids.length ? b : a));
      const alone = await call('embed', [shortest.ids]);
      const checks = [
        ...cases.map((c, i) => [`${JSON.stringify(c.text)} (batched)`, batched.embeddings[i], c.embedding]),
        [`${JSON.stringify(shortest.text)} (alone)`, alone.embeddings[0], shortest.embedding],
      ];
      const failures = checks.map(([what, got, reference]) => [what, cosine(got, reference)])
        .filter(([, similarity]) => !(similarity >= 0.9999))
        .map(([what, similarity]) => `${what}: cosine ${similarity}`);
      assert.deepEqual(failures, []);
    });

    test('a token outside the vocabulary is an Error', async () => {
      const message = await rejection('embed', [[5, 40000]]);
      assert.ok(message?.includes('40000'), String(message));
    });
  });
});
