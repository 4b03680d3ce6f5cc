"""Images in an S3-compatible bucket, against a real S3 server (moto's, started here on a free
port) and real gateway processes.

Gateway A generates with its embedded worker on the tiny fixture model and writes to
``s3://BUCKET/shared``; gateway B has no worker and serves what A stored: the replicas share
nothing but the bucket and the url signing key. Gateway C sweeps ``s3://BUCKET/sweep`` with a
short TTL: old images go, young ones and objects that are not images stay. A gateway whose
bucket is missing or whose endpoint is unreachable stops at start-up naming IMAGE_DATA_PATH.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import boto3
import pytest
from moto.server import ThreadedMotoServer

from conftest import _binary, _tiny_config, png_size, start_gateway, stop_gateway

BUCKET = "fastfusion-images"
API_KEY = "sk-s3-test-key"
SIGNING_KEY = "a-signing-key-shared-by-replicas"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
# Seconds; the sweep test waits about TTL + a few intervals. moto reports last_modified to the
# whole second, so an object can look up to 1 s older than it is.
SWEEP_TTL = 5
SWEEP_INTERVAL = 1


@pytest.fixture(scope="module")
def s3():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def gateway_env(endpoint, **settings):
    """The environment of a gateway on ``endpoint``'s S3: none of the caller's AWS or gateway
    settings leak in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "FASTFUSION_"))
        and key not in ("BASE_URL", "IMAGE_DATA_PATH", "CONFIG_PATH")
    }
    env.update(
        CREDENTIALS,
        AWS_ENDPOINT_URL=endpoint,
        FASTFUSION_HOST="127.0.0.1",
        FASTFUSION_PORT="0",
        FASTFUSION_LOGLEVEL="info",
        NO_COLOR="1",
    )
    env.update(settings)
    return env


class Started:
    """Gateway processes started by one test module, stopped at its end."""

    def __init__(self):
        self.processes = []

    def start(self, env, wait_ready):
        gw = start_gateway(env, wait_ready)
        self.processes.append(gw.process)
        return gw

    def stop(self):
        for process in self.processes:
            stop_gateway(process)


@pytest.fixture(scope="module")
def gateways():
    started = Started()
    yield started
    started.stop()


def request(url, body=None, key=None):
    """(status, headers, body bytes) of a GET, or of a JSON POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data)
    if body is not None:
        req.add_header("content-type", "application/json")
    if key is not None:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def keys(client, prefix):
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def test_one_replica_writes_another_serves(s3, gateways, tmp_path):
    endpoint, client = s3
    shared = f"s3://{BUCKET}/shared"
    writer_env = gateway_env(
        endpoint,
        IMAGE_DATA_PATH=shared,
        CONFIG_PATH=str(_tiny_config(tmp_path)),
        FASTFUSION_API_KEYS=f"sk-other,{API_KEY}",
        FASTFUSION_URL_SIGNING_KEY=SIGNING_KEY,
        FASTFUSION_IMAGE_TTL_SECS="0",
    )
    writer = gateways.start(writer_env, wait_ready=True)
    # No worker at all: this replica only serves stored images.
    reader_env = gateway_env(
        endpoint,
        IMAGE_DATA_PATH=shared,
        FASTFUSION_WORKERS="127.0.0.1:9",
        FASTFUSION_URL_SIGNING_KEY=SIGNING_KEY,
        FASTFUSION_IMAGE_TTL_SECS="0",
    )
    reader = gateways.start(reader_env, wait_ready=False)

    prompt = {"prompt": "a lighthouse", "size": "64x32", "n": 2}
    status, _, body = request(f"{writer.base_url}/v1/images/generations", prompt)
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "missing_api_key"

    status, _, body = request(f"{writer.base_url}/v1/images/generations", prompt, key=API_KEY)
    assert status == 200, body
    urls = [item["url"] for item in json.loads(body)["data"]]
    stored = keys(client, "shared/")
    assert len(stored) == 2, stored
    for url in urls:
        path = url.removeprefix(writer.base_url)
        assert "?expires=" in path and "&sig=" in path, url
        key = "shared/" + path.split("/v1/images/data/", 1)[1].split("?", 1)[0]
        assert key in stored, (key, stored)

        status, headers, from_writer = request(writer.base_url + path)
        assert status == 200
        status, headers, from_reader = request(reader.base_url + path)
        assert status == 200, from_reader
        assert headers["content-type"] == "image/png"
        assert from_reader == from_writer
        assert png_size(from_reader) == (64, 32)
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == from_reader

        # Without its signature the url opens nothing, on either replica.
        status, _, body = request(reader.base_url + path.split("?", 1)[0])
        assert status == 403, body
        assert json.loads(body)["error"]["code"] == "invalid_signature"


def test_the_sweeper_deletes_old_images_and_keeps_young_ones(s3, gateways):
    endpoint, client = s3

    def put(key):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"\x89PNG not really")

    old = "sweep/" + "a" * 32 + ".png"
    not_an_image = "sweep/README.txt"
    outside = "elsewhere/" + "b" * 32 + ".png"
    for key in (old, not_an_image, outside):
        put(key)
    sweeper_env = gateway_env(
        endpoint,
        IMAGE_DATA_PATH=f"s3://{BUCKET}/sweep",
        FASTFUSION_WORKERS="127.0.0.1:9",
        FASTFUSION_IMAGE_TTL_SECS=str(SWEEP_TTL),
        FASTFUSION_SWEEP_INTERVAL_SECS=str(SWEEP_INTERVAL),
    )
    gateways.start(sweeper_env, wait_ready=False)

    def wait_gone(key):
        deadline = time.monotonic() + SWEEP_TTL + 10 * SWEEP_INTERVAL
        while key in keys(client, key):
            assert time.monotonic() < deadline, f"{key} was never swept"
            time.sleep(0.2)
        return time.monotonic()

    # The old image goes once it is past the TTL, whichever sweep sees it first.
    wait_gone(old)
    young = "sweep/" + "c" * 32 + ".webp"
    put(young)
    written = time.monotonic()
    # Two sweeps at least, while the young image is still well under the TTL.
    time.sleep(2 * SWEEP_INTERVAL)
    assert young in keys(client, young), "a young image was deleted"
    gone = wait_gone(young)
    assert gone - written >= SWEEP_TTL - 1, "deleted before its TTL"
    assert keys(client, "sweep/") == {not_an_image}
    assert keys(client, "elsewhere/") == {outside}


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint"])
def test_an_unusable_store_stops_start_up(s3, case):
    endpoint, _ = s3
    location, endpoint = {
        "missing bucket": ("s3://no-such-bucket/x", endpoint),
        "unreachable endpoint": (f"s3://{BUCKET}/x", "http://127.0.0.1:9"),
    }[case]
    env = gateway_env(endpoint, IMAGE_DATA_PATH=location, FASTFUSION_WORKERS="127.0.0.1:9")
    result = subprocess.run(
        [str(_binary())], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "IMAGE_DATA_PATH" in stderr and location in stderr, stderr
