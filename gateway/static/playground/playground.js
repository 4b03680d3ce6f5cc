// FastFusion playground: a page over this server's own OpenAI-style API, no framework, no build.
//
// Flow: /v1/models fills the model picker (and says, by a 401, whether an API key is needed);
// the chosen model's entry fills sizes, steps, guidance, schedulers, LoRAs and the modes it
// serves. "Generate" sends one streamed request (`stream: true`, `partial_images`,
// `stream_progress`) and reads its server-sent events: progress events move the bar, previews
// replace the picture, each completed image joins the gallery. "Stop" aborts the fetch; the
// server then drops its call to the worker, which cancels the job. Every url is relative, so the
// page works under a path prefix. The API key lives in localStorage and travels only in the
// Authorization header.
'use strict';

const KEY_STORAGE = 'fastfusion.apiKey';
const ENDPOINTS = {
  generate: 'v1/images/generations',
  edit: 'v1/images/edits',
  variation: 'v1/images/variations',
};
// Which /v1/models `endpoints` entry each mode needs.
const MODE_ENDPOINT = { generate: 'generations', edit: 'edits', variation: 'variations' };
const MIME = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };

const $ = (id) => document.getElementById(id);

const state = {
  /** The /v1/models entries. */
  models: [],
  /** The AbortController of the request running now, if any. */
  running: null,
  /** Seed of the latest finished image, as digits (seeds can exceed JavaScript's integers). */
  lastSeed: null,
  /** The uploaded picture for edits and variations. */
  imageFile: null,
  /** Whether anything is painted on the mask canvas. */
  painted: false,
};

// ---------------------------------------------------------------------------------------------
// API access

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || '';
}

function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set('Authorization', `Bearer ${key}`);
  return fetch(path, { ...init, headers });
}

/** An Error carrying the API's message for a refused request (OpenAI's error body). */
async function refusal(response) {
  let message = '';
  let param = null;
  try {
    const body = await response.json();
    message = body?.error?.message || '';
    param = body?.error?.param || null;
  } catch {
    message = response.statusText;
  }
  let text = `${response.status}: ${message || 'the server refused the request'}`;
  if (param) text += ` (parameter: ${param})`;
  const retryAfter = response.headers.get('Retry-After');
  if (retryAfter) text += `${/[.!?]$/.test(text) ? '' : '.'} Retry after ${retryAfter} s.`;
  const error = new Error(text);
  error.status = response.status;
  return error;
}

// ---------------------------------------------------------------------------------------------
// Models and the API key

async function loadModels() {
  setStatus('Loading models…');
  let response;
  try {
    response = await api('v1/models');
  } catch (error) {
    showError(`Cannot reach the server: ${error.message}`);
    setStatus('Offline.');
    return;
  }
  if (response.status === 401) {
    const error = await refusal(response);
    showKeyPanel(apiKey() ? `That key was refused. ${error.message}` : 'This server needs an API key.');
    state.models = [];
    fillModels();
    setStatus('Waiting for an API key.');
    return;
  }
  if (!response.ok) {
    showError((await refusal(response)).message);
    setStatus('Cannot list the models.');
    return;
  }
  const list = await response.json();
  state.models = Array.isArray(list.data) ? list.data : [];
  $('api-key-panel').hidden = !apiKey();
  $('api-key-message').textContent = 'Using the API key saved in this browser.';
  clearError();
  fillModels();
  setStatus(state.models.length ? 'Ready.' : 'No model is served yet; reload in a moment.');
}

function showKeyPanel(message) {
  $('api-key-panel').hidden = false;
  $('api-key-message').textContent = message;
  $('api-key').focus();
}

function fillModels() {
  const select = $('model');
  const previous = select.value;
  select.replaceChildren(
    ...state.models.map((model) => new Option(model.id, model.id, false, model.id === previous)),
  );
  $('generate').disabled = state.models.length === 0 || state.running !== null;
  applyModel();
}

function currentModel() {
  return state.models.find((model) => model.id === $('model').value) || null;
}

function currentMode() {
  return document.querySelector('input[name="mode"]:checked')?.value || 'generate';
}

