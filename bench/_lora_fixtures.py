"""Shared set-up for the inference benchmarks: the base model, random adapters, arguments."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The benchmarks run as scripts (python bench/bench_x.py) from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter
from workers.engine.inference import DEFAULT_TARGET_MODULES
from workers.engine.model_builder import build_pipeline_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments every benchmark takes: model preset, device, dtype, work directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp directory")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per image")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="lorastack-bench-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.torch_dtype = DTYPES[args.dtype]
    # Loading many adapters through diffusers logs a report per adapter; keep the tables readable.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    return args


def prepare_model(preset: str, workdir: Path) -> Path:
    """The randomly initialised base pipeline folder (built once per work directory)."""
    out = workdir / f"model-{preset}"
    if not (out / "model_index.json").exists():
        build_pipeline_folder(preset, out)  # type: ignore[arg-type]
    return out


def adapter_spec(index: int, *, uniform: bool = False, large: bool = False) -> RandomLoraSpec:
    """Varied adapters: ranks 4 and 8, several alphas, some with text-encoder LoRA.

    ``uniform`` keeps rank 8 and the same targets for all (alpha still varies), so that every
    switch does the same work and only the number of resident adapters changes.
    """
    if large:
        # Rank 64 on every module the slot pool covers: the heaviest adapter the engine takes.
        return RandomLoraSpec(
            rank=64,
            alpha=float(16 + index % 3 * 16),
            unet_targets=DEFAULT_TARGET_MODULES["unet"],
            text_encoder_targets=DEFAULT_TARGET_MODULES["text_encoder"],
        )
    if uniform:
        return RandomLoraSpec(rank=8, alpha=float(4 + index % 5), text_encoder_targets=("q_proj",))
    rank = 4 if index % 2 == 0 else 8
    alpha = float((1, 4, 8)[index % 3] * rank / 4)
    text_targets = ("q_proj", "v_proj") if index % 3 == 0 else ()
    return RandomLoraSpec(rank=rank, alpha=alpha, text_encoder_targets=text_targets)


def write_adapters(
    pipeline_dir: Path, workdir: Path, count: int, *, uniform: bool = False, large: bool = False
) -> list[Path]:
    """``count`` random diffusers-format adapter files (reused when already written)."""
    out = workdir / ("adapters-large" if large else "adapters-uniform" if uniform else "adapters")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"adapter{i:03d}.safetensors" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        pipeline = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
        writer = RandomLoraWriter(pipeline)
        for i in missing:
            writer.write(paths[i], adapter_spec(i, uniform=uniform, large=large), seed=i)
    return paths


def rss_bytes() -> int:
    """The process's resident set size (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
