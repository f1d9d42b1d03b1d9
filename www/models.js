// Loads models into the wasm engine and runs them; the browser tests and `tests/browser/bench.mjs`
// call window.tesseraModels. Requests and results cross as plain objects (JSON inside the wasm).
import init, { Engine } from './pkg/tessera_web.js';

const status = document.getElementById('status');
const ready = init();
let engine;
let llama;
let bert;

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) {
    throw new Error(`fetching ${url}: HTTP ${response.status}`);
  }
  return new Uint8Array(await response.arrayBuffer());
}

async function open() {
  await ready;
  if (!navigator.gpu) {
    throw new Error('This browser has no WebGPU, so it cannot run Tessera\'s models.');
  }
  engine ??= await Engine.open();
  return engine;
}

function loaded(model, loader) {
  if (!model) {
    throw new Error(`no model is loaded: call ${loader} first`);
  }
  return model;
}

function timed(what, work) {
  status.textContent = `${what}…`;
  const start = performance.now();
  return Promise.resolve(work()).then((value) => {
    status.textContent = `${what}: done in ${Math.round(performance.now() - start)} ms.`;
    return value;
  });
}

window.tesseraModels = {
  /** The engine's adapter summary, with what the browser says about its adapter. */
  adapter: async () => {
    const summary = JSON.parse((await open()).adapter());
    const info = (await navigator.gpu.requestAdapter())?.info;
    return { ...summary, vendor: info?.vendor, architecture: info?.architecture, description: info?.description };
  },

  /** Loads `stages` ({embedding, blocks: [a, b], head}) of the GGUF at `url`; replaces the last. */
  loadLlama: (url, stages) => timed('loading the language model', async () => {
    const gpu = await open();
    const bytes = await fetchBytes(url);
    const start = performance.now();
    llama?.free();
    llama = undefined;
    llama = gpu.loadLlama(url, bytes, JSON.stringify(stages));
    return { ...JSON.parse(llama.describe()), bytes: bytes.length, load_ms: performance.now() - start };
  }),

  /** {ids, spans, requested} -> {positions: [{top1, logits}], submits} */
  teacherForced: (request) => timed('teacher forcing', async () => JSON.parse(await loaded(llama, 'loadLlama').teacherForced(JSON.stringify(request)))),

  /** {prompt, tokens, spans} -> {ids, submits_per_token, dispatches_per_token} */
  greedy: (request) => timed('greedy decoding', async () => JSON.parse(await loaded(llama, 'loadLlama').greedy(JSON.stringify(request)))),

  /** {prompt_tokens, decode_tokens} -> prefill and decode figures */
  benchLlama: (request) => timed('timing the language model', async () => JSON.parse(await loaded(llama, 'loadLlama').bench(JSON.stringify(request)))),

  /** Loads the BERT encoder from its config.json and safetensors URLs; replaces the last. */
  loadBert: (configUrl, weightsUrl) => timed('loading the encoder', async () => {
    const gpu = await open();
    const config = new TextDecoder().decode(await fetchBytes(configUrl));
    const bytes = await fetchBytes(weightsUrl);
    const start = performance.now();
    bert?.free();
    bert = undefined;
    bert = gpu.loadBert(weightsUrl, config, bytes);
    return { bytes: bytes.length, load_ms: performance.now() - start };
  }),

  /** [[id, ...], ...] -> {dim, embeddings} */
  embed: (sentences) => timed('embedding', async () => JSON.parse(await loaded(bert, 'loadBert').embed(JSON.stringify(sentences)))),

  /** {sentences, batch, repeats} -> {batch, repeats, ms, sentences_per_s} */
  benchBert: (request) => timed('timing the encoder', async () => JSON.parse(await loaded(bert, 'loadBert').bench(JSON.stringify(request)))),
};
