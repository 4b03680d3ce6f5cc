"""The container test's client (scripts/test-containers): the official openai SDK against a gateway.

  client.py url BASE        one generation, response_format url, the url fetched through the gateway
  client.py burst BASE N    N concurrent generations; every one must succeed
  client.py slow BASE       one longer generation (256x256, 50 steps: seconds even on the small demo
                            model), for the drain check
Exits non-zero with the reason on any failure.
"""

import struct
import sys
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def client(base):
    # max_retries=0: a failover must be the gateway's doing, not the SDK retrying.
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def png_size(data):
    """Width and height of a PNG after checking its signature and IHDR CRC."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"not a PNG: {data[:16]!r}")
    length, kind = struct.unpack(">I4s", data[8:16])
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    if kind != b"IHDR" or zlib.crc32(kind + body) != crc:
        raise SystemExit("PNG without a valid IHDR")
    return struct.unpack(">II", body[:8])


def generate(base, size="64x64", **extra):
    result = client(base).images.generate(
        model="tiny-sd", prompt="a red fox in the snow", n=extra.pop("n", 1), size=size,
        response_format="url", extra_body={"seed": 7, **extra},
    )
    want = tuple(int(v) for v in size.split("x"))
    for item in result.data:
        if not item.url or not item.url.startswith(base):
            raise SystemExit(f"url {item.url!r} does not go through the gateway at {base}")
        with urllib.request.urlopen(item.url, timeout=30) as response:
            data = response.read()
            kind = response.headers.get("content-type")
        if kind != "image/png" or png_size(data) != want:
            raise SystemExit(f"{item.url}: {kind}, {len(data)} bytes, not a {size} PNG")
    return len(result.data)


def main():
    mode, base = sys.argv[1], sys.argv[2]
    if mode == "url":
        print(f"url: {generate(base)} image fetched through the gateway")
    elif mode == "burst":
        n = int(sys.argv[3])
        with ThreadPoolExecutor(max_workers=4) as pool:
            done = list(pool.map(lambda _: generate(base), range(n)))
        print(f"burst: {len(done)} of {n} requests succeeded")
    elif mode == "slow":
        print(f"slow: {generate(base, size='256x256', num_inference_steps=50)} images")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
