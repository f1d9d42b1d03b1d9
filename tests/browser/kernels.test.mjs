// The engine's kernels, compiled to wasm, on WebGPU in headless Chromium (SwiftShader), each
// compared with its CPU reference: the same cases as the native tests. Needs `www/pkg`
// (built by `cargo xtask test`).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { launchChromium, serveStatic } from './chromium.mjs';

const WWW = fileURLToPath(new URL('../../www', import.meta.url));
// Kernels the browser must run (the minimum); every other case must pass too.
const REQUIRED = ['matmul', 'matvec_quant', 'rms_norm', 'softmax', 'attention'];

describe('kernels on WebGPU in Chromium', () => {
  let server, browser, result;
  const console = [];

  before(async () => {
    server = await serveStatic(WWW);
    browser = await launchChromium();
    const page = await browser.newPage();
    page.on('console', (m) => console.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.push(`pageerror: ${e.message}`));
    await page.goto(`${server.url}/selftest.html`);
    const seed = Math.floor(Math.random() * 2 ** 32);
    try {
      result = await page.evaluate((s) => window.tesseraSelfTest(s), seed);
    } catch (error) {
      throw new Error(`self-test failed (seed ${seed}): ${error.message}\n${console.join('\n')}`);
    }
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('a WebGPU adapter was found and every case ran', () => {
    assert.ok(result.reports.length > 0);
    for (const kernel of REQUIRED) {
      assert.ok(result.reports.some((r) => r.kernel === kernel), `no ${kernel} case ran`);
    }
  });

  for (const kernel of ['matmul', 'linear_f32', 'matvec_quant', 'matmul_quant', 'gather', 'rms_norm', 'layer_norm',
    'softmax', 'rope', 'silu_mul', 'gelu', 'add', 'attention', 'mean_pool_l2']) {
    test(`${kernel} matches the CPU reference`, () => {
      const reports = result.reports.filter((r) => r.kernel === kernel);
      assert.ok(reports.length > 0, `no ${kernel} case ran`);
      const failed = reports.filter((r) => !r.passed);
      assert.deepEqual(failed, [], `${failed.length} of ${reports.length} ${kernel} cases failed (seed ${reports[0].seed})\n${console.join('\n')}`);
    });
  }
});