/** Fills the settings from what the chosen model reports. */
function applyModel() {
  const model = currentModel();
  if (!model) return;
  for (const [mode, endpoint] of Object.entries(MODE_ENDPOINT)) {
    $(`mode-${mode}`).disabled = !(model.endpoints || []).includes(endpoint);
  }
  if ($(`mode-${currentMode()}`).disabled) {
    const first = Object.keys(MODE_ENDPOINT).find((mode) => !$(`mode-${mode}`).disabled);
    if (first) $(`mode-${first}`).checked = true;
  }
  fillSizes(model);
  const steps = $('steps');
  steps.max = model.max_steps || '';
  steps.value = model.default_num_inference_steps || '';
  $('guidance').value = model.default_guidance_scale ?? '';
  const n = $('n');
  n.max = model.max_n || 1;
  if (Number(n.value) > Number(n.max)) n.value = n.max;
  const scheduler = $('scheduler');
  const ownLabel = model.default_scheduler ? `model default (${model.default_scheduler})` : 'model default';
  scheduler.replaceChildren(
    new Option(ownLabel, ''),
    ...(model.schedulers || []).map((name) => new Option(name, name)),
  );
  if (model.default_strength) {
    $('strength').value = model.default_strength;
    $('strength-value').textContent = model.default_strength;
  }
  fillLoras(model.loras || []);
  applyMode();
}

/** Size choices: auto, the native size and a few aspect ratios of about its area that the model
 * accepts, and a custom field. */
function fillSizes(model) {
  const select = $('size');
  const previous = select.value;
  const options = [new Option(autoLabel(model), 'auto')];
  const [width, height] = (model.native_size || '').split('x').map(Number);
  const multiple = model.size_multiple || 8;
  if (width > 0 && height > 0) {
    const fits = (w, h) => w * h <= (model.max_pixels || Infinity);
    const round = (length) => Math.max(multiple, Math.floor(length / multiple) * multiple);
    const sizes = [[width, height]];
    // Other shapes of about the native area, then half the native size.
    const area = Math.min(width * height, model.max_pixels || Infinity);
    for (const [w, h] of [[4, 3], [3, 4], [16, 9], [9, 16]]) {
      const scale = Math.sqrt(area / (w * h));
      sizes.push([round(w * scale), round(h * scale)]);
    }
    sizes.push([round(width / 2), round(height / 2)]);
    const seen = new Set();
    for (const [w, h] of sizes) {
      const size = `${w}x${h}`;
      if (!seen.has(size) && fits(w, h)) {
        seen.add(size);
        options.push(new Option(size, size));
      }
    }
  }
  options.push(new Option('custom…', 'custom'));
  select.replaceChildren(...options);
  if ([...select.options].some((option) => option.value === previous)) select.value = previous;
  $('size-custom-label').hidden = select.value !== 'custom';
}

function autoLabel(model) {
  if (currentMode() !== 'generate') return "auto (the image's size)";
  return model.native_size ? `auto (${model.native_size})` : 'auto';
}

function fillLoras(names) {
  $('lora-panel').hidden = names.length === 0;
  $('loras').replaceChildren(
    ...names.map((name) => {
      const row = document.createElement('div');
      row.className = 'lora';
      const label = document.createElement('label');
      label.className = 'inline';
      const check = document.createElement('input');
      check.type = 'checkbox';
      check.className = 'lora-use';
      check.dataset.name = name;
      label.append(check, ` ${name}`);
      const weight = document.createElement('input');
      weight.type = 'number';
      weight.className = 'lora-weight';
      weight.step = '0.05';
      weight.value = '1';
      weight.setAttribute('aria-label', `weight of ${name}`);
      row.append(label, weight);
      return row;
    }),
  );
}

/** Shows what the mode needs: the image panel for edits and variations, the mask for edits. */
function applyMode() {
  const mode = currentMode();
  $('image-panel').hidden = mode === 'generate';
  $('mask-tools').hidden = mode !== 'edit' || !state.imageFile;
  $('mask-canvas').hidden = mode !== 'edit';
  $('generate').textContent = { generate: 'Generate', edit: 'Edit', variation: 'Make variations' }[mode];
  $('prompt').placeholder = mode === 'variation' ? 'optional for variations' : 'a lighthouse at dusk';
  const model = currentModel();
  if (model) $('size').options[0].textContent = autoLabel(model);
}

