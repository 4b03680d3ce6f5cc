"""Train FastFusion's demo model: a small Stable Diffusion (1.x architecture) that draws coloured shapes.

Run with the fixtures venv (tests/fixtures/setup-venv.sh), on the CPU:

    nice -n 10 /path/to/venv/bin/python scripts/demo-model/train.py            # writes models/demo/

Everything is generated here, nothing is downloaded:
  1. A word-level CLIP BPE vocabulary for the caption words (the fixtures' builder, tests/fixtures/make_fixtures.py).
  2. A seeded synthetic data set: 64x64 pictures of one shape (circle, square, triangle, diamond) in one of
     8 colours on a plain background of another, at one of 9 positions and 3 sizes, each with a caption
     such as "a small red circle on a blue background, top left". A caption without a position means
     the centre, without a size a medium shape (half the picture's width), without a background white.
  3. An AutoencoderKL (3 levels: 64x64 pixels <-> 16x16x4 latents), trained on 32x32 crops with an
     L2 + L1 reconstruction loss and a small KL term; its scaling factor makes the latents unit-variance.
     Then its decoder alone is tuned on whole pictures (the encoder, so the latent space, stays fixed).
  4. A CLIP text encoder and a UNet2DConditionModel trained together from scratch on the cached
     latents (v-prediction by default, linear betas so that the last timestep is pure noise, a loss
     weight capped for nearly clean samples, 10 % empty captions for classifier-free guidance, EMA
     weights are the ones saved).
  5. The pipeline is saved in diffusers format (safetensors, float32) with a DDIM scheduler, then
     loaded back with diffusers' StableDiffusionPipeline and checked: for prompts of every kind, the
     colour at the named place and the background must be the named ones (the accuracy is printed and
     written to train_log.json with the losses and timings).

Stages can be reused: --vae-from WORK/vae (skip VAE training) or WORK/vae_tuned with --decoder-steps 0,
--vae-only (stop after the VAE), --unet-from a saved pipeline (skip UNet training). Each stage draws
from its own seeded generator, so pieced-together runs give what one whole run gives.

Determinism: every random draw comes from a generator seeded by --seed; torch runs with a fixed
number of threads (--threads, default 2) and deterministic algorithms, so a rerun on the same kind
of machine with the same thread count gives the same weights (float reductions depend on both).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# OpenMP threads sleep instead of spinning while they wait: on a machine shared with other builds a
# spinning thread burns the core its partner needs (set before torch loads its OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

import make_fixtures as fx  # noqa: E402  (the fixtures' tokenizer builder and JSON writer)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

SIZE = 64
# Bounding-box sides in pixels: medium is half the picture's width.
SIZES = {"small": 16, "medium": 32, "large": 48}
SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated, far-apart colours, so "which colour is this" has one answer (the tests classify pixels
# by the nearest of these).
COLOURS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 220, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
DEFAULT_BACKGROUND = "white"
# (column, row) in a 3x3 grid: 0 = left/top, 1 = centre, 2 = right/bottom.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
CENTRE_WORDS = ("center", "centre", "middle")
MARGIN = 3
WORDS = (
    "a an the on in at of with background shape picture "
    + " ".join(SIZES)
    + " "
    + " ".join(SHAPES)
    + " "
    + " ".join(COLOURS)
    + " top bottom left right center centre middle"
).split()


def shape_box(size_name, position, rng):
    """(x0, y0, x1, y1) of the shape's bounding box, with a little jitter in size and place."""
    side = SIZES[size_name] * rng.uniform(0.92, 1.08)
    col, row = POSITIONS[position]

    def centre(index):
        low, high = MARGIN + side / 2, SIZE - MARGIN - side / 2
        base = (low, SIZE / 2, high)[index]
        return float(np.clip(base + rng.uniform(-2, 2), low, high))

    cx, cy = centre(col), centre(row)
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def jitter(rgb, rng):
    return tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in rgb)


