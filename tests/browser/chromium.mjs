// Shared by the browser tests and the browser benchmark: a static file server on loopback,
// where the model cache is, and Debian's Chromium with WebGPU on SwiftShader, driven by
// playwright-core.
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import { extname, join, normalize, resolve, sep } from 'node:path';
import { chromium } from 'playwright-core';

const TYPES = {
  '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.css': 'text/css', '.json': 'application/json',
};

export const WEBGPU_FLAGS = [
  '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader', '--use-webgpu-adapter=swiftshader',
  '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync',
];

/**
 * Serves `root` on 127.0.0.1 at a free port, and each folder of `mounts` ({ '/prefix/': folder })
 * under its URL prefix; resolves to { url, close }. Files are streamed (models are ~100 MB).
 */
export async function serveStatic(root, mounts = {}) {
  const folders = [...Object.entries(mounts).map(([prefix, dir]) => [prefix, resolve(dir)]), ['/', resolve(root)]];
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    const [prefix, base] = folders.find(([p]) => path.startsWith(p));
    const rest = path.slice(prefix.length);
    const file = join(base, rest === '' ? 'index.html' : rest);
    if (file !== base && !file.startsWith(base + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const { size } = await stat(file);
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'content-length': size });
      createReadStream(file).on('error', () => res.destroy()).pipe(res);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((done) => server.close(done)) };
}

/** Where `tessera models fetch` puts the models: the rule of `tessera_engine::cache`. */
export function modelCacheDir() {
  if (process.env.TESSERA_MODELS !== undefined) {
    return process.env.TESSERA_MODELS;
  }
  const cache = process.env.XDG_CACHE_HOME ?? join(process.env.HOME ?? '.', '.cache');
  return join(cache, 'tessera', 'models');
}

/** Launches headless Chromium with WebGPU (CHROMIUM overrides the executable). */
export function launchChromium() {
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: WEBGPU_FLAGS });
}