// ---------------------------------------------------------------------------------------------
// The uploaded picture and the mask

async function loadImage(file) {
  state.imageFile = file || null;
  state.painted = false;
  if (!file) {
    $('canvas-stack').hidden = true;
    applyMode();
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError(`${file.name} is not a picture this browser can read; the server takes PNG, JPEG or WebP.`);
    return;
  }
  for (const id of ['source-canvas', 'mask-canvas']) {
    $(id).width = bitmap.width;
    $(id).height = bitmap.height;
  }
  $('source-canvas').getContext('2d').drawImage(bitmap, 0, 0);
  $('canvas-stack').hidden = false;
  updateMaskState();
  applyMode();
}

function updateMaskState() {
  $('mask-state').textContent = state.painted
    ? 'Painted areas are repainted; the rest is kept.'
    : 'No mask: the whole picture changes.';
}

function setUpPainting() {
  const canvas = $('mask-canvas');
  const context = canvas.getContext('2d');
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  };
  const stroke = (from, to) => {
    context.strokeStyle = 'rgb(255, 0, 0)';
    context.lineCap = 'round';
    context.lineJoin = 'round';
    context.lineWidth = Number($('brush-size').value);
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  };
  canvas.addEventListener('pointerdown', (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
    state.painted = true;
    updateMaskState();
  });
  canvas.addEventListener('pointermove', (event) => {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  $('mask-clear').addEventListener('click', () => {
    context.clearRect(0, 0, canvas.width, canvas.height);
    state.painted = false;
    updateMaskState();
  });
}

/** The mask as OpenAI reads one: opaque where the picture stays, transparent where painted. */
function maskBlob() {
  const painted = $('mask-canvas');
  const mask = document.createElement('canvas');
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext('2d');
  context.fillStyle = 'rgb(0, 0, 0)';
  context.fillRect(0, 0, mask.width, mask.height);
  context.globalCompositeOperation = 'destination-out';
  context.drawImage(painted, 0, 0);
  return new Promise((resolve) => mask.toBlob(resolve, 'image/png'));
}

// ---------------------------------------------------------------------------------------------
// Building and running a request

/** The seed to send, as digits, or null for a random one. */
function chosenSeed() {
  if ($('seed-random').checked) return null;
  const text = $('seed').value.trim();
  return text === '' ? null : text;
}

function chosenSize() {
  const size = $('size').value;
  return size === 'custom' ? $('size-custom').value.trim() : size;
}

function chosenLoras() {
  return [...document.querySelectorAll('#loras .lora')]
    .filter((row) => row.querySelector('.lora-use').checked)
    .map((row) => ({
      name: row.querySelector('.lora-use').dataset.name,
      weight: Number(row.querySelector('.lora-weight').value),
    }));
}

/** The request for the current form: url, fetch body and the settings shown in the gallery. */
async function buildRequest() {
  const mode = currentMode();
  const settings = {
    mode,
    model: $('model').value,
    prompt: $('prompt').value,
    negative_prompt: $('negative-prompt').value,
    n: $('n').value,
    size: chosenSize(),
    num_inference_steps: $('steps').value,
    guidance_scale: $('guidance').value,
    scheduler: $('scheduler').value,
    partial_images: $('partial-images').value,
    loras: chosenLoras(),
    seed: chosenSeed(),
    strength: mode === 'generate' ? null : $('strength').value,
  };
  const fields = {
    prompt: settings.prompt,
    negative_prompt: settings.negative_prompt,
    model: settings.model,
    n: settings.n,
    size: settings.size,
    num_inference_steps: settings.num_inference_steps,
    guidance_scale: settings.guidance_scale,
    scheduler: settings.scheduler,
    strength: settings.strength,
    partial_images: settings.partial_images,
  };
  if (mode === 'generate') {
    const body = { stream: true, stream_progress: true };
    for (const [name, value] of Object.entries(fields)) {
      if (value === null || value === '') continue;
      // Numbers travel as numbers; what does not parse goes as typed, for the server to name.
      const numeric = ['n', 'num_inference_steps', 'guidance_scale', 'partial_images'].includes(name);
      body[name] = numeric && value.trim() !== '' && !Number.isNaN(Number(value)) ? Number(value) : value;
    }
    if (settings.loras.length) body.lora_settings = settings.loras;
    let json = JSON.stringify(body);
    // The seed is spliced in as typed: digits stay exact beyond 2^53, anything else the
    // server refuses by name.
    if (settings.seed !== null) {
      const literal = /^\d+$/.test(settings.seed) ? settings.seed : JSON.stringify(settings.seed);
      json = `${json.slice(0, -1)},"seed":${literal}}`;
    }
    return {
      url: ENDPOINTS.generate,
      init: { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: json },
      settings,
    };
  }
  if (!state.imageFile) throw new Error('Choose an image to upload first.');
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value !== null && value !== '') form.append(name, value);
  }
  form.append('stream', 'true');
  form.append('stream_progress', 'true');
  if (settings.seed !== null) form.append('seed', settings.seed);
  if (settings.loras.length) form.append('lora_settings', JSON.stringify(settings.loras));
  form.append('image', state.imageFile, state.imageFile.name || 'image.png');
  settings.masked = mode === 'edit' && state.painted;
  if (settings.masked) form.append('mask', await maskBlob(), 'mask.png');
  return { url: ENDPOINTS[mode], init: { method: 'POST', body: form }, settings };
}