def draw(shape, colour, background, box, rng, scale=4):
    """Render at 4x and box-filter down, so edges are anti-aliased like a real picture's."""
    big = Image.new("RGB", (SIZE * scale, SIZE * scale), jitter(COLOURS[background], rng))
    pen = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (v * scale for v in box)
    fill = jitter(COLOURS[colour], rng)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = (x1 - x0) * 0.06
        pen.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return big.reduce(scale)


def sample_item(rng):
    """One random (picture, caption, labels)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    # A white shape always names its background (the default background is white).
    named_background = colour == DEFAULT_BACKGROUND or rng.random() < 0.8
    if named_background:
        background = colour
        while background == colour:
            background = list(COLOURS)[rng.integers(len(COLOURS))]
    else:
        background = DEFAULT_BACKGROUND
    size_word = [None, "small", "medium", "large"][rng.integers(4)]
    position_word = None if rng.random() < 0.25 else list(POSITIONS)[rng.integers(len(POSITIONS))]
    size_name = size_word or "medium"
    position = position_word or "center"
    if position_word == "center":
        position_word = CENTRE_WORDS[rng.integers(len(CENTRE_WORDS))]
    box = shape_box(size_name, position, rng)
    caption = caption_for(shape, colour, size_word, background if named_background else None, position_word)
    labels = dict(shape=shape, colour=colour, background=background, size=size_name, position=position)
    return draw(shape, colour, background, box, rng), caption, labels


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shape, colour, size_word, background, position_word):
    words = ([size_word] if size_word else []) + [colour, shape]
    caption = " ".join([article(words[0])] + words)
    if background:
        caption += f" on {article(background)} {background} background"
    if position_word:
        caption += f", {position_word}" if position_word != "middle" else " in the middle"
    return caption


def make_dataset(count, seed):
    rng = np.random.default_rng(seed)
    pixels = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    captions, labels = [], []
    for i in range(count):
        picture, caption, label = sample_item(rng)
        pixels[i] = np.asarray(picture)
        captions.append(caption)
        labels.append(label)
    return pixels, captions, labels


def to_tensor(pixels):
    """uint8 NHWC -> float NCHW in [-1, 1], as diffusers' image processor does."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


# Text positions: the longest caption is 15 tokens with its start and end tokens; 77 (SD's) would
# make the text encoder and every cross-attention 5x dearer for padding (the loaders pad and cut
# prompts to the text encoder's max_position_embeddings, as diffusers does to the tokenizer's
# model_max_length, which the saved tokenizer carries too).
TEXT_LENGTH = 16


def build_text_encoder(vocab):
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=128,
        bos_token_id=vocab[fx.BOS],
        eos_token_id=vocab[fx.EOS],
        pad_token_id=vocab[fx.EOS],
    )
    return CLIPTextModel(config)


def build_unet():
    # Convolutions only at 16x16; attention (self and cross) at 8x8 and 4x4, where it is cheap.
    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=32,
    )


SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    # Linear betas end at alpha_bar = 4e-5: the last training timestep is (nearly) pure noise, like
    # the sampler's first step, so flat colours and backgrounds come out as asked.
    beta_schedule="linear",
    steps_offset=1,
)


def scheduler_config(args):
    return {**SCHEDULER, "prediction_type": args.prediction}


def sampling_scheduler(args):
    """DDIM with trailing timesteps, so the first step is t=999 (pure noise, as trained).

    With epsilon prediction and these betas the first steps' x0 estimates divide the prediction's
    error by sqrt(alpha_bar) = 0.0064: unclipped, diffusers' Euler and DDIM both ended in noise
    (run of 2026-12-01); clipping x0 to +-2 (the latents have unit variance) rescues them.
    v-prediction has no such amplification, so it needs no clipping.
    """
    clip = args.prediction == "epsilon"
    return DDIMScheduler(**scheduler_config(args), timestep_spacing="trailing", set_alpha_to_one=False,
                         clip_sample=clip, clip_sample_range=2.0)


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Clock:
    """Wall and process-CPU time of each stage, for the log."""

    def __init__(self):
        self.stages = {}

    def start(self):
        self.t, self.c = time.time(), time.process_time()

    def stop(self, name):
        wall, cpu = time.time() - self.t, time.process_time() - self.c
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"[{name}] wall {wall:.0f} s, process CPU {cpu:.0f} s", flush=True)


