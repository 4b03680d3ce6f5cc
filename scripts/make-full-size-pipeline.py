#!/usr/bin/env python3
"""Write a full-size Stable Diffusion 1.5-architecture pipeline with random weights, for benchmarks.

    /work/venv/bin/python scripts/make-full-size-pipeline.py OUT_DIR
    target/release/fastfusion-worker bench --model OUT_DIR --mode lora --size 512x512 --steps 2 --repeat 1

UNet, CLIP text encoder (ViT-L/14's text tower) and VAE are built by diffusers / transformers from the
configs of stable-diffusion-v1-5 with seeded random weights (float32: 3.4 GB UNet, 0.5 GB text encoder,
0.3 GB VAE); the tokenizer is the fixtures' word-level CLIP tokenizer (tests/fixtures/make_fixtures.py),
whose ids all fall inside the full vocabulary. Nothing is downloaded. OUT_DIR must lie outside the
repository (the weights are GBs: they are never to be committed); delete it when done.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

def bench_configs():
    """SD 1.5's UNet and VAE configs, as the UNet/VAE benchmark writes them."""
    spec = importlib.util.spec_from_file_location("bench_unet", REPO / "scripts" / "bench-unet-vs-diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIGS["sd15"], module.VAE


TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        sys.exit(f"error: {out} is inside the repository; give a directory outside it (e.g. under /tmp)")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} exists and is not empty")

    import torch
    import make_fixtures as fx
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config = bench_configs()
    torch.manual_seed(0)
    vocab, merges = fx.build_vocab_and_merges()
    tokenizer = fx.make_tokenizer(vocab, merges, fx.EOS)
    text = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=vocab[fx.BOS], eos_token_id=vocab[fx.EOS],
                                        pad_token_id=vocab[fx.EOS]))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config),
        scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    fx.write_json(out / "tokenizer" / "special_tokens_map.json", fx.special_tokens_map(fx.EOS))
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB of weights)")


if __name__ == "__main__":
    main()
