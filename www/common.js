// What the volunteer page (volunteer.js) and the page the widget frames (embed.js) share: starting
// the wasm contributor, and the words for its states. The wasm module is imported only when a
// contributor starts, so a page that has not been asked to contribute downloads none of it.

/** What each contributor status means to a volunteer. */
export const STATUS_TEXT = {
  loading: 'Loading the engine…',
  connecting: 'Connecting to the coordinator…',
  idle: 'Ready, waiting for work.',
  working: 'Working.',
  paused: 'Paused.',
  error: 'Something went wrong.',
  unsupported: 'This browser cannot contribute.',
};

/** "No WebGPU" explained, or null when this browser has it (adapter checks come later). */
export function missingWebGpu() {
  if (!window.isSecureContext) {
    return 'This page is not on a secure (https) connection, so the browser does not offer WebGPU to it.';
  }
  if (!('gpu' in navigator)) {
    return 'This browser does not offer WebGPU, so it cannot contribute. Recent Chrome and Edge on desktop and Android have it.';
  }
  return null;
}

/**
 * The adapter WebGPU would give the contributor, as one line, without downloading anything;
 * null when there is none.
 */
export async function describeAdapter() {
  const adapter = await navigator.gpu.requestAdapter();
  if (adapter === null) {
    return null;
  }
  const info = adapter.info ?? {};
  const parts = [info.description, info.vendor, info.architecture].filter((p) => p);
  return parts.length > 0 ? parts.join(' · ') : 'a WebGPU adapter (the browser does not name it)';
}

/**
 * Imports the wasm contributor and starts it: resolves to the `Contributor`, rejects with an
 * Error whose message a volunteer can read.
 */
export async function startContributor(options, onEvent) {
  let module;
  try {
    module = await import('./pkg/tessera_web.js');
    await module.default();
  } catch (error) {
    throw new Error(`The contributor could not be loaded from this coordinator (${error.message}). Its operator may need to run \`cargo run -p xtask -- build-web\`.`);
  }
  if (typeof module.Contributor?.start !== 'function') {
    throw new Error('This coordinator serves an engine without the contributor: its operator needs to rebuild it (`cargo run -p xtask -- build-web`).');
  }
  return module.Contributor.start(JSON.stringify({ coordinator: location.origin, ...options }), (event) => {
    try {
      onEvent(typeof event === 'string' ? JSON.parse(event) : event);
    } catch (error) {
      console.error('tessera: an event handler failed', error);
    }
  });
}

/** Bytes as "12.3 MB". */
export function formatBytes(bytes) {
  if (bytes < 1e3) {
    return `${bytes} B`;
  }
  if (bytes < 1e6) {
    return `${Math.round(bytes / 1e3)} kB`;
  }
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

/** The contributor's stats, parsed; null when it has none to give. */
export function readStats(contributor) {
  try {
    return JSON.parse(contributor.stats());
  } catch {
    return null;
  }
}
