"""The README's recipes for OpenAI clients that hard-code OpenAI model names, checked with the
request bodies those clients send (read from their source; see each test), against the real
gateway in front of two real workers. With several models served, an unknown name is a 404, so
the recipe's aliases (``FASTFUSION_MODEL_ALIASES``) are what routes ``dall-e-2``,
``gpt-image-1`` and ``gpt-image-1-mini`` to the default model; the gateway's
``fastfusion_gateway_images_generated_total{model=...}`` series says which model served each.

LibreChat and n8n read ``data[0].b64_json`` without asking for it (OpenAI's gpt-image models
always answer inline), so gpt-image names get ``b64_json`` by default; Open WebUI asks for it.
"""

import base64
import json
import os
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import (
    _tiny_config,
    png_bytes,
    png_size,
    start_gateway,
    start_worker,
    stop_gateway,
)

KEY = "sk-clients-test"
ALIASES = "dall-e-2=tiny-sd,gpt-image-1=tiny-sd,gpt-image-1-mini=tiny-sd"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Gateway URL for two models, ``tiny-sd`` (the default, the aliases' target) and
    ``tiny-sd-b``, with the README's alias recipe and an API key, as the clients use it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FASTFUSION_") and key not in ("BASE_URL", "CONFIG_PATH")
    }
    env.update(FASTFUSION_LOGLEVEL="info", NO_COLOR="1")
    config_dir = tmp_path_factory.mktemp("configs")
    workers = [
        start_worker(_tiny_config(config_dir, name), env) for name in ("tiny-sd", "tiny-sd-b")
    ]
    gateway_env = dict(
        env,
        FASTFUSION_WORKERS=",".join(endpoint for _, endpoint in workers),
        FASTFUSION_DEFAULT_MODEL="tiny-sd",
        FASTFUSION_MODEL_ALIASES=ALIASES,
        FASTFUSION_API_KEYS=KEY,
        IMAGE_DATA_PATH=str(tmp_path_factory.mktemp("data")),
        FASTFUSION_HOST="127.0.0.1",
        FASTFUSION_PORT="0",
    )
    gateway = start_gateway(gateway_env)
    try:
        wait_for_models(gateway.base_url, 2)
        yield gateway.base_url
    finally:
        stop_gateway(gateway.process)
        for process, _ in workers:
            stop_gateway(process)


def wait_for_models(base, count):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = call(base, "GET", "/v1/models")
        if reply[0] == 200 and len(reply[1]["data"]) == count:
            return
        time.sleep(0.2)
    pytest.fail(f"the gateway never listed {count} models")


def call(base, method, path, body=None, content_type="application/json"):
    """(status, parsed JSON body) of one request with the API key."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if body is not None:
        headers["Content-Type"] = content_type
        if isinstance(body, dict):
            body = json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(fields, files):
    """A multipart body: text ``fields`` first, then ``files`` as (name, filename, bytes)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    for name, filename, data in files:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def images_served(base, model):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    series = f'fastfusion_gateway_images_generated_total{{model="{model}"}} '
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.split()[-1])
    return 0.0


def inline_image(reply):
    """The first image of a 200 reply, which must be inline (the clients read b64_json)."""
    status, body = reply
    assert status == 200, body
    item = body["data"][0]
    assert "url" not in item, item
    return png_size(base64.b64decode(item["b64_json"]))


def served_by_default_model(base, send):
    """Runs ``send()`` and checks the default model (not the other one) made its image."""
    before = images_served(base, "tiny-sd"), images_served(base, "tiny-sd-b")
    result = send()
    after = images_served(base, "tiny-sd"), images_served(base, "tiny-sd-b")
    assert after == (before[0] + 1, before[1]), (before, after)
    return result


def test_an_openai_name_without_an_alias_is_model_not_found(served):
    status, body = call(served, "POST", "/v1/images/generations", {"model": "dall-e-3", "prompt": "x"})
    assert status == 404, body
    assert body["error"]["code"] == "model_not_found"
    assert "tiny-sd" in body["error"]["message"]


