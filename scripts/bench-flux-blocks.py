#!/usr/bin/env python3
"""One FLUX.1 double-stream and one single-stream block: ours (candle) against diffusers, same weights.

    /work/venv/bin/python scripts/bench-flux-blocks.py [--worker target/release/fastfusion-worker]
        [--sizes 512,1024] [--repeat 2] [--rounds 2]

Writes random blocks at FLUX.1's width (hidden 3072 = 24 heads x 128, MLP ratio 4, RoPE axes 16/56/56)
into a temporary directory outside the repository (deleted at the end), then, for each image size
(512 text tokens + (size/16)^2 image tokens), runs `fastfusion-worker bench --mode flux-blocks` and this
script's diffusers child in alternation, `--rounds` times each, every run in a fresh process. Each run
does one untimed call per block, then `--repeat` timed ones; it reports the mean seconds and the memory
the calls took above what was resident before them (the peak resident set size is reset through
/proc/self/clear_refs before each block, so Linux only). The summary gives medians over rounds, the
ratio ours / diffusers, and what the figures imply for a 28-step 1024x1024 FLUX.1-dev image
(19 double + 38 single blocks per step, one transformer pass per step: dev has no CFG batch).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "fastfusion-bench-flux-blocks"
HEADS, HEAD_DIM, AXES = 24, 128, [16, 56, 56]
TEXT_TOKENS = 512
DOUBLE, SINGLE = 19, 38  # FLUX.1 blocks per transformer pass
LINE = re.compile(MARKER + r" block=(\w+) image_tokens=(\d+) text_tokens=(\d+) seconds=([\d.]+) "
                  r"rss_before_kib=(-?\d+) peak_kib=(-?\d+)")


def status_kib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return -1


def write_weights(directory, dtype):
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    tensors = {}
    for prefix, block in (
        ("transformer_blocks.0.", FluxTransformerBlock(dim, HEADS, HEAD_DIM)),
        ("single_transformer_blocks.0.", FluxSingleTransformerBlock(dim, HEADS, HEAD_DIM)),
    ):
        for name, tensor in block.state_dict().items():
            tensors[prefix + name] = tensor.to(dtype).contiguous()
        del block
    save_file(tensors, directory / "blocks.safetensors")
    config = {
        "_class_name": "FluxTransformer2DModel",
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "axes_dims_rope": AXES,
        "num_layers": 1,
        "num_single_layers": 1,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    # The worker resolves --model DIR as a diffusers repo directory, which has one of these.
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    return sum(t.numel() for t in tensors.values())


def diffusers_child(directory, size, repeat, dtype_name):
    """Times diffusers' blocks and prints lines in the worker's format."""
    import torch
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    dim = HEADS * HEAD_DIM
    weights = load_file(directory / "blocks.safetensors")
    with torch.device("meta"):
        double = FluxTransformerBlock(dim, HEADS, HEAD_DIM)
        single = FluxSingleTransformerBlock(dim, HEADS, HEAD_DIM)
    for prefix, block in (("transformer_blocks.0.", double), ("single_transformer_blocks.0.", single)):
        state = {k[len(prefix):]: v.to(dtype) for k, v in weights.items() if k.startswith(prefix)}
        block.load_state_dict(state, assign=True)
        block.eval()
    del weights
    rows = cols = size // 16
    img_ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", dtype)
    ids = torch.cat([torch.zeros(TEXT_TOKENS, 3, dtype=dtype), img_ids], dim=0)
    rotary = FluxPosEmbed(theta=10000, axes_dim=AXES)(ids)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, rows * cols, dim, generator=g).to(dtype)
    txt = torch.randn(1, TEXT_TOKENS, dim, generator=g).to(dtype)
    temb = torch.randn(1, dim, generator=g).to(dtype)

    def run_double():
        return double(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)

    def run_single():
        return single(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)

    with torch.no_grad():
        for name, fn in (("double", run_double), ("single", run_single)):
            fn()
            Path("/proc/self/clear_refs").write_text("5")
            before = status_kib("VmRSS:")
            started = time.perf_counter()
            for _ in range(repeat):
                fn()
            seconds = (time.perf_counter() - started) / repeat
            print(
                f"{MARKER} block={name} image_tokens={rows * cols} text_tokens={TEXT_TOKENS} "
                f"seconds={seconds:.4f} rss_before_kib={before} peak_kib={status_kib('VmHWM:')}",
                flush=True,
            )


def run(command):
    """Runs one measuring process; returns {block: (seconds, working KiB, peak KiB)}."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}")
    out = {}
    for match in LINE.finditer(done.stdout):
        block, _, _, seconds, before, peak = match.groups()
        out[block] = (float(seconds), int(peak) - int(before), int(peak))
    if set(out) != {"double", "single"}:
        sys.exit(f"no figures in the output of {command}:\n{done.stdout}\n{done.stderr}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default="target/release/fastfusion-worker")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    # The worker runs a model directory in float32 on the CPU (its defaults); so does diffusers here.
    parser.add_argument("--dtype", default="float32", choices=["float32"], help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        diffusers_child(args.dir, args.size, args.repeat, args.dtype)
        return

    import torch

    worker = Path(args.worker).resolve()
    if not worker.is_file():
        sys.exit(f"{worker} not found: build it with `cargo build --release -p fastfusion-worker`")
    directory = Path(tempfile.mkdtemp(prefix="flux-blocks-"))
    try:
        started = time.perf_counter()
        params = write_weights(directory, getattr(torch, args.dtype))
        print(f"weights: {params / 1e6:.0f} M parameters ({args.dtype}) in {directory}, "
              f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs")
        results = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            ours_cmd = [worker, "--log-level", "error", "bench", "--mode", "flux-blocks", "--model", directory,
                        "--size", f"{size}x{size}", "--repeat", str(args.repeat)]
            theirs_cmd = [sys.executable, __file__, "--child", "diffusers", "--dir", directory, "--size", str(size),
                          "--repeat", str(args.repeat), "--dtype", args.dtype]
            for round_ in range(args.rounds):
                for impl, command in (("ours", ours_cmd), ("diffusers", theirs_cmd)):
                    figures = run(command)
                    for block, values in figures.items():
                        results.setdefault((size, block, impl), []).append(values)
                    print(f"  {size}^2 round {round_ + 1} {impl:9} " + "  ".join(
                        f"{b} {v[0]:.2f} s / {v[1] / 1024:.0f} MiB" for b, v in sorted(figures.items())), flush=True)
        report(results, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(results, args):
    med = lambda values, i: statistics.median(v[i] for v in values)
    print(f"\nmedians over {args.rounds} rounds of {args.repeat} timed calls ({args.dtype}, CPU)")
    print(f"{'size':>6} {'block':7} {'ours s':>8} {'diff. s':>8} {'ratio':>6} {'ours MiB':>9} {'diff. MiB':>9} "
          f"{'ours peak':>10} {'diff. peak':>10}")
    sizes = sorted({k[0] for k in results})
    for size in sizes:
        for block in ("double", "single"):
            ours, theirs = results[(size, block, "ours")], results[(size, block, "diffusers")]
            print(f"{size:>5}² {block:7} {med(ours, 0):8.2f} {med(theirs, 0):8.2f} {med(ours, 0) / med(theirs, 0):6.2f} "
                  f"{med(ours, 1) / 1024:9.0f} {med(theirs, 1) / 1024:9.0f} {med(ours, 2) / 1024:10.0f} "
                  f"{med(theirs, 2) / 1024:10.0f}")
    if 1024 in sizes:
        for impl in ("ours", "diffusers"):
            step = DOUBLE * med(results[(1024, "double", impl)], 0) + SINGLE * med(results[(1024, "single", impl)], 0)
            print(f"{impl}: one 1024² transformer pass = {DOUBLE} x double + {SINGLE} x single = {step:.0f} s; "
                  f"28 steps = {28 * step / 60:.1f} min (blocks only, this CPU)")


if __name__ == "__main__":
    main()
