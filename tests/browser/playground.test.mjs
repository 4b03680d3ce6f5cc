// The web playground in a real browser: Debian's headless Chromium driven by playwright-core,
// against the real gateway with two real workers (the tiny fixture model under two names, the
// second with edits and variations switched off), API keys on, a concurrency limit of 1, served
// under a path prefix by a reverse proxy with BASE_URL set to match.
//
// Each state the page goes through is checked for the elements it should show and saved as a
// screenshot under target/playground-screenshots/ (CI keeps them as artefacts).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, afterEach, before, describe, it } from 'node:test';

import * as h from './harness.mjs';

const KEY = 'sk-playground-test-key';
const PREFIX = '/ff';
/** Steps of a job the tests stop: far more than they ever wait for. */
const LONG_STEPS = 900;
const WAIT = { timeout: 120_000 };

const cleanup = [];
let gateway;
let proxy;
let workers;
let browser;
let page;
/** Every url the page requested, to check the key never travels in one. */
const requested = [];
/** Uncaught errors in the page's script. */
const pageErrors = [];

/** The gateway's own metrics page (open, not behind the proxy). */
const gatewayMetric = (series) => h.metric(`${gateway.base}/metrics`, series);
const cancellations = () =>
  h.metric(workers.a.metrics, 'fastfusion_worker_cancellations_total{reason="client_gone"}');

async function waitFor(check, what, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const text = (selector) => page.locator(selector).innerText();
const galleryCount = () => page.locator('#gallery .gallery-item').count();

/** Waits until a run has finished: no spinner, Stop disabled. */
async function idle() {
  await page.waitForFunction(
    () => document.getElementById('spinner').hidden && document.getElementById('stop').disabled,
    null,
    WAIT,
  );
}

/** The page is not busy and offers to run again. */
async function assertIdle() {
  assert.equal(await page.locator('#spinner').isHidden(), true, 'spinner still shown');
  assert.equal(await page.locator('#stop').isDisabled(), true, 'Stop still enabled');
  assert.equal(await page.locator('#generate').isEnabled(), true, 'cannot run again');
  assert.equal(await page.locator('#progress').isHidden(), true, 'progress bar still shown');
}

/** Sets a range input as a user dragging it would. */
async function setRange(selector, value) {
  await page.locator(selector).evaluate((input, to) => {
    input.value = to;
    input.dispatchEvent(new Event('input', { bubbles: true }));
  }, String(value));
}

/**
 * Starts recording, in order, every status and caption text the page shows and every change of
 * its busy state (read by `history`). Mutation records keep each text set even when several
 * events arrive in one network read and the observer runs once for all of them.
 */
async function recordOutput() {
  await page.evaluate(() => {
    const seen = [];
    window.playgroundHistory = seen;
    new MutationObserver((records) => {
      for (const record of records) {
        const id = record.target.id;
        if (record.type === 'childList' && (id === 'status' || id === 'preview-caption')) {
          for (const node of record.addedNodes) seen.push({ what: id, text: node.textContent });
        } else if (record.type === 'attributes' && record.target === document.body) {
          seen.push({ what: 'busy', now: !(record.oldValue || '').split(' ').includes('busy') });
        }
      }
    }).observe(document.body, {
      subtree: true,
      childList: true,
      attributes: true,
      attributeFilter: ['class'],
      attributeOldValue: true,
    });
  });
}

/** What `recordOutput` saw while the page was busy with the last run. */
async function history() {
  const seen = await page.evaluate(() => window.playgroundHistory);
  const start = seen.findIndex((event) => event.what === 'busy' && event.now);
  const end = seen.findIndex((event, at) => at > start && event.what === 'busy' && !event.now);
  assert.ok(start >= 0 && end > start, JSON.stringify(seen));
  return seen.slice(start, end);
}

async function setSeed(seed) {
  if (await page.locator('#seed-random').isChecked()) await page.uncheck('#seed-random');
  await page.fill('#seed', String(seed));
}

async function chooseMode(mode) {
  await page.check(`#mode-${mode}`);
}

/** The gallery's newest picture, through its Download link: { name, bytes }. */
async function downloadNewest() {
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('#gallery .gallery-item:first-child .download'),
  ]);
  return { name: download.suggestedFilename(), bytes: readFileSync(await download.path()) };
}

/** Largest per-channel difference between two decoded PNGs of the same size. */
function maxDiff(a, b) {
  const x = h.decodePng(a);
  const y = h.decodePng(b);
  assert.deepEqual([x.width, x.height, x.channels], [y.width, y.height, y.channels]);
  let max = 0;
  for (let i = 0; i < x.pixels.length; i += 1) max = Math.max(max, Math.abs(x.pixels[i] - y.pixels[i]));
  return max;
}

