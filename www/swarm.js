// The swarm page: asks /api/swarm every second and shows the model, the live rate, every
// contributor with the blocks it holds, and the recent requests. Everything a contributor
// reports (its adapter's name above all) is untrusted, so it goes into the page as text only.

const POLL_MS = 1000;
/** A request that takes longer than this counts as the coordinator being unreachable. */
const TIMEOUT_MS = 5000;
/** Span colours in tessera.css: span-0 … span-7. */
const COLOURS = 8;

const $ = (id) => document.getElementById(id);

/** An element with a class and text. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = String(text);
  }
  return node;
}

function setStatus(state, text) {
  $('status').dataset.status = state;
  $('status-text').textContent = text;
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });

function bytes(n) {
  if (n >= 2 ** 30) {
    return `${decimal.format(n / 2 ** 30)} GiB`;
  }
  return `${integer.format(n / 2 ** 20)} MiB`;
}

/** "12 s ago", "3 min ago", from the coordinator's clock (no skew with this browser's). */
function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) {
    return `${s} s ago`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ago`;
  }
  return `${Math.floor(s / 3600)} h ago`;
}

/** A block range as a segment of a bar `blocks` wide (positions through the CSSOM: the CSP allows no style attributes). */
function segment(span, index, blocks, className) {
  const [start, end] = span.blocks;
  const node = el('span', `segment span-${index % COLOURS} ${className}`);
  node.style.left = `${(100 * start) / blocks}%`;
  node.style.width = `${(100 * (end - start)) / blocks}%`;
  return node;
}

function renderModel(model) {
  const line = $('model');
  if (model === null) {
    line.textContent = 'This coordinator serves no language model (fetch one with `tessera models fetch smollm2` and restart it).';
    return;
  }
  const states = {
    loading: 'is loading on the coordinator',
    ready: `is served in ${model.blocks} blocks`,
    failed: `cannot be served: ${model.error}`,
  };
  line.replaceChildren(el('strong', '', model.name), ` ${states[model.state] ?? model.state}.`);
}

function renderRate(swarm) {
  const { rate } = swarm;
  $('rate').textContent = decimal.format(rate.tokens_per_second);
  $('window').textContent = `(last ${rate.window_seconds} s)`;
  $('tokens-total').textContent = integer.format(rate.tokens_total);
  $('requests-total').textContent = integer.format(rate.requests_total);
  $('contributors-count').textContent = integer.format(swarm.contributors.length);
  // Hops between stages: straight from one contributor to the next, or relayed here.
  const { direct, relayed, direct_overhead_ms: overhead } = swarm.hops;
  $('hops').textContent = direct + relayed === 0 ? '–'
    : `${integer.format(direct)} of ${integer.format(direct + relayed)}` + (overhead === null ? '' : ` (${decimal.format(overhead)} ms each)`);
  // Spans loaded from a shard another contributor lent, or from the coordinator (or a cache).
  const { from_peers: peers, from_coordinator: coordinator } = swarm.shards_loaded;
  const ahead = swarm.fetching_ahead > 0 ? ` (${integer.format(swarm.fetching_ahead)} being fetched ahead)` : '';
  $('shards').textContent = (peers + coordinator === 0 ? '–' : `${integer.format(peers)} of ${integer.format(peers + coordinator)}`) + ahead;
}

function renderPlan(swarm) {
  const blocks = swarm.model?.blocks;
  const bar = $('plan-bar');
  if (!swarm.plan || !blocks) {
    $('plan').textContent = swarm.model
      ? 'No plan yet: the model is placed on the contributors at the first request.'
      : 'No plan: there is no model to place.';
    bar.hidden = true;
    return;
  }
  const spans = swarm.plan.spans;
  const loading = spans.filter((s) => s.state !== 'ready').length;
  $('plan').textContent = `${spans.length} span${spans.length === 1 ? '' : 's'} across ${blocks} blocks`
    + (loading > 0 ? `, ${loading} still loading.` : ', all ready.');
  bar.replaceChildren(...spans.map((span, i) => {
    const node = segment(span, i, blocks, span.state === 'ready' ? 'ready' : 'loading');
    node.append(el('span', 'label', `${span.blocks[0]}–${span.blocks[1]} · #${span.holder}${span.state === 'ready' ? '' : ' (loading)'}`));
    node.title = `Blocks ${span.blocks[0]}–${span.blocks[1]}: contributor ${span.holder} (${span.state})`
      + (span.standby.length > 0 ? `, standby ${span.standby.join(', ')}` : '');
    return node;
  }));
  bar.hidden = false;
}