def test_open_webui(served):
    # Open WebUI, backend/open_webui/routers/images.py (open-webui/open-webui): image_generations()
    # posts {model, prompt, n, size (its IMAGE_SIZE setting), response_format: "b64_json"} to
    # {IMAGES_OPENAI_API_BASE_URL}/images/generations, the model defaulting to "dall-e-2"
    # (get_image_model); response_format is left out only for models matching "^gpt-image".
    body = {"model": "dall-e-2", "prompt": "a red apple", "n": 1, "size": "64x64",
            "response_format": "b64_json"}
    size = served_by_default_model(
        served, lambda: inline_image(call(served, "POST", "/v1/images/generations", body))
    )
    assert size == (64, 64)
    # image_edits(): a multipart form of model, prompt, n, size, response_format, then the
    # picture as `image` (or `image[]` parts for several), file name a UUID with its extension.
    form, content_type = multipart(
        [("model", "dall-e-2"), ("prompt", "make it green"), ("n", "1"), ("size", "64x64"),
         ("response_format", "b64_json")],
        [("image", f"{uuid.uuid4()}.png", png_bytes(64, 64, (200, 40, 40)))],
    )
    size = served_by_default_model(
        served,
        lambda: inline_image(call(served, "POST", "/v1/images/edits", form, content_type)),
    )
    assert size == (64, 64)


def test_librechat(served):
    # LibreChat, api/app/clients/tools/structured/OpenAIImageTools.js (danny-avila/LibreChat):
    # the image_gen_oai tool calls openai.images.generate({model: IMAGE_GEN_OAI_MODEL ||
    # "gpt-image-1", prompt, n, background: "auto", output_format: "png", output_compression:
    # undefined for png, quality: "auto", size: "auto"}) against IMAGE_GEN_OAI_BASEURL and reads
    # resp.data[0].b64_json.
    body = {"model": "gpt-image-1", "prompt": "a red apple", "n": 1, "background": "auto",
            "output_format": "png", "quality": "auto", "size": "auto"}
    size = served_by_default_model(
        served, lambda: inline_image(call(served, "POST", "/v1/images/generations", body))
    )
    assert size == (64, 64)  # auto: the model's native size
    # image_edit_oai posts a form-data body of model, prompt, quality "auto", size "auto" and
    # the pictures as `image[]` parts to /images/edits, and reads data[0].b64_json too.
    form, content_type = multipart(
        [("model", "gpt-image-1"), ("prompt", "make it green"), ("quality", "auto"),
         ("size", "auto")],
        [("image[]", "photo.png", png_bytes(48, 32, (200, 40, 40)))],
    )
    size = served_by_default_model(
        served,
        lambda: inline_image(call(served, "POST", "/v1/images/edits", form, content_type)),
    )
    assert size == (48, 32)  # auto: the input's size


def test_n8n(served):
    # n8n, packages/@n8n/nodes-langchain/nodes/vendors/OpenAi/v2/actions/image/
    # generate.operation.ts (n8n-io/n8n): node version 2.2 defaults the model to
    # "gpt-image-1-mini" and posts {prompt, model, ...options} to /images/generations, without
    # response_format for models starting with "gpt-image", then reads each data[].b64_json.
    # With no options set:
    body = {"prompt": "a red apple", "model": "gpt-image-1-mini"}
    assert served_by_default_model(
        served, lambda: inline_image(call(served, "POST", "/v1/images/generations", body))
    ) == (64, 64)
    # With its Quality option (high / medium / low for gpt-image models; descriptions.ts):
    body = {"prompt": "a red apple", "model": "gpt-image-1-mini", "quality": "medium"}
    assert served_by_default_model(
        served, lambda: inline_image(call(served, "POST", "/v1/images/generations", body))
    ) == (64, 64)
