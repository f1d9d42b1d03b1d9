// Shared by the end-to-end test and the contributor benchmark: `tessera serve` as a child process,
// a page from another origin that embeds the widget, the local reference (`tessera embed`), and
// the check that we run inside a private network namespace.
//
// Why a namespace: Chromium gathers no WebRTC candidates on a host whose only interface is
// loopback, so xtask runs these scripts under `unshare --net` with `lo` up and a veth pair
// (198.18.0.1/24). The coordinator still listens on 127.0.0.1 (a secure context for WebGPU
// without flags; Chromium pairs its veth candidate with the coordinator's loopback one), the
// host page on 127.0.0.2 (another site, secure too). Nothing can leave the namespace: it has
// no route out.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const WWW = join(ROOT, 'www');
/** The loopback address the host page (another site) listens on. */
export const HOST_PAGE_IP = '127.0.0.2';

/**
 * Throws unless this process runs in a network with no way out (no route beyond the local
 * subnets: no default route, no gateway) and a non-loopback interface for WebRTC.
 */
export function requirePrivateNetwork() {
  const how = 'run it with `cargo run -p xtask -- e2e` (or `npm test`), which starts it in a private network namespace';
  let routes;
  try {
    routes = readFileSync('/proc/net/route', 'utf8').trim().split('\n').slice(1).map((l) => l.trim().split(/\s+/));
  } catch {
    throw new Error(`cannot read /proc/net/route (Linux only): ${how}`);
  }
  const out = routes.filter(([, destination, gateway]) => destination === '00000000' || gateway !== '00000000');
  if (out.length > 0) {
    throw new Error(`this network has a route off the machine (${out.map((r) => r[0]).join(', ')}): ${how}`);
  }
  const external = Object.values(networkInterfaces()).flat().filter((a) => !a.internal && a.family === 'IPv4');
  if (external.length === 0) {
    throw new Error(`no non-loopback interface, so Chromium would gather no WebRTC candidates: ${how}`);
  }
}

/** The `tessera` binary: $TESSERA_BIN, or target/<profile>/tessera. */
export function tesseraBinary(profile = 'debug') {
  const bin = process.env.TESSERA_BIN ?? join(ROOT, 'target', profile, 'tessera');
  if (!existsSync(bin)) {
    throw new Error(`${bin} is missing: build it with \`cargo build -p tessera${profile === 'release' ? ' --release' : ''}\``);
  }
  return bin;
}

/** Where tests leave screenshots and figures: target/test-artifacts/<name>. */
export function artifactsDir(name) {
  const dir = join(ROOT, 'target', 'test-artifacts', name);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/**
 * Starts `tessera serve` on 127.0.0.1 (a free port) with a fresh data folder and this
 * repository's www/; resolves to { url, close, log } once it listens.
 */
export async function startCoordinator({ unitInputs = 1, replicas = 2, profile = 'debug', args = [] } = {}) {
  const data = mkdtempSync(join(tmpdir(), 'tessera-e2e-'));
  const child = spawn(tesseraBinary(profile), [
    'serve', '--addr', '127.0.0.1:0', '--data', data, '--www', WWW, '--unit-inputs', String(unitInputs), '--replicas', String(replicas), ...args,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  child.stderr.on('data', (d) => log.push(String(d)));
  const exited = new Promise((done) => child.on('exit', (code, signal) => done(`exited (${code ?? signal})`)));
  const listening = new Promise((done) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += String(d);
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        done(m[1]);
      }
    });
  });
  const url = await Promise.race([listening, exited.then((why) => Promise.reject(new Error(`tessera serve ${why}:\n${log.join('')}`)))]);
  return {
    url,
    log,
    async close() {
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((done) => setTimeout(done, 5000))]);
      child.kill('SIGKILL');
      rmSync(data, { recursive: true, force: true });
    },
  };
}

/** Serves `html` at / on HOST_PAGE_IP (a free port); resolves to { url, close }. */
export async function serveHostPage(html) {
  const server = createServer((req, res) => {
    if (req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' }).end(html);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((done) => server.listen(0, HOST_PAGE_IP, done));
  return {
    url: `http://${HOST_PAGE_IP}:${server.address().port}`,
    close: () => new Promise((done) => {
      server.closeAllConnections();
      server.close(done);
    }),
  };
}

/** A host page: a little content, and the widget's one tag. */
export function hostPageHtml(coordinator) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>A site that embeds Tessera</title><link rel="icon" href="data:,">
<style>
  body { font: 18px/1.6 Georgia, serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; background: #fbf7ef; color: #2b2b2b; }
  /* Hostile to widgets: none of this may reach the card. */
  body { letter-spacing: 0.05em; } button { display: none; } p { color: #8a1c1c; } section, div { border: 4px dashed red; }
</style></head>
<body>
  <h1>The Daily Example</h1>
  <p>An article the visitor came to read. Below it, the site invites its readers to lend their GPU.</p>
  <script src="${coordinator}/widget.js" data-coordinator="${coordinator}" async></script>
  <p>The rest of the article.</p>
</body></html>`;
}

/** Runs `tessera embed --model minilm` on this machine; one vector per text. */
export async function embedLocally(texts) {
  const child = spawn(tesseraBinary(), ['embed', '--model', 'minilm', ...texts], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const code = await new Promise((done) => child.on('exit', done));
  if (code !== 0) {
    throw new Error(`tessera embed failed (${code}): ${err}`);
  }
  return out.trim().split('\n').map((line) => JSON.parse(line).embedding);
}

export function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb);
}

/**
 * Polls `check` (a query, not a sleep standing in for an event) until it returns a truthy value,
 * which it resolves to; rejects after `timeoutMs` naming `what` and `explain()`.
 */
export async function waitFor(what, check, { timeoutMs = 120_000, intervalMs = 250, explain = () => '' } = {}) {
  const start = Date.now();
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    if (Date.now() - start > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}\n${await explain()}`);
    }
    await new Promise((done) => setTimeout(done, intervalMs));
  }
}
