#!/usr/bin/env python3
"""One guided UNet step (batch 2) of full-size SD 1.5 and SDXL UNets, and one SD VAE decode: ours (candle)
against diffusers.

    /work/venv/bin/python scripts/bench-unet-vs-diffusers.py [--worker target/release/fastfusion-worker]
        [--cases sd15:256,sd15:512,sdxl:512,sdxl:1024,vae:512] [--repeat 1] [--rounds 2] [--before OLD_WORKER]

For each architecture it builds diffusers' `UNet2DConditionModel` from the real repo's config with random
weights (seeded; SD 1.5: 0.86 B parameters, SDXL: 2.57 B; float32, 3.4 / 10.3 GB on disk) in a temporary
directory outside the repository (deleted at the end). Then, per case, it runs
`fastfusion-worker bench --mode unet` and this script's diffusers child in alternation, `--rounds` times
each, every run in a fresh process: one untimed pass, then `--repeat` timed ones, with latents of the
case's size (batch 2: classifier-free guidance), a 77-token context and, for SDXL, pooled embeddings and
time ids. Case `vae:SIZE` builds SD's `AutoencoderKL` (84 M parameters) and times one decode (batch 1) of
random latents for a SIZE² picture: `fastfusion-worker bench --mode vae` (unscaling, decode, 8-bit pixels)
against `AutoencoderKL.decode` plus the same conversion. Each run reports seconds per pass and the memory the passes took above what was resident
before them (peak RSS reset through /proc/self/clear_refs: Linux only). The summary gives medians over
rounds and the ratio ours / diffusers, at the same thread count (all CPUs). With `--before`, a second
worker binary (e.g. a build of the previous commit) runs in the same rotation, for a before/after column
measured under the same load.
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

MARKER = "fastfusion-bench-unet"
LINE = re.compile(r"fastfusion-bench-(?:unet|vae) width=(\d+) height=(\d+) seconds=([\d.]+) rss_before_kib=(-?\d+) peak_kib=(-?\d+)")

# The UNet configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (their unet/config.json).
CONFIGS = {
    "sd15": {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "sdxl": {
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "center_input_sample": False, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    },
}


def status_kib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return -1


# stable-diffusion-v1-5's vae/config.json.
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}


def report(run, size, repeat):
    """One untimed `run()`, then `repeat` timed ones; prints a line in the worker's format."""
    run()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS:")
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    seconds = (time.perf_counter() - started) / repeat
    print(f"{MARKER} width={size} height={size} seconds={seconds:.4f} rss_before_kib={before} "
          f"peak_kib={status_kib('VmHWM:')}", flush=True)


def write_vae(directory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    directory.mkdir(parents=True)
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    count = sum(p.numel() for p in vae.parameters())
    del vae
    return count


def diffusers_vae_child(directory, size, repeat):
    """Times diffusers' VAE decode (with the pipeline's conversion to 8-bit pixels)."""
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(os.cpu_count() or 1)
    vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, generator=g)
    with torch.no_grad():
        def run():
            image = vae.decode(latents / vae.config.scaling_factor).sample
            return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        report(run, size, repeat)


def write_unet(directory, arch):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[arch])
    directory.mkdir(parents=True)
    unet.save_pretrained(directory, safe_serialization=True)
    # The worker resolves --model DIR as a diffusers repo directory, which has one of these.
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    count = sum(p.numel() for p in unet.parameters())
    del unet
    return count


