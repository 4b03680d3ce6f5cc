"""Streaming (``stream=True``) through the official openai SDK's own iterator against the real
gateway (conftest.py starts it on the tiny fixture model): previews then the final image as
OpenAI's typed events, for generations and edits, and the 400 for a url asked of a stream."""

import base64
import io

import openai
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)

from conftest import png_bytes, png_size


def png_of(event):
    data = base64.b64decode(event.b64_json)
    png_size(data)
    return data


def test_generate_stream_sends_partial_images_then_the_completed_image(client):
    settings = {"seed": 7, "num_inference_steps": 4}
    events = list(
        client.images.generate(
            prompt="a red apple",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body=settings,
        )
    )
    assert [type(event) for event in events] == [
        ImageGenPartialImageEvent,
        ImageGenPartialImageEvent,
        ImageGenCompletedEvent,
    ], events
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for event in events:
        assert png_size(png_of(event)) == (64, 64)
        assert event.size == "64x64"
        assert event.output_format == "png"
        assert event.background == "auto"
        assert event.created_at > 1_700_000_000
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert completed.usage.total_tokens == 0
    # The previews are earlier states of the picture, not the picture itself.
    assert png_of(events[0]) != png_of(completed)

    # The streamed image is the one the same request gives without streaming.
    plain = client.images.generate(
        prompt="a red apple", size="64x64", response_format="b64_json", extra_body=settings
    )
    assert png_of(plain.data[0]) == png_of(completed)


def test_edit_stream_sends_image_edit_events(client):
    image = ("image.png", io.BytesIO(png_bytes(64, 48, (200, 40, 40))), "image/png")
    events = list(
        client.images.edit(
            image=image,
            prompt="make it blue",
            stream=True,
            partial_images=1,
            extra_body={"seed": 3},
        )
    )
    assert [type(event) for event in events] == [
        ImageEditPartialImageEvent,
        ImageEditCompletedEvent,
    ], events
    assert events[0].type == "image_edit.partial_image"
    assert events[0].partial_image_index == 0
    assert events[1].type == "image_edit.completed"
    assert events[1].size == "64x48"
    assert png_size(png_of(events[1])) == (64, 48)


def test_stream_without_partial_images_sends_one_event_per_image(client):
    events = list(client.images.generate(prompt="a boat", size="32x32", n=2, stream=True))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert png_of(events[0]) != png_of(events[1])


def test_stream_refuses_url_images(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", stream=True, response_format="url")
    assert caught.value.body["param"] == "response_format"