async function run(event) {
  event.preventDefault();
  if (state.running) return;
  clearError();
  let request;
  try {
    request = await buildRequest();
  } catch (error) {
    showError(error.message);
    return;
  }
  const controller = new AbortController();
  setRunning(controller);
  setStatus('Sending…');
  const job = { settings: request.settings, completed: 0, expected: Number(request.settings.n) || 1 };
  try {
    const response = await api(request.url, { ...request.init, signal: controller.signal });
    if (!response.ok) {
      const error = await refusal(response);
      if (response.status === 401) showKeyPanel(error.message);
      throw error;
    }
    await readEvents(response, job);
    if (job.completed < job.expected) {
      throw new Error(`The connection closed after ${job.completed} of ${job.expected} images.`);
    }
    setStatus(job.expected === 1 ? 'Done.' : `Done: ${job.completed} images.`);
  } catch (error) {
    if (error.name === 'AbortError') {
      setStatus(job.completed ? `Stopped after ${job.completed} of ${job.expected} images.` : 'Stopped.');
    } else if (error instanceof TypeError) {
      // fetch and stream reads fail with a TypeError when the connection drops.
      showError(`Connection lost: ${error.message}`);
      setStatus('Failed.');
    } else {
      showError(error.message);
      setStatus('Failed.');
    }
  } finally {
    setRunning(null);
  }
}

/** Reads a server-sent event stream to its end, handling each event as it arrives. */
async function readEvents(response, job) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      handleBlock(block, job);
    }
  }
}

function handleBlock(block, job) {
  let name = 'message';
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) name = line.slice(6).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trimStart();
  }
  if (!data) return; // a keep-alive comment
  const payload = JSON.parse(data);
  // Seeds are read from the text: JSON numbers beyond 2^53 would lose digits.
  const seed = /"seed"\s*:\s*(\d+)/.exec(data)?.[1] ?? null;
  if (name === 'error') {
    const error = payload.error || {};
    const param = error.param ? ` (parameter: ${error.param})` : '';
    throw new Error(`${error.message || 'the server failed'}${param}`);
  }
  if (name === 'fastfusion.progress') {
    showProgress(payload, job);
  } else if (name.endsWith('.partial_image')) {
    showPicture(payload, `Preview ${payload.partial_image_index + 1} · seed ${seed}`);
  } else if (name.endsWith('.completed')) {
    job.completed += 1;
    const url = showPicture(payload, `Image ${job.completed} of ${job.expected} · seed ${seed}`);
    addToGallery(url, payload, seed, job.settings);
    state.lastSeed = seed;
    $('seed-reuse').disabled = false;
    if (job.completed < job.expected) setStatus(`Image ${job.completed} of ${job.expected} done…`);
  }
}