def diffusers_child(directory, size, repeat):
    """Times diffusers' UNet and prints a line in the worker's format."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(directory, torch_dtype=torch.float32).eval()
    config = unet.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, config.in_channels, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": ids}
    t = torch.tensor(500.0)
    with torch.no_grad():
        def run():
            return unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        report(run, size, repeat)


def run(command):
    """Runs one measuring process; returns (seconds, working KiB, peak KiB)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}")
    match = LINE.search(done.stdout)
    if not match:
        sys.exit(f"no figures in the output of {command}:\n{done.stdout}\n{done.stderr}")
    _, _, seconds, before, peak = match.groups()
    return float(seconds), int(peak) - int(before), int(peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default="target/release/fastfusion-worker")
    parser.add_argument("--cases", default="sd15:256,sd15:512,sdxl:512,sdxl:1024")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", help="another fastfusion-worker binary to time in the same rotation")
    parser.add_argument("--child", choices=["diffusers", "diffusers-vae"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "diffusers":
        diffusers_child(args.dir, args.size, args.repeat)
        return
    if args.child == "diffusers-vae":
        diffusers_vae_child(args.dir, args.size, args.repeat)
        return

    worker = Path(args.worker).resolve()
    if not worker.is_file():
        sys.exit(f"{worker} not found: build it with `cargo build --release -p fastfusion-worker`")
    before = Path(args.before).resolve() if args.before else None
    if before and not before.is_file():
        sys.exit(f"{before} not found")
    cases = []
    for item in args.cases.split(","):
        arch, _, size = item.partition(":")
        if arch not in CONFIGS and arch != "vae":
            sys.exit(f"unknown architecture {arch}: one of {', '.join([*CONFIGS, 'vae'])}")
        if not size.isdigit() or int(size) == 0 or int(size) % 8:
            sys.exit(f"{item}: the size must be a positive multiple of 8 (the VAE's factor)")
        cases.append((arch, int(size)))
    root = Path(tempfile.mkdtemp(prefix="unet-bench-"))
    results, params = {}, {}
    try:
        for arch in dict.fromkeys(a for a, _ in cases):
            directory = root / arch
            started = time.perf_counter()
            params[arch] = write_vae(directory) if arch == "vae" else write_unet(directory, arch)
            print(f"{arch}: {params[arch] / 1e9:.2f} B parameters (float32) in {directory}, "
                  f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs", flush=True)
            for case_arch, size in cases:
                if case_arch != arch:
                    continue
                mode = "vae" if arch == "vae" else "unet"

                def ours_cmd(binary):
                    return [binary, "--log-level", "error", "bench", "--mode", mode, "--model", directory,
                            "--size", f"{size}x{size}", "--repeat", str(args.repeat)]
                child = "diffusers-vae" if arch == "vae" else "diffusers"
                theirs_cmd = [sys.executable, __file__, "--child", child, "--dir", directory,
                              "--size", str(size), "--repeat", str(args.repeat)]
                rotation = [("ours", ours_cmd(worker)), ("diffusers", theirs_cmd)]
                if before:
                    rotation.insert(0, ("before", ours_cmd(before)))
                for round_ in range(args.rounds):
                    for impl, command in rotation:
                        figures = run(command)
                        results.setdefault((arch, size, impl), []).append(figures)
                        print(f"  {arch} {size}^2 round {round_ + 1} {impl:9} {figures[0]:.2f} s/step, "
                              f"{figures[1] / 1024:.0f} MiB working, {figures[2] / 1024:.0f} MiB peak", flush=True)
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = lambda values, i: statistics.median(v[i] for v in values)
    print(f"\nmedians over {args.rounds} rounds of {args.repeat} timed passes (float32, CPU; unet: batch 2 = one guided step; vae: one decode)")
    print(f"{'unet':5} {'size':>6} {'ours s':>8} {'diff. s':>8} {'ratio':>6} {'ours MiB':>9} {'diff. MiB':>9} "
          f"{'ours peak':>10} {'diff. peak':>10}")
    for arch, size in cases:
        ours, theirs = results[(arch, size, "ours")], results[(arch, size, "diffusers")]
        print(f"{arch:5} {size:>5}² {med(ours, 0):8.2f} {med(theirs, 0):8.2f} {med(ours, 0) / med(theirs, 0):6.2f} "
              f"{med(ours, 1) / 1024:9.0f} {med(theirs, 1) / 1024:9.0f} {med(ours, 2) / 1024:10.0f} "
              f"{med(theirs, 2) / 1024:10.0f}")
    if before:
        print("\nbefore (--before) in the same rotation")
        print(f"{'unet':5} {'size':>6} {'before s':>9} {'ours s':>8} {'diff. s':>8} {'before/diff.':>12} "
              f"{'ours/diff.':>10} {'ours/before':>11}")
        for arch, size in cases:
            b = med(results[(arch, size, "before")], 0)
            o = med(results[(arch, size, "ours")], 0)
            d = med(results[(arch, size, "diffusers")], 0)
            print(f"{arch:5} {size:>5}² {b:9.2f} {o:8.2f} {d:8.2f} {b / d:12.2f} {o / d:10.2f} {o / b:11.2f}")


if __name__ == "__main__":
    main()