/** The same generation straight through the API (no browser), as PNG bytes. */
async function direct(body) {
  const reply = await fetch(`${gateway.base}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}` },
    body: JSON.stringify({ ...body, response_format: 'b64_json' }),
  });
  assert.equal(reply.status, 200, await reply.clone().text());
  return Buffer.from((await reply.json()).data[0].b64_json, 'base64');
}

/** The parts of a multipart body: name → { filename, body }. */
function multipartParts(contentType, body) {
  const boundary = /boundary=(?:"([^"]+)"|([^;]+))/.exec(contentType);
  assert.ok(boundary, contentType);
  const marker = Buffer.from(`--${boundary[1] || boundary[2]}`);
  const parts = {};
  let at = body.indexOf(marker);
  while (at >= 0) {
    const next = body.indexOf(marker, at + marker.length);
    if (next < 0) break;
    const part = body.subarray(at + marker.length + 2, next - 2);
    const split = part.indexOf('\r\n\r\n');
    const head = part.subarray(0, split).toString();
    const name = /name="([^"]+)"/.exec(head)?.[1];
    parts[name] = { filename: /filename="([^"]*)"/.exec(head)?.[1], body: part.subarray(split + 4) };
    at = next;
  }
  return parts;
}

describe('playground', { timeout: 900_000 }, () => {
  before(async () => {
    const dir = h.tempDir(cleanup);
    const [a, b] = await Promise.all([
      h.startWorker(h.tinyConfig(dir, 'tiny-sd'), cleanup),
      h.startWorker(
        h.tinyConfig(dir, 'tiny-sd-b', {
          edits_config: { enabled: false },
          variations_config: { enabled: false },
        }),
        cleanup,
      ),
    ]);
    workers = { a, b };
    proxy = await h.startPrefixProxy(PREFIX, cleanup);
    gateway = await h.startGateway(
      {
        FASTFUSION_WORKERS: `${a.endpoint},${b.endpoint}`,
        FASTFUSION_DEFAULT_MODEL: 'tiny-sd',
        FASTFUSION_API_KEYS: KEY,
        FASTFUSION_MAX_CONCURRENT_REQUESTS: '1',
        BASE_URL: `${proxy.origin}${PREFIX}`,
        IMAGE_DATA_PATH: `${dir}/data`,
      },
      cleanup,
    );
    proxy.target = gateway.base;
    // Both workers reported: the page lists both models.
    await waitFor(async () => {
      const reply = await fetch(`${gateway.base}/v1/models`, { headers: { authorization: `Bearer ${KEY}` } });
      return reply.ok && (await reply.json()).data.length === 2;
    }, 'both models listed');
    browser = await h.launchChromium(cleanup);
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
    page = await context.newPage();
    page.on('request', (request) => requested.push(request.url()));
    page.on('pageerror', (error) => pageErrors.push(error.message));
  });

  after(() => h.runCleanup(cleanup));

  afterEach(() => {
    assert.deepEqual(pageErrors.splice(0), [], 'the page script threw');
  });

  it('asks for the API key, keeps it in local storage and never in a url', async () => {
    await page.goto(`${proxy.origin}${PREFIX}/playground`);
    await page.locator('#api-key-panel').waitFor(WAIT);
    assert.match(await text('#api-key-message'), /needs an API key/);
    assert.equal(await page.locator('#model option').count(), 0);
    assert.equal(await page.locator('#generate').isDisabled(), true);
    await h.screenshot(page, '01-api-key-required');

    await page.fill('#api-key', 'sk-wrong');
    await page.click('#api-key-save');
    await page.waitForFunction(() => /refused/.test(document.getElementById('api-key-message').textContent));
    assert.match(await text('#api-key-message'), /Incorrect API key/);

    await page.fill('#api-key', KEY);
    await page.click('#api-key-save');
    await page.waitForFunction(() => document.querySelectorAll('#model option').length === 2, null, WAIT);
    assert.deepEqual(
      await page.locator('#model option').evaluateAll((options) => options.map((o) => o.value)),
      ['tiny-sd', 'tiny-sd-b'],
    );
    assert.equal(await page.evaluate(() => localStorage.getItem('fastfusion.apiKey')), KEY);
    assert.match(await text('#api-key-message'), /saved in this browser/);
    // Sizes, steps and schedulers come from the model's /v1/models entry.
    assert.equal(await page.inputValue('#steps'), '4');
    assert.equal(await page.getAttribute('#steps', 'max'), '900');
    assert.equal(await page.inputValue('#guidance'), '7.5');
    assert.match(await text('#size'), /auto \(64x64\)/);
    assert.ok((await page.locator('#scheduler option').count()) > 3);
    assert.equal(await page.locator('#lora-panel').isHidden(), true, 'no LoRAs: no picker');
    await h.screenshot(page, '02-models-loaded');

    // The prefix root serves the same page, and a reload keeps the key.
    await page.goto(`${proxy.origin}${PREFIX}/`);
    await page.waitForFunction(() => document.querySelectorAll('#model option').length === 2, null, WAIT);
    for (const url of requested) assert.ok(!url.includes(KEY), `the key travelled in ${url}`);
    assert.ok(requested.every((url) => url.startsWith(`${proxy.origin}${PREFIX}/`)), requested.join('\n'));
  });

  it('generates with live previews and a progress indicator, and keeps seed and settings', async () => {
    const settings = { prompt: 'a red circle on a blue background', size: '64x64', num_inference_steps: 120, seed: 1234 };
    await chooseMode('generate');
    await page.fill('#prompt', settings.prompt);
    await page.selectOption('#size', settings.size);
    await page.fill('#steps', String(settings.num_inference_steps));
    await page.selectOption('#partial-images', '2');
    await setSeed(settings.seed);
    const count = await galleryCount();
    await recordOutput();
    // 120 steps: previews after steps 40 and 80, each on screen for 40 steps, long enough for the
    // screenshot below to catch one on any machine.
    await page.click('#generate');
    await page.waitForFunction(
      () => document.getElementById('preview-caption').textContent.startsWith('Preview'),
      null,
      WAIT,
    );
    await h.screenshot(page, '03-generating-with-preview');
    await page.waitForFunction((n) => document.querySelectorAll('#gallery .gallery-item').length === n, count + 1, WAIT);
    await idle();
    await assertIdle();
    assert.equal(await text('#status'), 'Done.');
    // While it was busy: progress events moved the status (and bar), both previews were shown,
    // then the final image.
    const seen = await history();
    const texts = (what) => seen.filter((event) => event.what === what).map((event) => event.text);
    assert.ok(texts('status').some((status) => /^Step \d+ of \d+/.test(status)), JSON.stringify(seen));
    assert.deepEqual(texts('preview-caption'), [
      'Preview 1 · seed 1234',
      'Preview 2 · seed 1234',
      'Image 1 of 1 · seed 1234',
    ]);
    const caption = await text('#gallery .gallery-item:first-child .settings');
    for (const part of ['seed 1234', '64x64', '120 steps', 'guidance 7.5', 'tiny-sd', 'generate']) {
      assert.ok(caption.includes(part), `${part} missing from "${caption}"`);
    }
    await h.screenshot(page, '04-generated');

    // The download is the picture the API makes for the same settings.
    const { name, bytes } = await downloadNewest();
    assert.equal(name, 'fastfusion-1234.png');
    const png = h.decodePng(bytes);
    assert.deepEqual([png.width, png.height], [64, 64]);
    assert.ok(maxDiff(bytes, await direct({ ...settings, model: 'tiny-sd' })) <= 1);
    // "Reuse seed" puts the seed back.
    await page.check('#seed-random');
    await page.click('#gallery .gallery-item:first-child .reuse-seed');
    assert.equal(await page.inputValue('#seed'), '1234');
    assert.equal(await page.locator('#seed-random').isChecked(), false);
  });

  it('stops a long job, and the worker is free again', async () => {
    const cancelledBefore = await cancellations();
    await page.fill('#prompt', 'a very slow painting');
    await page.fill('#steps', String(LONG_STEPS));
    await page.click('#generate');
    await page.waitForFunction(() => /^Step \d+ of \d+/.test(document.getElementById('status').textContent), null, WAIT);
    assert.equal(await page.locator('#progress').isVisible(), true);
    await h.screenshot(page, '05-long-job-running');
    await page.click('#stop');
    await idle();
    await assertIdle();
    assert.equal(await text('#status'), 'Stopped.');
    assert.equal(await page.locator('#error').isHidden(), true, 'stopping is not an error');
    await h.screenshot(page, '06-stopped');
    // The worker cancelled the job (its metric), and a short job runs at once.
    await waitFor(async () => (await cancellations()) > cancelledBefore, 'the worker to cancel the job');
    assert.equal(await h.metric(workers.a.metrics, 'fastfusion_worker_queue_depth'), 0);
    await page.fill('#steps', '4');
    const count = await galleryCount();
    const started = Date.now();
    await page.click('#generate');
    await page.waitForFunction((n) => document.querySelectorAll('#gallery .gallery-item').length === n, count + 1, WAIT);
    await idle();
    assert.equal(await text('#status'), 'Done.');
    console.log(`# a 4-step job after the stop took ${Date.now() - started} ms`);
  });

  it('edits with a painted mask, and makes variations', async () => {
    const source = h.solidPng(64, 64, [200, 40, 40]);
    await chooseMode('edit');
    assert.equal(await page.locator('#image-panel').isVisible(), true);
    await page.setInputFiles('#image-file', { name: 'red.png', mimeType: 'image/png', buffer: source });
    await page.locator('#mask-canvas').waitFor();
    assert.match(await text('#mask-state'), /No mask/);
    // Paint a stroke across the left half, in the middle.
    const box = await page.locator('#mask-canvas').boundingBox();
    await setRange('#brush-size', 16);
    await page.mouse.move(box.x + box.width * 0.1, box.y + box.height * 0.5);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.4, box.y + box.height * 0.5, { steps: 8 });
    await page.mouse.up();
    assert.match(await text('#mask-state'), /Painted areas are repainted/);
    await page.fill('#prompt', 'a straw hat');
    await page.fill('#steps', '4');
    await setRange('#strength', 1);
    await h.screenshot(page, '07-mask-painted');
    const count = await galleryCount();

    // The body as it reached the proxy: what the browser put on the wire.
    const [request] = await Promise.all([proxy.nextBody('/v1/images/edits'), page.click('#generate')]);
    const parts = multipartParts(request.headers['content-type'], request.body);
    assert.deepEqual(parts.image.body, source, 'the uploaded file is sent as it is');
    assert.equal(parts.prompt.body.toString(), 'a straw hat');
    assert.equal(parts.stream.body.toString(), 'true');
    assert.equal(parts.strength.body.toString(), '1');
    // OpenAI's mask: transparent where painted, opaque elsewhere, the image's size.
    const mask = h.decodePng(parts.mask.body);
    assert.deepEqual([mask.width, mask.height, mask.channels], [64, 64, 4]);
    const alpha = (x, y) => mask.pixels[(y * mask.width + x) * 4 + 3];
    assert.equal(alpha(16, 32), 0, 'painted pixel is transparent');
    assert.equal(alpha(56, 32), 255, 'unpainted pixel is opaque');
    assert.equal(alpha(16, 4), 255, 'outside the stroke is opaque');
    let transparent = 0;
    for (let i = 3; i < mask.pixels.length; i += 4) if (mask.pixels[i] < 128) transparent += 1;
    assert.ok(transparent > 64 * 64 * 0.05 && transparent < 64 * 64 * 0.4, `${transparent} pixels painted`);

    await page.waitForFunction((n) => document.querySelectorAll('#gallery .gallery-item').length === n, count + 1, WAIT);
    await idle();
    await assertIdle();
    assert.match(await text('#gallery .gallery-item:first-child .settings'), /edit \(masked\) · strength 1/);
    const edited = h.decodePng((await downloadNewest()).bytes);
    assert.deepEqual([edited.width, edited.height], [64, 64]);
    await h.screenshot(page, '08-edited');

    // A variation of the same upload, without a prompt.
    await chooseMode('variation');
    assert.equal(await page.locator('#mask-tools').isHidden(), true, 'variations take no mask');
    await page.fill('#prompt', '');
    const [variation] = await Promise.all([proxy.nextBody('/v1/images/variations'), page.click('#generate')]);
    const sent = multipartParts(variation.headers['content-type'], variation.body);
    assert.equal(sent.mask, undefined);
    assert.deepEqual(sent.image.body, source);
    await page.waitForFunction((n) => document.querySelectorAll('#gallery .gallery-item').length === n, count + 2, WAIT);
    await idle();
    assert.match(await text('#gallery .gallery-item:first-child .settings'), /variation/);
    await h.screenshot(page, '09-variation');
  });

  it('serves several models, each with its own modes', async () => {
    await page.selectOption('#model', 'tiny-sd-b');
    assert.equal(await page.locator('#mode-edit').isDisabled(), true);
    assert.equal(await page.locator('#mode-variation').isDisabled(), true);
    assert.equal(await page.locator('#mode-generate').isChecked(), true, 'switched to a mode it serves');
    const served = () => gatewayMetric('fastfusion_gateway_images_generated_total{model="tiny-sd-b"}');
    const servedBefore = await served();
    await page.fill('#prompt', 'a green square');
    await page.selectOption('#size', '64x64');
    await page.fill('#steps', '4');
    await page.fill('#n', '2');
    const count = await galleryCount();
    const [request] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/v1/images/generations')),
      page.click('#generate'),
    ]);
    const sent = JSON.parse(request.postData());
    assert.deepEqual([sent.model, sent.n], ['tiny-sd-b', 2]);
    await page.waitForFunction((n) => document.querySelectorAll('#gallery .gallery-item').length === n, count + 2, WAIT);
    await idle();
    assert.equal(await text('#status'), 'Done: 2 images.');
    assert.match(await text('#gallery .gallery-item:first-child .settings'), /tiny-sd-b/);
    assert.equal(await served(), servedBefore + 2);
    await page.fill('#n', '1');
    await h.screenshot(page, '10-second-model');
    await page.selectOption('#model', 'tiny-sd');
    assert.equal(await page.locator('#mode-edit').isEnabled(), true);
  });

  it("shows the API's message for a bad size and never leaves a spinner", async () => {
    await chooseMode('generate');
    await page.fill('#prompt', 'a kite');
    await page.selectOption('#size', 'custom');
    await page.fill('#size-custom', '100x100');
    await page.click('#generate');
    await page.locator('#error').waitFor(WAIT);
    await idle();
    await assertIdle();
    const error = await text('#error');
    assert.match(error, /^400: .*multiples of 8.*\(parameter: size\)$/s);
    assert.equal(await text('#status'), 'Failed.');
    await h.screenshot(page, '11-error-bad-size');
    await page.selectOption('#size', 'auto');
  });

  it('offers the LoRAs a model lists, and shows the refusal of an unknown one', async () => {
    // The list says a LoRA exists that the worker does not have (as when it was just removed).
    await page.route('**/v1/models', async (route) => {
      const reply = await route.fetch();
      const body = await reply.json();
      body.data[0].loras = ['ghost-style'];
      await route.fulfill({ response: reply, json: body });
    });
    await page.reload();
    await page.locator('#lora-panel').waitFor(WAIT);
    assert.match(await text('#loras'), /ghost-style/);
    await page.check('#loras .lora-use');
    await page.fill('#loras .lora-weight', '0.7');
    await page.fill('#prompt', 'a kite');
    const [request] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/v1/images/generations')),
      page.click('#generate'),
    ]);
    assert.deepEqual(JSON.parse(request.postData()).lora_settings, [{ name: 'ghost-style', weight: 0.7 }]);
    await page.locator('#error').waitFor(WAIT);
    await idle();
    await assertIdle();
    assert.match(await text('#error'), /^400: unknown LoRA 'ghost-style'.*\(parameter: lora_settings\)$/s);
    await h.screenshot(page, '12-error-unknown-lora');
    await page.unroute('**/v1/models');
    await page.reload();
    await page.waitForFunction(() => document.querySelectorAll('#model option').length === 2, null, WAIT);
    assert.equal(await page.locator('#lora-panel').isHidden(), true);
  });

  it('shows a 429 with its Retry-After while the server is busy', async () => {
    // Another client holds the gateway's only slot with a long streamed job.
    const cancelledBefore = await cancellations();
    const other = new AbortController();
    const reply = await fetch(`${gateway.base}/v1/images/generations`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}` },
      body: JSON.stringify({ prompt: 'x', size: '64x64', num_inference_steps: LONG_STEPS, stream: true, stream_progress: true }),
      signal: other.signal,
    });
    assert.equal(reply.status, 200);
    const reader = reply.body.getReader();
    await reader.read(); // its first event: it is running
    try {
      await page.fill('#prompt', 'a kite');
      await page.fill('#steps', '4');
      await page.click('#generate');
      await page.locator('#error').waitFor(WAIT);
      await idle();
      await assertIdle();
      assert.match(await text('#error'), /^429: .*busy.*\. Retry after 1 s\.$/s);
      await h.screenshot(page, '13-error-busy-429');
    } finally {
      other.abort();
    }
    await waitFor(async () => (await cancellations()) > cancelledBefore, 'the other job to be cancelled');
  });

  it('reports a dropped connection and never leaves a spinner', async () => {
    const cancelledBefore = await cancellations();
    await page.fill('#prompt', 'a slow painting');
    await page.fill('#steps', String(LONG_STEPS));
    await page.click('#generate');
    await page.waitForFunction(() => /^Step \d+/.test(document.getElementById('status').textContent), null, WAIT);
    proxy.cut();
    await page.locator('#error').waitFor(WAIT);
    await idle();
    await assertIdle();
    assert.match(await text('#error'), /^Connection lost/);
    await h.screenshot(page, '14-error-connection-lost');
    // The proxy dropped its call too, so the worker cancelled the job.
    await waitFor(async () => (await cancellations()) > cancelledBefore, 'the worker to cancel the job');
  });
});
