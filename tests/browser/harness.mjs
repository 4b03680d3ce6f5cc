// Shared pieces of the browser and Node SDK tests: the real binaries (fastfusion-gateway and
// fastfusion-worker from FASTFUSION_BIN_DIR, else target/debug) started on free ports with the
// tiny fixture model, a reverse proxy that serves the gateway under a path prefix (as an ingress
// does), Debian's Chromium driven by playwright-core, and screenshots kept under
// target/playground-screenshots/ for CI to collect.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { deflateSync, inflateSync } from 'node:zlib';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SCREENSHOTS = path.join(REPO, 'target', 'playground-screenshots');
const START_TIMEOUT_MS = 120_000;

function binary(name) {
  const dir = path.resolve(REPO, process.env.FASTFUSION_BIN_DIR || path.join('target', 'debug'));
  const file = path.join(dir, name);
  if (!existsSync(file)) {
    throw new Error(`${file} is not built; run \`cargo build -p fastfusion-gateway -p fastfusion-worker\` (scripts/test does)`);
  }
  return file;
}

/** A temporary directory removed by `cleanup()`. */
export function tempDir(cleanup) {
  const dir = mkdtempSync(path.join(tmpdir(), 'fastfusion-browser-'));
  cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A model_config.json for the tiny fixture model named `name`, written into `dir`. */
export function tinyConfig(dir, name, pipeline = {}) {
  const config = {
    name,
    pipeline: {
      hf_model_id: path.join(REPO, 'tests/fixtures/models/tiny-sd15'),
      max_n: 3,
      torch_dtype_init: 'float32',
      torch_dtype_run: 'float32',
      torch_device: 'cpu',
      enable_cpu_offload: false,
      enable_vae_slicing: false,
      enable_vae_tiling: false,
      global_guidance_scale: 7.5,
      global_num_inference_steps: 4,
      max_pixels: 65536,
      // As many as the default scheduler (PNDM) can place: a job the tests stop halfway.
      max_steps: 900,
      generations_config: { enabled: true },
      edits_config: { enabled: true },
      variations_config: { enabled: true, vision_model: '' },
      ...pipeline,
    },
    generation_presets: { standard: { guidance_scale: 7.5, num_inference_steps: 4 } },
  };
  const file = path.join(dir, `${name}.json`);
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

/** Starts `program`; resolves once it has printed every marker, with the text after each. */
function startProcess(program, args, env, markers, cleanup) {
  const child = spawn(program, args, {
    env: { ...cleanEnv(), FASTFUSION_LOGLEVEL: 'info', NO_COLOR: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines = [];
  cleanup.push(() => stop(child));
  return new Promise((resolve, reject) => {
    const found = new Map();
    const timer = setTimeout(
      () => reject(new Error(`${path.basename(program)} did not start:\n${lines.join('\n')}`)),
      START_TIMEOUT_MS,
    );
    const onData = (chunk) => {
      for (const line of chunk.toString().split('\n')) {
        if (!line) continue;
        lines.push(line);
        for (const marker of markers) {
          const at = line.indexOf(marker);
          if (at >= 0 && !found.has(marker)) {
            found.set(marker, line.slice(at + marker.length).trim().split(/[\s"]/)[0]);
          }
        }
      }
      if (found.size === markers.length) {
        clearTimeout(timer);
        resolve({ child, lines, found });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${path.basename(program)} exited with ${code}:\n${lines.join('\n')}`));
    });
  });
}

/** The environment without the variables that would change what the binaries do. */
function cleanEnv() {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    const ours = ['FASTFUSION_', 'OTEL_', 'AWS_', 'HF_'].some((prefix) => key.startsWith(prefix));
    if (!ours && !['BASE_URL', 'CONFIG_PATH', 'IMAGE_DATA_PATH'].includes(key)) env[key] = value;
  }
  return env;
}

function stop(child) {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
}

/** A standalone worker on free gRPC and metrics ports. */
export async function startWorker(config, cleanup) {
  const { found, lines } = await startProcess(
    binary('fastfusion-worker'),
    ['serve', '--config', config, '--listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0'],
    {},
    ['listening on ', 'metrics at '],
    cleanup,
  );
  return { endpoint: found.get('listening on '), metrics: found.get('metrics at '), lines };
}

/** The gateway with `env` (FASTFUSION_WORKERS, keys, ...), on a free port, ready to serve. */
export async function startGateway(env, cleanup) {
  const { found, lines } = await startProcess(
    binary('fastfusion-gateway'),
    [],
    { FASTFUSION_HOST: '127.0.0.1', FASTFUSION_PORT: '0', ...env },
    ['listening on '],
    cleanup,
  );
  const base = found.get('listening on ');
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    try {
      const reply = await fetch(`${base}/ready`);
      if (reply.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`gateway never became ready:\n${lines.join('\n')}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return { base, lines };
}

/**
 * A reverse proxy serving `proxy.target` (http://host:port, set once known) under `prefix`
 * (e.g. `/ff`), the prefix stripped, as an ingress with a rewrite does. `cut()` drops every
 * connection in flight; `nextBody(suffix)` captures the next request body sent to a path.
 */
export async function startPrefixProxy(prefix, cleanup) {
  const open = new Set();
  /** Waiters for the next request body sent to a path: [suffix, resolve]. */
  const recorders = [];
  const proxy = { target: null, origin: '', cut: () => {}, nextBody: () => null };
  const server = http.createServer((request, response) => {
    const upstream = new URL(proxy.target);
    const waiting = recorders.findIndex(([suffix]) => request.url.endsWith(suffix));
    if (waiting >= 0) {
      const [[, resolve]] = recorders.splice(waiting, 1);
      const chunks = [];
      request.on('data', (chunk) => chunks.push(chunk));
      request.on('end', () => resolve({ headers: request.headers, body: Buffer.concat(chunks) }));
    }
    if (!request.url.startsWith(`${prefix}/`)) {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('outside the prefix');
      return;
    }
    const forwarded = http.request(
      {
        host: upstream.hostname,
        port: upstream.port,
        method: request.method,
        path: request.url.slice(prefix.length),
        headers: { ...request.headers, host: upstream.host },
      },
      (reply) => {
        response.writeHead(reply.statusCode, reply.headers);
        reply.pipe(response);
      },
    );
    forwarded.on('error', () => response.destroy());
    // A client that goes away takes the upstream call with it, as a real proxy's does.
    response.on('close', () => {
      if (!response.writableFinished) forwarded.destroy();
    });
    request.pipe(forwarded);
  });
  server.on('connection', (socket) => {
    open.add(socket);
    socket.on('close', () => open.delete(socket));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanup.push(() => {
    for (const socket of open) socket.destroy();
    server.close();
  });
  proxy.origin = `http://127.0.0.1:${server.address().port}`;
  proxy.cut = () => {
    for (const socket of open) socket.destroy();
  };
  // The bytes of the next request to a path ending in `suffix`, exactly as the browser sent them.
  proxy.nextBody = (suffix) => new Promise((resolve) => recorders.push([suffix, resolve]));
  return proxy;
}

/** Debian's Chromium, headless, with the flags this machine needs (no network beyond loopback). */
export async function launchChromium(cleanup) {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.FASTFUSION_CHROMIUM || '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`${executablePath} not found: install Debian's chromium (apt-get install chromium), or set FASTFUSION_CHROMIUM`);
  }
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  cleanup.push(() => browser.close());
  return browser;
}

/** Saves a screenshot of `page` as target/playground-screenshots/NAME.png. */
export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  const file = path.join(SCREENSHOTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

/** The value of `series` (name and labels, as the page prints them) on a Prometheus page; 0
 * when absent. */
export async function metric(url, series) {
  const text = await (await fetch(url)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.trim().split(/\s+/).pop()) : 0;
}

/** Runs the cleanups in reverse order, ignoring their failures. */
export async function runCleanup(cleanup) {
  for (const step of cleanup.reverse()) {
    try {
      await step();
    } catch {
      // best effort
    }
  }
}

/** A PNG of `width`x`height` in one colour, made without an image library. */
export function solidPng(width, height, [r, g, b]) {
  return png(width, height, () => [r, g, b]);
}

/** A PNG of seeded random pixels: it hardly compresses, so it is about 3 bytes a pixel. */
export function noisePng(width, height, seed = 1) {
  let state = seed >>> 0;
  const next = () => {
    // xorshift32: deterministic, good enough for pixels
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) & 0xff;
  };
  return png(width, height, () => [next(), next(), next()]);
}

/** An RGB PNG whose pixels come from `pixel()`, row by row. */
function png(width, height, pixel) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (bytes) => {
    let c = 0xffffffff;
    for (const byte of bytes) c = crcTable[(c ^ byte) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, 'latin1');
    data.copy(out, 8);
    out.writeUInt32BE(crc(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; // bit depth
  header[9] = 2; // RGB
  const raw = Buffer.alloc(height * (1 + width * 3));
  let at = 0;
  for (let y = 0; y < height; y += 1) {
    raw[at++] = 0; // filter: none
    for (let x = 0; x < width; x += 1) {
      for (const value of pixel()) raw[at++] = value;
    }
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** Decodes an 8-bit RGBA or RGB, non-interlaced PNG (what Chromium's canvas writes). */
export function decodePng(buffer) {
  let offset = 8;
  let width = 0;
  let height = 0;
  let colorType = 0;
  const data = [];
  while (offset < buffer.length) {
    const length = buffer.readUInt32BE(offset);
    const type = buffer.toString('latin1', offset + 4, offset + 8);
    const body = buffer.subarray(offset + 8, offset + 8 + length);
    if (type === 'IHDR') {
      width = body.readUInt32BE(0);
      height = body.readUInt32BE(4);
      if (body[8] !== 8 || body[12] !== 0) throw new Error('only 8-bit non-interlaced PNGs');
      colorType = body[9];
    } else if (type === 'IDAT') {
      data.push(body);
    }
    offset += 12 + length;
  }
  const channels = { 2: 3, 6: 4 }[colorType];
  if (!channels) throw new Error(`PNG colour type ${colorType} not handled`);
  const raw = inflateSync(Buffer.concat(data));
  const stride = width * channels;
  const pixels = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y += 1) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x += 1) {
      const left = x >= channels ? pixels[y * stride + x - channels] : 0;
      const up = y > 0 ? pixels[(y - 1) * stride + x] : 0;
      const corner = x >= channels && y > 0 ? pixels[(y - 1) * stride + x - channels] : 0;
      let value = line[x];
      if (filter === 1) value += left;
      else if (filter === 2) value += up;
      else if (filter === 3) value += Math.floor((left + up) / 2);
      else if (filter === 4) {
        const p = left + up - corner;
        const pa = Math.abs(p - left);
        const pb = Math.abs(p - up);
        const pc = Math.abs(p - corner);
        value += pa <= pb && pa <= pc ? left : pb <= pc ? up : corner;
      }
      pixels[y * stride + x] = value & 0xff;
    }
  }
  return { width, height, channels, pixels };
}
