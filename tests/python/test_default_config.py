"""The repository's own ``model_config.json``, as the README's run command serves it: every
endpoint its model can serve is switched on, so generations, edits (with and without a mask)
and variations (without a prompt: no vision model is configured with a key, so the worker's
default prompt) all answer 200 with real images, and ``/v1/models`` says so."""

import base64
import json
import os
import urllib.request
import uuid

import pytest

from conftest import REPO, png_bytes, png_size, start_gateway, stop_gateway


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FASTFUSION_") and key not in ("BASE_URL",)
    }
    env.update(
        CONFIG_PATH=str(REPO / "model_config.json"),
        IMAGE_DATA_PATH=str(tmp_path_factory.mktemp("data")),
        FASTFUSION_HOST="127.0.0.1",
        FASTFUSION_PORT="0",
        FASTFUSION_LOGLEVEL="info",
        NO_COLOR="1",
    )
    gateway = start_gateway(env)
    try:
        yield gateway.base_url
    finally:
        stop_gateway(gateway.process)


def post(base, path, body, content_type="application/json"):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=body, method="POST", headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200
        data = json.loads(reply.read())["data"]
    return [png_size(base64.b64decode(item["b64_json"])) for item in data]


def form(fields, files):
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files.items():
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"'
            "\r\nContent-Type: image/png\r\n\r\n"
        ).encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_models_list_every_endpoint(default_gateway):
    with urllib.request.urlopen(default_gateway + "/v1/models", timeout=30) as reply:
        (model,) = json.loads(reply.read())["data"]
    assert model["endpoints"] == ["generations", "edits", "variations"]


def test_generations_edits_and_variations_answer(default_gateway):
    fast = {"num_inference_steps": "2", "response_format": "b64_json", "seed": "3"}
    (size,) = post(default_gateway, "/v1/images/generations",
                   {"prompt": "a lighthouse", "num_inference_steps": 2, "response_format": "b64_json"})
    assert size[0] > 0 and size[1] > 0
    picture = png_bytes(64, 64, (30, 90, 200))
    # A mask without alpha: white pixels are repainted.
    mask = png_bytes(64, 64, (255, 255, 255))
    for files in ({"image": picture}, {"image": picture, "mask": mask}):
        body, content_type = form({"prompt": "make it red", **fast}, files)
        assert post(default_gateway, "/v1/images/edits", body, content_type) == [(64, 64)]
    body, content_type = form(fast, {"image": picture})
    assert post(default_gateway, "/v1/images/variations", body, content_type) == [(64, 64)]