function showProgress(event, job) {
  const bar = $('progress');
  bar.hidden = false;
  const done = job.completed ? ` (${job.completed} of ${job.expected} images done)` : '';
  if (event.stage === 'queued') {
    bar.removeAttribute('value');
    setStatus(event.position ? `Queued: ${event.position} ahead.` : 'Queued: next.');
  } else if (event.stage === 'started') {
    bar.removeAttribute('value');
    setStatus(`Started: ${event.total} steps, seed ${event.seed}.`);
  } else if (event.stage === 'denoising') {
    bar.max = event.total;
    bar.value = event.step;
    setStatus(`Step ${event.step} of ${event.total}${done}`);
  }
}

/** Shows an event's picture in the preview; returns its blob url. */
function showPicture(event, caption) {
  const bytes = Uint8Array.from(atob(event.b64_json), (char) => char.charCodeAt(0));
  const blob = new Blob([bytes], { type: MIME[event.output_format] || 'image/png' });
  const url = URL.createObjectURL(blob);
  $('preview').src = url;
  $('preview-caption').textContent = caption;
  $('preview-frame').hidden = false;
  return url;
}

function addToGallery(url, event, seed, settings) {
  const item = document.createElement('li');
  item.className = 'gallery-item';
  item.dataset.seed = seed ?? '';
  const picture = document.createElement('img');
  picture.src = url;
  picture.alt = settings.prompt || 'generated image';
  const details = [
    `seed ${seed}`,
    event.size,
    `${settings.num_inference_steps || 'default'} steps`,
    `guidance ${settings.guidance_scale || 'default'}`,
    settings.scheduler || 'default scheduler',
    settings.model,
    settings.mode + (settings.masked ? ' (masked)' : ''),
  ];
  if (settings.strength !== null) details.push(`strength ${settings.strength}`);
  for (const lora of settings.loras) details.push(`${lora.name} × ${lora.weight}`);
  const line = document.createElement('p');
  line.className = 'settings';
  line.textContent = details.join(' · ');
  const prompt = document.createElement('p');
  prompt.className = 'prompt';
  prompt.textContent = settings.prompt || '(no prompt)';
  const actions = document.createElement('div');
  actions.className = 'row';
  const download = document.createElement('a');
  download.className = 'download';
  download.href = url;
  download.download = `fastfusion-${seed}.${event.output_format === 'jpeg' ? 'jpg' : event.output_format || 'png'}`;
  download.textContent = 'Download';
  const reuse = document.createElement('button');
  reuse.type = 'button';
  reuse.className = 'reuse-seed';
  reuse.textContent = 'Reuse seed';
  reuse.addEventListener('click', () => useSeed(seed));
  actions.append(download, reuse);
  item.append(picture, line, prompt, actions);
  $('gallery').prepend(item);
  $('gallery-empty').hidden = true;
}

function useSeed(seed) {
  if (seed === null) return;
  $('seed-random').checked = false;
  $('seed').disabled = false;
  $('seed').value = seed;
}

// ---------------------------------------------------------------------------------------------
// Status, errors, running state

function setStatus(text) {
  $('status').textContent = text;
}

function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}

/** Marks a request as running (its controller) or finished (null): spinner, bar and buttons. */
function setRunning(controller) {
  state.running = controller;
  const busy = controller !== null;
  $('spinner').hidden = !busy;
  $('stop').disabled = !busy;
  $('generate').disabled = busy || state.models.length === 0;
  document.body.classList.toggle('busy', busy);
  if (!busy) $('progress').hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Wiring

function start() {
  $('request-form').addEventListener('submit', run);
  $('stop').addEventListener('click', () => state.running?.abort());
  $('model').addEventListener('change', applyModel);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener('change', applyMode);
  }
  $('size').addEventListener('change', () => {
    $('size-custom-label').hidden = $('size').value !== 'custom';
  });
  $('seed-random').addEventListener('change', () => {
    $('seed').disabled = $('seed-random').checked;
  });
  $('seed-reuse').addEventListener('click', () => useSeed(state.lastSeed));
  $('strength').addEventListener('input', () => {
    $('strength-value').textContent = $('strength').value;
  });
  $('image-file').addEventListener('change', () => loadImage($('image-file').files[0]));
  $('api-key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('api-key').value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    $('api-key').value = '';
    loadModels();
  });
  $('api-key-forget').addEventListener('click', () => {
    localStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  setUpPainting();
  setRunning(null);
  loadModels();
}

start();
