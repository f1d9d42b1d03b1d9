// Runs the engine's kernel self-test and shows it. Tests call window.tesseraSelfTest(seed).
import init, { selfTest } from './pkg/tessera_web.js';

const status = document.getElementById('status');
const table = document.getElementById('results');
const ready = init();

function show(result) {
  const rows = result.reports.map((r) => {
    const tr = document.createElement('tr');
    const cells = [r.kernel, r.passed ? 'ok' : 'FAILED', r.max_error === null ? 'NaN' : r.max_error.toExponential(2), r.tolerance.toExponential(0)];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    tr.children[1].className = r.passed ? 'ok' : 'failed';
    tr.title = r.case;
    return tr;
  });
  table.tBodies[0].replaceChildren(...rows);
  table.hidden = false;
  const failed = result.reports.filter((r) => !r.passed).length;
  const name = result.adapter.name || 'WebGPU adapter';
  status.textContent = failed === 0
    ? `All ${result.reports.length} checks passed on ${name}.`
    : `${failed} of ${result.reports.length} checks failed on ${name}.`;
}

async function run(seed) {
  await ready;
  if (!navigator.gpu) {
    throw new Error('This browser has no WebGPU, so it cannot run Tessera\'s kernels.');
  }
  status.textContent = 'Running…';
  const result = JSON.parse(await selfTest(seed));
  show(result);
  return result;
}

window.tesseraSelfTest = run;
document.getElementById('run').addEventListener('click', () => {
  run(Math.floor(Math.random() * 2 ** 32)).catch((error) => { status.textContent = String(error.message ?? error); });
});