/** The bar of a contributor's row: the span it holds and the ones it stands by for. */
function contributorBar(contributor, swarm) {
  const blocks = swarm.model?.blocks;
  const spans = swarm.plan?.spans ?? [];
  const words = [];
  const bar = el('div', 'blocks');
  if (contributor.holds !== null && spans[contributor.holds]) {
    const span = spans[contributor.holds];
    const ready = span.state === 'ready';
    bar.append(segment(span, contributor.holds, blocks, ready ? 'ready' : 'loading'));
    words.push(`holds ${span.blocks[0]}–${span.blocks[1]}${ready ? '' : ' (loading)'}`);
  }
  for (const i of contributor.standby_for) {
    const span = spans[i];
    if (span) {
      bar.append(segment(span, i, blocks, 'standby'));
      words.push(`stands by for ${span.blocks[0]}–${span.blocks[1]}`);
    }
  }
  if (contributor.failed) {
    words.push('failed a span');
  }
  const cell = el('td', 'span-col');
  if (blocks && spans.length > 0) {
    bar.setAttribute('role', 'img');
    bar.setAttribute('aria-label', words.length > 0 ? words.join(', ') : 'holds no span');
    cell.append(bar);
  }
  cell.append(el('span', 'hint', words.length > 0 ? words.join(', ') : '—'));
  return cell;
}

function renderContributors(swarm) {
  const rows = swarm.contributors.map((c) => {
    const row = el('tr', c.failed ? 'failed' : '');
    row.append(el('td', 'num', c.id));
    const gpu = el('td', 'gpu');
    gpu.append(el('span', '', c.adapter || 'an unnamed adapter'));
    gpu.append(el('span', 'hint', ` ${c.kind ?? 'unknown'} · ${c.backend}`));
    row.append(gpu);
    row.append(el('td', 'num', decimal.format(c.benchmark_score)));
    row.append(el('td', 'num', bytes(c.memory_budget_bytes)));
    row.append(contributorBar(c, swarm));
    return row;
  });
  $('contributors').replaceChildren(...rows);
  $('contributors-empty').hidden = rows.length > 0;
}

function renderRequests(swarm) {
  const rows = swarm.requests.map((r) => {
    const row = el('tr');
    row.append(el('td', 'num', r.id));
    const state = el('td', `state state-${r.state}`, r.state);
    row.append(state);
    row.append(el('td', 'num', integer.format(r.prompt_tokens)));
    row.append(el('td', 'num', integer.format(r.completion_tokens)));
    row.append(el('td', 'num', r.tokens_per_second === null ? '–' : decimal.format(r.tokens_per_second)));
    row.append(el('td', 'spans', r.spans || '–'));
    const started = el('td', 'num', ago(swarm.now_unix_ms - r.started_unix_ms));
    started.title = new Date(r.started_unix_ms).toLocaleString();
    row.append(started);
    return row;
  });
  $('requests').replaceChildren(...rows);
  $('requests-empty').hidden = rows.length > 0;
}

function render(swarm) {
  renderModel(swarm.model);
  renderRate(swarm);
  renderPlan(swarm);
  renderContributors(swarm);
  renderRequests(swarm);
}

async function fetchSwarm() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch('api/swarm', { cache: 'no-store', signal: abort.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body?.error?.message ?? `HTTP ${response.status}`);
    }
    return await response.json();
  } catch (error) {
    throw new Error(error.name === 'AbortError' ? `no answer within ${TIMEOUT_MS / 1000} s` : error.message);
  } finally {
    clearTimeout(timer);
  }
}

let failures = 0;
let timer = null;
let busy = false;

async function poll() {
  timer = null;
  if (busy) {
    return;
  }
  busy = true;
  try {
    const swarm = await fetchSwarm();
    render(swarm);
    failures = 0;
    setStatus('working', `Live: updated ${new Date().toLocaleTimeString()}.`);
  } catch (error) {
    failures += 1;
    setStatus('error', `Cannot reach the coordinator (${error.message}); trying again every second`
      + (failures > 1 ? ` (${failures} tries so far).` : '.'));
  } finally {
    busy = false;
  }
  schedule();
}

/** The next poll, unless the tab is hidden (it starts again when the tab is shown). */
function schedule() {
  if (timer === null && !document.hidden) {
    timer = setTimeout(poll, POLL_MS);
  }
}

document.addEventListener('visibilitychange', () => {
  if (!document.hidden && timer === null && !busy) {
    poll();
  }
});

poll();
