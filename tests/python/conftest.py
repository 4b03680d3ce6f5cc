"""Shared fixtures for the Python tests: the real ``fastfusion-gateway`` binary, started once per
session with its embedded worker on the tiny fixture model, and small image helpers.

The binary comes from ``FASTFUSION_BIN_DIR`` (``scripts/test`` sets it to cargo's output) or
``target/debug``. The gateway listens on a free port (``FASTFUSION_PORT=0``); the address is read
from its ``listening on http://ADDR`` log line, then ``/ready`` is polled until the model is
loaded. Images are written and read with the standard library only (zlib + struct), so the tests
need no imaging package.
"""

import json
import os
import queue
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


def png_bytes(width, height, pixel):
    """A PNG of one colour; ``pixel`` is an RGB or RGBA tuple, which picks the colour type."""
    channels = len(pixel)
    color_type = {3: 2, 4: 6}[channels]
    row = b"\x00" + bytes(pixel) * width
    raw = row * height

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_size(data):
    """(width, height) from a PNG's IHDR; fails the test if ``data`` is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {data[:16]!r}"
    return struct.unpack(">II", data[16:24])


class Gateway:
    """A running gateway process; ``base_url`` is ``http://ADDR``."""

    def __init__(self, process, base_url, lines):
        self.process = process
        self.base_url = base_url
        self.lines = lines

    def output(self):
        return "\n".join(self.lines)


def _binary(name="fastfusion-gateway"):
    bin_dir = Path(os.environ.get("FASTFUSION_BIN_DIR", REPO / "target" / "debug"))
    if not bin_dir.is_absolute():
        bin_dir = REPO / bin_dir
    path = bin_dir / name
    if not path.exists():
        pytest.fail(f"{path} is not built; run `cargo build -p {name}` first")
    return path


def _tiny_config(directory, name="tiny-sd"):
    config = {
        "name": name,
        "pipeline": {
            "hf_model_id": str(REPO / "tests/fixtures/models/tiny-sd15"),
            "max_n": 3,
            "torch_dtype_init": "float32",
            "torch_dtype_run": "float32",
            "torch_device": "cpu",
            "enable_cpu_offload": False,
            "enable_vae_slicing": False,
            "enable_vae_tiling": False,
            "global_guidance_scale": 7.5,
            "global_num_inference_steps": 3,
            "max_pixels": 65536,
            "generations_config": {"enabled": True},
            "edits_config": {"enabled": True},
            # No vision model, and a host that refuses at once should one be asked anyway:
            # variations without a prompt use the worker's default prompt.
            "variations_config": {
                "enabled": True,
                "vision_model": "",
                "vision_model_host": "http://127.0.0.1:9",
            },
        },
        "generation_presets": {
            "standard": {"guidance_scale": 7.5, "num_inference_steps": 3},
            "hd": {"guidance_scale": 5.0, "num_inference_steps": 4},
        },
    }
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _pump(stream, lines, found, marker="listening on http://"):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        lines.append(line)
        if marker in line:
            found.put(line.split(marker, 1)[1].split()[0])


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    config = _tiny_config(tmp_path_factory.mktemp("config"))
    data = tmp_path_factory.mktemp("data")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FASTFUSION_WORKERS", "BASE_URL", "FASTFUSION_API_KEYS")
    }
    env.update(
        CONFIG_PATH=str(config),
        IMAGE_DATA_PATH=str(data),
        FASTFUSION_HOST="127.0.0.1",
        FASTFUSION_PORT="0",
        FASTFUSION_LOGLEVEL="info",
        NO_COLOR="1",
    )
    gw = start_gateway(env)
    try:
        yield gw
    finally:
        stop_gateway(gw.process)


def start_gateway(env, wait_ready=True):
    """Starts the gateway binary with ``env``, reads its address from the log and, with
    ``wait_ready``, polls ``/ready`` until a worker has loaded its model."""
    process = subprocess.Popen(
        [str(_binary())],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines, found = [], queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines, found), daemon=True).start()
    try:
        address = found.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        stop_gateway(process)
        pytest.fail("gateway printed no 'listening on' line:\n" + "\n".join(lines))
    gw = Gateway(process, f"http://{address}", lines)
    deadline = time.monotonic() + START_TIMEOUT_S
    while wait_ready:
        try:
            with urllib.request.urlopen(f"{gw.base_url}/ready", timeout=5) as reply:
                if reply.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_gateway(process)
            pytest.fail("gateway never became ready:\n" + gw.output())
        time.sleep(0.2)
    return gw


def start_worker(config, env):
    """Starts a standalone ``fastfusion-worker serve`` on a free port; returns (process,
    ``host:port``). Stop it with ``stop_gateway``."""
    process = subprocess.Popen(
        [str(_binary("fastfusion-worker")), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines, found = [], queue.Queue()
    threading.Thread(
        target=_pump, args=(process.stdout, lines, found, "listening on "), daemon=True
    ).start()
    try:
        return process, found.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        stop_gateway(process)
        pytest.fail("worker printed no 'listening on' line:\n" + "\n".join(lines))


def stop_gateway(process):
    """SIGTERM, then SIGKILL after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def client(gateway):
    """The official openai SDK pointed at the gateway."""
    import openai

    return openai.OpenAI(
        base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    )
