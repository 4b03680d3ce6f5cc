"""The official openai Python SDK against the real gateway (conftest.py starts it on the tiny
fixture model): generations, edits with one and several images, with and without a mask,
variations, and the SDK's exception for a 400 naming the parameter."""

import base64
import io
import urllib.request

import openai
import pytest

from conftest import png_bytes, png_size


def upload(width, height, pixel, name="image.png"):
    """A named in-memory file, as the SDK's multipart encoder takes it."""
    return (name, io.BytesIO(png_bytes(width, height, pixel)), "image/png")


def decoded(item):
    data = base64.b64decode(item.b64_json)
    png_size(data)
    return data


def test_generate_b64_json(client):
    result = client.images.generate(
        prompt="a red apple", n=2, size="64x64", response_format="b64_json"
    )
    assert len(result.data) == 2
    for item in result.data:
        assert png_size(decoded(item)) == (64, 64)
        assert item.url is None


def test_generate_url(client):
    result = client.images.generate(prompt="a lighthouse", size="64x32")
    url = result.data[0].url
    assert url.startswith("http://127.0.0.1:") and "/v1/images/data/" in url
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.headers["content-type"] == "image/png"
        assert png_size(reply.read()) == (64, 32)


def test_edit_one_image_without_mask(client):
    result = client.images.edit(
        image=upload(64, 48, (200, 40, 40)),
        prompt="make it blue",
        response_format="b64_json",
        extra_body={"strength": 0.6, "seed": 3},
    )
    # No size: the input's.
    assert png_size(decoded(result.data[0])) == (64, 48)
    assert result.data[0].model_extra.get("seed") == 3


def test_edit_several_images(client):
    images = [
        upload(64, 64, (10, 200, 10), "a.png"),
        upload(32, 32, (200, 10, 10), "b.png"),
    ]
    result = client.images.edit(
        image=images, prompt="combine them", n=2, size="32x32", response_format="b64_json"
    )
    assert [png_size(decoded(item)) for item in result.data] == [(32, 32), (32, 32)]


def test_edit_with_alpha_mask(client):
    result = client.images.edit(
        image=upload(64, 64, (120, 120, 120)),
        mask=upload(64, 64, (0, 0, 0, 0), "mask.png"),
        prompt="a flower",
        response_format="url",
    )
    with urllib.request.urlopen(result.data[0].url, timeout=30) as reply:
        assert png_size(reply.read()) == (64, 64)


def test_create_variation(client):
    result = client.images.create_variation(
        image=upload(64, 32, (40, 80, 160)), n=1, response_format="b64_json"
    )
    assert png_size(decoded(result.data[0])) == (64, 32)


def test_bad_requests_raise_bad_request_error_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="100x100")
    assert caught.value.body["param"] == "size"
    assert caught.value.status_code == 400

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("notes.txt", io.BytesIO(b"not an image"), "text/plain"), prompt="x"
        )
    assert caught.value.body["param"] == "image"

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=upload(32, 32, (1, 2, 3)), prompt="x", extra_body={"strength": 2}
        )
    assert caught.value.body["param"] == "strength"
