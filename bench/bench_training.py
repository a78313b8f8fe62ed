"""Training throughput: our trainer (with and without cached latents) against a plain loop.

The plain loop is the diffusers LoRA recipe reduced to its core (no accelerate, no checkpoints,
no callbacks), on the same tiny model, data, batch and step count. Samples/s are measured over
the steps after the first (warm-up) in each variant. Run:

    .venv/bin/python bench/bench_training.py [--steps 30] [--batch-size 2] [--resolution 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

from workers.engine.model_builder import build_pipeline_folder
from workers.engine.training import NullCallbacks, StepProgress, TrainConfig, TrainItem, train_lora

COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 230), (240, 220, 40)]
SHAPES = ["circle", "square"]


def make_items(folder: Path) -> list[TrainItem]:
    """Eight PNGs of coloured shapes with captions."""
    items = []
    for index in range(8):
        colour, shape = COLOURS[index % 4], SHAPES[index // 4]
        image = Image.new("RGB", (96, 80), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        box = (20, 16, 76, 64)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        path = folder / f"{index}.png"
        image.save(path)
        items.append(TrainItem(path, (f"a {shape} in colour {index % 4}",)))
    return items


class StepClock(NullCallbacks):
    """Times the steps after the first."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, progress: StepProgress) -> None:
        self.times.append(time.perf_counter())


def run_ours(
    pipeline_dir: Path, items: list[TrainItem], *, cache: bool, args: argparse.Namespace
) -> float:
    clock = StepClock()
    config = TrainConfig(
        resolution=args.resolution,
        rank=4,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seed=0,
        checkpoint_every=10**6,
        cache_latents=cache,
        center_crop=True,
    )
    with tempfile.TemporaryDirectory() as out:
        train_lora(
            pipeline_dir=pipeline_dir,
            items=items,
            config=config,
            output_dir=Path(out),
            callbacks=clock,
            device="cpu",
        )
    return (len(clock.times) - 1) * args.batch_size / (clock.times[-1] - clock.times[0])


def _pixels(path: Path, resolution: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


def run_plain(pipeline_dir: Path, items: list[TrainItem], *, args: argparse.Namespace) -> float:
    """The diffusers train_text_to_image_lora loop, core only."""
    torch.manual_seed(0)
    scheduler = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    times = []
    order = np.random.default_rng(0).permutation(len(items))
    position = 0
    for _ in range(args.steps):
        batch = [items[order[(position + i) % len(items)]] for i in range(args.batch_size)]
        position += args.batch_size
        pixels = torch.stack([_pixels(item.image_path, args.resolution) for item in batch])
        ids = tokenizer(
            [item.captions[0] for item in batch],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return (len(times) - 1) * args.batch_size / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_dir = build_pipeline_folder("tiny", Path(tmp) / "pipe")
        data = Path(tmp) / "data"
        data.mkdir()
        items = make_items(data)
        results = {
            "plain diffusers loop": run_plain(pipeline_dir, items, args=args),
            "train_lora": run_ours(pipeline_dir, items, cache=False, args=args),
            "train_lora cache_latents": run_ours(pipeline_dir, items, cache=True, args=args),
        }
    base = results["plain diffusers loop"]
    print(
        f"\ntiny model, {args.resolution} px, batch {args.batch_size}, {args.steps} steps, "
        f"{args.threads} thread(s)"
    )
    print(f"{'variant':<28}{'samples/s':>12}{'vs plain':>10}")
    for name, speed in results.items():
        print(f"{name:<28}{speed:>12.2f}{speed / base:>10.2f}")


if __name__ == "__main__":
    main()
