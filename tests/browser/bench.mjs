// Browser performance figures: SmolLM2 prefill and decode, MiniLM sentences/s at batch 1 and 32,
// in headless Chromium with WebGPU on SwiftShader (or whatever adapter CHROMIUM's flags give).
// Not a test (node --test does not pick it up); needs `www/pkg` and the models.
//   node tests/browser/bench.mjs [--prompt 128] [--decode 16] [--json]
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { launchChromium, modelCacheDir, serveStatic } from './chromium.mjs';

const WWW = fileURLToPath(new URL('../../www', import.meta.url));
const FIXTURES = fileURLToPath(new URL('../../crates/tessera-engine/tests/data', import.meta.url));
const SMOLLM2 = 'smollm2/SmolLM2-135M-Instruct.Q4_1.gguf';
const MINILM = ['minilm/config.json', 'minilm/model.safetensors'];

const { values: options } = parseArgs({
  options: { prompt: { type: 'string', default: '128' }, decode: { type: 'string', default: '16' }, json: { type: 'boolean', default: false } },
});
const cache = modelCacheDir();
const missing = [SMOLLM2, ...MINILM].filter((file) => !existsSync(join(cache, file)));
if (missing.length > 0) {
  console.error(`model files missing from ${cache}: ${missing.join(', ')}; run \`cargo run -p tessera -- models fetch\``);
  process.exit(1);
}

const server = await serveStatic(WWW, { '/models/': cache });
const browser = await launchChromium();
try {
  const page = await browser.newPage();
  await page.goto(`${server.url}/models.html`);
  const call = (name, ...args) => page.evaluate(([n, a]) => window.tesseraModels[n](...a), [name, args]);
  const report = { browser: `Chromium ${browser.version()}`, adapter: await call('adapter') };
  const progress = (line) => options.json || console.error(line);

  progress(`SmolLM2: prefill ${options.prompt} tokens, then decode ${options.decode}…`);
  await call('loadLlama', `/models/${SMOLLM2}`, { embedding: true, blocks: [0, 30], head: true });
  report.smollm2 = await call('benchLlama', { prompt_tokens: Number(options.prompt), decode_tokens: Number(options.decode) });

  const sentences = JSON.parse(readFileSync(join(FIXTURES, 'all-minilm-l6-v2.json'), 'utf8')).cases.map((c) => c.ids);
  await call('loadBert', `/models/${MINILM[0]}`, `/models/${MINILM[1]}`);
  report.minilm = [];
  for (const [batch, repeats] of [[1, 8], [32, 1]]) {
    progress(`MiniLM: batch ${batch}…`);
    report.minilm.push(await call('benchBert', { sentences, batch, repeats }));
  }

  if (options.json) {
    console.log(JSON.stringify(report));
  } else {
    const s = report.smollm2;
    const fixed = (x, digits = 2) => x.toFixed(digits);
    const a = report.adapter;
    console.log(`${report.browser}, adapter: ${[a.vendor, a.architecture, a.description].filter(Boolean).join(' ') || a.name || '(unnamed)'}`);
    console.log(`SmolLM2-135M Q4_1  prefill ${s.prompt_tokens} tokens: ${fixed(s.prefill_tokens_per_s)} tokens/s (${fixed(s.prefill_ms / 1000, 1)} s; cold, with pipeline compilation: ${fixed(s.cold_prefill_ms / 1000, 1)} s)`);
    console.log(`SmolLM2-135M Q4_1  decode at context ${s.prompt_tokens}..${s.prompt_tokens + s.decode_tokens}: ${fixed(s.decode_tokens_per_s, 3)} tokens/s (${fixed(s.decode_ms / s.decode_tokens)} ms/token, ${s.submits_per_token} submit and ${s.dispatches_per_token} dispatches per token)`);
    for (const m of report.minilm) {
      console.log(`all-MiniLM-L6-v2   batch ${m.batch}: ${fixed(m.sentences_per_s)} sentences/s (${m.repeats} × ${m.batch} sentences in ${fixed(m.ms / 1000, 1)} s)`);
    }
  }
} finally {
  await browser.close();
  await server.close();
}