def train_vae(pixels, args, log):
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    crop = 32
    losses = []
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        idx = torch.randint(0, len(pixels), (args.vae_batch,), generator=gen)
        x = to_tensor(pixels[idx.numpy()])
        # Random 32x32 crops (the VAE is convolutional): a quarter of the cost of whole pictures.
        ox, oy = torch.randint(0, SIZE - crop + 1, (2,), generator=gen).tolist()
        x = x[:, :, oy : oy + crop, ox : ox + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        out = vae.decode(z).sample
        rec = F.mse_loss(out, x) + 0.5 * (out - x).abs().mean()
        kl = posterior.kl().mean() / (z[0].numel())
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            print(f"vae step {step + 1}/{args.vae_steps}  rec {np.mean(losses[-100:]):.5f}  kl {kl.item():.3f}",
                  flush=True)
    log["vae_final_rec_loss"] = float(np.mean(losses[-100:]))
    return vae.eval()


def tune_decoder(vae, pixels, means, stds, args, log):
    """Train the decoder alone on whole pictures, the encoder frozen: the latent space (and so what
    the UNet learns) stays the same, while colours and the picture's borders, which 32x32 crops
    rarely show, come out right."""
    gen = torch.Generator().manual_seed(args.seed + 4)
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.train()
    opt = torch.optim.AdamW(decoder, lr=args.decoder_lr, weight_decay=0.0)
    losses = []
    for step in range(args.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr, 50)
        idx = torch.randint(0, len(pixels), (args.vae_batch,), generator=gen)
        x = to_tensor(pixels[idx.numpy()])
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        out = vae.decode(z).sample
        loss = F.mse_loss(out, x) + 0.5 * (out - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.decoder_steps:
            print(f"decoder step {step + 1}/{args.decoder_steps}  rec {np.mean(losses[-100:]):.5f}", flush=True)
    if losses:
        log["decoder_final_rec_loss"] = float(np.mean(losses[-100:]))
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, pixels):
    means, stds = [], []
    for i in range(0, len(pixels), 256):
        dist = vae.encode(to_tensor(pixels[i : i + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae, pixels):
    x = to_tensor(pixels[:256])
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float(((out - x).abs() * 127.5).mean())


def tokenize(tokenizer, captions):
    return tokenizer(
        captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


class Ema:
    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model):
        model.load_state_dict(self.shadow)


def loss_weight(snr, args):
    """Per-sample weight of the prediction's squared error, from each sample's signal-to-noise ratio.

    `capped` (default): the v-prediction loss itself (weight 1) where SNR + 1 <= 5, and 5 / (SNR + 1)
    above, so nearly clean samples, which teach little, do not dominate. The noisiest timesteps,
    where the sampler decides the layout (where the shape goes, how big it is), keep their full
    weight. `min-snr`: min-SNR-5 (Hang et al. 2023), which weights those timesteps by their SNR,
    i.e. almost nothing: 600 fine-tuning steps from the same weights put 6 of 32 small shapes at
    their named place with it and 31 of 32 with `capped` (the same data, seed and evaluation).
    """
    if args.weighting == "min-snr":
        if args.prediction == "v_prediction":
            return torch.clamp(snr, max=5.0) / (snr + 1)
        return torch.clamp(snr, max=5.0) / snr
    return torch.clamp(snr + 1, max=5.0) / (snr + 1)


def train_unet(latents_mean, latents_std, ids, empty_ids, vocab, scaling, args, log):
    torch.manual_seed(args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 2)
    if args.unet_init:
        unet = UNet2DConditionModel.from_pretrained(args.unet_init / "unet").train()
        text = CLIPTextModel.from_pretrained(args.unet_init / "text_encoder").train()
    else:
        unet = build_unet().train()
        text = build_text_encoder(vocab).train()
    # mkldnn's convolutions (forward and backward) are ~10 % faster on NHWC tensors.
    unet = unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = Ema(unet, args.ema), Ema(text, args.ema)
    noise_schedule = DDPMScheduler(**scheduler_config(args))
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    losses = []
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr, 200)
        idx = torch.randint(0, len(ids), (args.batch,), generator=gen)
        z = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
        z = z * scaling
        tokens = ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        tokens[drop] = empty_ids
        t = torch.randint(0, SCHEDULER["num_train_timesteps"], (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        noisy = noise_schedule.add_noise(z, noise, t).contiguous(memory_format=torch.channels_last)
        context = text(tokens).last_hidden_state
        pred = unet(noisy, t, context).sample
        weight = loss_weight(snr[t], args)
        target = noise_schedule.get_velocity(z, noise, t) if args.prediction == "v_prediction" else noise
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text, step)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.unet_steps:
            print(f"unet step {step + 1}/{args.unet_steps}  loss {np.mean(losses[-100:]):.5f}", flush=True)
    log["unet_final_loss"] = float(np.mean(losses[-100:]))
    unet = unet.to(memory_format=torch.contiguous_format)
    log["unet_loss_curve"] = [round(float(np.mean(losses[i : i + 100])), 5) for i in range(0, len(losses), 100)]
    ema_unet.copy_to(unet)
    ema_text.copy_to(text)
    return unet.eval(), text.eval()


def nearest_colour(rgb):
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def region_colour(image, box):
    """The colour most pixels of `box` (x0, y0, x1, y1) are nearest to."""
    arr = np.asarray(image, dtype=np.int32)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    votes = {}
    for rgb in arr[y0:y1, x0:x1].reshape(-1, 3):
        name = nearest_colour(rgb)
        votes[name] = votes.get(name, 0) + 1
    return max(votes, key=votes.get)


def inner_box(size_name, position):
    """The middle half of where the shape sits (no jitter), which every shape covers."""
    side = SIZES[size_name]
    col, row = POSITIONS[position]
    low, high = MARGIN + side / 2, SIZE - MARGIN - side / 2
    cx, cy = (low, SIZE / 2, high)[col], (low, SIZE / 2, high)[row]
    q = side / 4
    return cx - q, cy - q, cx + q, cy + q


def background_box(size_name, position):
    """A corner patch the shape never reaches: the 12x12 corner farthest from the shape."""
    col, row = POSITIONS[position]
    x = 0 if col == 2 else SIZE - 12
    y = 0 if row == 2 else SIZE - 12
    return x, y, x + 12, y + 12


def two_colours(rng):
    """A shape colour and a different background colour."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = colour
    while background == colour:
        background = list(COLOURS)[rng.integers(len(COLOURS))]
    return colour, background


def sample(pipe, caption, seed, args):
    """One picture at the native size with the evaluation's steps and guidance."""
    return pipe(
        caption,
        num_inference_steps=args.eval_steps,
        guidance_scale=args.eval_guidance,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def grid_of(images):
    """The pictures in rows of 8."""
    grid = Image.new("RGB", (SIZE * 8, SIZE * ((len(images) + 7) // 8)), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 8) * SIZE, (i // 8) * SIZE))
    return grid


def evaluate(pipe, args, log):
    rng = np.random.default_rng(args.seed + 3)
    cases, hits, images = [], {"shape_colour": 0, "background": 0}, []
    for i in range(args.eval_count):
        shape = SHAPES[i % len(SHAPES)]
        colour, background = two_colours(rng)
        size_word = ["small", None][i % 2]
        position_word = [None, "top left", "bottom right", "top right", "bottom left", "left", "right", "top",
                         "bottom"][i % 9] if size_word else None
        caption = caption_for(shape, colour, size_word, background, position_word)
        image = sample(pipe, caption, i, args)
        images.append(image)
        size_name, position = size_word or "medium", position_word or "center"
        got_colour = region_colour(image, inner_box(size_name, position))
        got_background = region_colour(image, background_box(size_name, position))
        hits["shape_colour"] += got_colour == colour
        hits["background"] += got_background == background
        cases.append(dict(prompt=caption, seed=i, shape_colour=got_colour, background=got_background))
        image.save(args.work / f"eval_{i:02d}.png")
        print(f"eval {caption!r}: shape colour {got_colour}, background {got_background}", flush=True)
    log["eval"] = {k: f"{v}/{args.eval_count}" for k, v in hits.items()}
    log["eval_cases"] = cases
    print(f"eval accuracy: {log['eval']}", flush=True)
    return grid_of(images)


def evaluate_places(pipe, args, log):
    """32 small shapes, four at each named place but the centre: is the named colour there?"""
    rng = np.random.default_rng(args.seed + 4)
    places = [p for p in POSITIONS if p != "center"]
    hits, images = 0, []
    for i in range(32):
        place, shape = places[i % len(places)], SHAPES[(i // len(places)) % len(SHAPES)]
        colour, background = two_colours(rng)
        caption = caption_for(shape, colour, "small", background, place)
        image = sample(pipe, caption, 100 + i, args)
        hits += region_colour(image, inner_box("small", place)) == colour
        images.append(image)
    log["eval"]["named_place"] = f"{hits}/32"
    print(f"small shapes at their named place: {hits}/32", flush=True)
    return grid_of(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--work", type=Path, default=REPO / "target" / "demo-model",
                        help="scratch folder: evaluation pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-from", type=Path, help="reuse a VAE this script saved (WORK/vae) instead of training one")
    parser.add_argument("--decoder-steps", type=int, default=500)
    parser.add_argument("--vae-only", action="store_true", help="stop after the VAE (WORK/vae_tuned)")
    parser.add_argument("--decoder-lr", type=float, default=1e-3)
    parser.add_argument("--unet-init", type=Path,
                        help="continue training the UNet and text encoder of a pipeline this script saved")
    parser.add_argument("--unet-from", type=Path,
                        help="reuse the UNet and text encoder of a pipeline this script saved instead of training them")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="v_prediction",
                        help="what the UNet predicts (the 2026-12-01 run used epsilon)")
    parser.add_argument("--weighting", choices=("capped", "min-snr"), default="capped",
                        help="loss weight per timestep (see loss_weight)")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--eval-count", type=int, default=24)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-guidance", type=float, default=5.0)
    args = parser.parse_args()
    if args.weighting == "capped" and args.prediction != "v_prediction":
        # For a noise prediction it would be min(SNR + 1, 5) / SNR: unbounded at the last timestep.
        parser.error("--weighting capped is for --prediction v_prediction; use --weighting min-snr")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN first (to catch reads of uninitialised
    # memory): 5 % of a step here, and nothing this script reads is uninitialised.
    torch.utils.deterministic.fill_uninitialized_memory = False
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("out", "work")}}
    clock = Clock()

    clock.start()
    vocab, merges = fx.build_vocab_and_merges(WORDS)
    tokenizer = fx.make_tokenizer(vocab, merges, fx.EOS, TEXT_LENGTH)
    pixels, captions, _ = make_dataset(args.images, args.seed)
    print(f"{len(vocab)} tokens; {len(pixels)} pictures, e.g. {captions[:3]}", flush=True)
    clock.stop("data")

    clock.start()
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
        # A --vae-only run's figures about the decoder carry over when its VAE is reused.
        vae_log = args.vae_from.parent / "vae_log.json"
        if args.decoder_steps == 0 and vae_log.exists():
            previous = json.loads(vae_log.read_text())
            log["decoder_final_rec_loss"] = previous.get("decoder_final_rec_loss")
            clock.stages["decoder"] = previous["timings"]["decoder"]
    else:
        vae = train_vae(pixels, args, log)
    means, stds = encode_dataset(vae, pixels)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    vae.save_pretrained(args.work / "vae", safe_serialization=True)
    log["vae_scaling_factor"] = round(scaling, 5)
    log["vae_mean_abs_error_8bit_before_decoder_tuning"] = round(reconstruction_error(vae, pixels), 2)
    print(f"latents mean {means.mean():.3f} std {means.std():.3f} -> scaling {scaling:.5f}; "
          f"reconstruction error {log['vae_mean_abs_error_8bit_before_decoder_tuning']} / 255", flush=True)
    clock.stop("vae")

    if args.decoder_steps:
        clock.start()
        vae = tune_decoder(vae, pixels, means, stds, args, log)
        vae.save_pretrained(args.work / "vae_tuned", safe_serialization=True)
        clock.stop("decoder")
    log["vae_mean_abs_error_8bit"] = round(reconstruction_error(vae, pixels), 2)
    print(f"reconstruction error after decoder tuning {log['vae_mean_abs_error_8bit']} / 255", flush=True)
    if args.vae_only:
        fx.write_json(args.work / "vae_log.json", {**log, "timings": clock.stages})
        return

    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    if args.unet_from:
        # What the run that trained them logged about them (losses, timings) carries over.
        previous = json.loads((args.unet_from / "train_log.json").read_text())
        for key in ("unet_final_loss", "unet_loss_curve"):
            log[key] = previous.get(key)
        clock.stages["unet"] = previous["timings"]["unet"]
        if args.vae_from:
            # The VAE's training was that run's too.
            log["vae_final_rec_loss"] = previous.get("vae_final_rec_loss")
            clock.stages["vae"] = previous["timings"]["vae"]
        unet = UNet2DConditionModel.from_pretrained(args.unet_from / "unet").eval()
        text = CLIPTextModel.from_pretrained(args.unet_from / "text_encoder").eval()
    else:
        clock.start()
        unet, text = train_unet(means, stds, ids, empty, vocab, vae.config.scaling_factor, args, log)
        clock.stop("unet")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        # A fresh tokenizer: the one above remembers the padding it was called with and would save
        # it into tokenizer.json, which loaders then read as every prompt being 77 tokens long.
        tokenizer=fx.make_tokenizer(vocab, merges, fx.EOS, TEXT_LENGTH),
        unet=unet,
        scheduler=sampling_scheduler(args),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    # StableDiffusionPipeline switches clip_sample off when it is built (a deprecation); write the
    # scheduler as meant.
    sampling_scheduler(args).save_pretrained(args.out / "scheduler")
    fx.write_json(args.out / "tokenizer" / "special_tokens_map.json", fx.special_tokens_map(fx.EOS))
    # torch saves safetensors owner-only (0600); the images copy the model in and run it as another user.
    for path in args.out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)

    clock.start()
    loaded = StableDiffusionPipeline.from_pretrained(args.out, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    loaded.scheduler = sampling_scheduler(args)
    grid = evaluate(loaded, args, log)
    grid.save(args.out / "samples.png")
    evaluate_places(loaded, args, log).save(args.out / "places.png")
    clock.stop("eval")
    log["timings"] = clock.stages
    # The sum of the stages (also when they ran in separate invocations, see --vae-from/--unet-from).
    log["timings_total"] = {k: round(sum(t[k] for t in clock.stages.values()), 1) for k in ("wall_s", "cpu_s")}
    print(f"[total] wall {log['timings_total']['wall_s']:.0f} s, process CPU {log['timings_total']['cpu_s']:.0f} s",
          flush=True)
    log["weights_bytes"] = sum(p.stat().st_size for p in args.out.rglob("*.safetensors"))
    fx.write_json(args.out / "train_log.json", log)
    print(f"weights {log['weights_bytes'] / 1e6:.2f} MB in {args.out}", flush=True)


if __name__ == "__main__":
    main()
