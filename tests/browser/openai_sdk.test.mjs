// The official openai Node SDK against the real gateway. The SDK streams its uploads without
// `Expect: 100-continue`, so a refusal that comes before the body is read (401 wrong key, 404
// endpoint switched off, 413 too large) used to reach it as "Connection error": the gateway
// closed the connection with the upload unread. Each refusal must arrive as its status, the
// SDK's own error class, and OpenAI's error code.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import OpenAI, { toFile } from 'openai';

import * as h from './harness.mjs';

const KEY = 'sk-node-sdk-test';
const LIMIT = 1024 * 1024;

const cleanup = [];
let base;
/** About 0.8 MB: within the body limit (what a refused request sends is read and discarded up
 * to it), far larger than any socket buffer. */
const large = h.noisePng(512, 512, 3);
/** About 1.5 MB: over the body limit. */
const tooLarge = h.noisePng(720, 720, 7);

const client = (apiKey) => new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0, timeout: 120_000 });
const upload = (bytes, name = 'image.png') => toFile(bytes, name, { type: 'image/png' });

/** The error `promise` rejects with. */
async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('the request succeeded');
}

describe('openai Node SDK', { timeout: 300_000 }, () => {
  before(async () => {
    assert.ok(large.length > LIMIT * 0.7 && large.length < LIMIT, `${large.length} bytes`);
    assert.ok(tooLarge.length > LIMIT * 1.3, `${tooLarge.length} bytes`);
    const dir = h.tempDir(cleanup);
    const worker = await h.startWorker(
      h.tinyConfig(dir, 'tiny-sd', { variations_config: { enabled: false } }),
      cleanup,
    );
    ({ base } = await h.startGateway(
      {
        FASTFUSION_WORKERS: worker.endpoint,
        FASTFUSION_API_KEYS: KEY,
        FASTFUSION_MAX_BODY_BYTES: String(LIMIT),
        IMAGE_DATA_PATH: `${dir}/data`,
      },
      cleanup,
    ));
  });

  after(() => h.runCleanup(cleanup));

  it('gets a 401 for a wrong key while uploading, not a connection error', async () => {
    const error = await failure(client('sk-wrong').images.edit({ image: await upload(large), prompt: 'a hat' }));
    assert.ok(error instanceof OpenAI.AuthenticationError, `${error.constructor.name}: ${error.message}`);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'invalid_api_key');
  });

  it('gets a 404 for a switched-off endpoint while uploading', async () => {
    const error = await failure(client(KEY).images.createVariation({ image: await upload(large) }));
    assert.ok(error instanceof OpenAI.NotFoundError, `${error.constructor.name}: ${error.message}`);
    assert.equal(error.status, 404);
    assert.equal(error.code, 'task_disabled');
    assert.match(error.message, /variations_config\.enabled/);
  });

  it('gets a 413 for an upload over the body limit', async () => {
    const error = await failure(client(KEY).images.edit({ image: await upload(tooLarge), prompt: 'a hat' }));
    assert.ok(error instanceof OpenAI.APIError && !(error instanceof OpenAI.APIConnectionError), `${error.constructor.name}: ${error.message}`);
    assert.equal(error.status, 413);
    assert.equal(error.code, 'request_too_large');
  });

  it('edits with the right key', async () => {
    const result = await client(KEY).images.edit({
      image: await upload(h.solidPng(64, 64, [10, 120, 200])),
      prompt: 'a hat',
      response_format: 'b64_json',
    });
    const png = h.decodePng(Buffer.from(result.data[0].b64_json, 'base64'));
    assert.deepEqual([png.width, png.height], [64, 64]);
  });
});
