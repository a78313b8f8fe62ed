"""Numbered training checkpoints: atomic writes, retention and exact resume.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``:

- ``pytorch_lora_weights.safetensors``: the LoRA weights in diffusers format (fp32), loadable
  as an adapter by itself, so that any checkpoint can be promoted to an adapter version;
- ``training_state.pt``: optimizer, lr scheduler and fp16 grad scaler states;
- ``rng-<process>.pt``: Python, NumPy, torch CPU and CUDA RNG states of each process;
- ``state.json``: step, data position, seed, losses and the config the run was started with.

A checkpoint is written into a hidden temporary folder next to the final one and renamed into
place with ``os.replace``, so a folder named ``checkpoint-<step>`` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from workers.engine.training.data import StreamPosition
from workers.engine.training.lora import ADAPTER_WEIGHT_NAME, save_adapter

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.json"
TRAINING_STATE_FILE = "training_state.pt"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True)
class CheckpointState:
    """The small, JSON part of a checkpoint."""

    step: int
    position: StreamPosition
    seed: int
    loss: float
    loss_ema: float  # raw (not bias-corrected) moving average
    loss_ema_count: int
    config: dict[str, Any]
    num_processes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "epoch": self.position.epoch,
            "index_in_epoch": self.position.index,
            "seed": self.seed,
            "loss": self.loss,
            "loss_ema": self.loss_ema,
            "loss_ema_count": self.loss_ema_count,
            "config": self.config,
            "num_processes": self.num_processes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointState:
        return cls(
            step=int(data["step"]),
            position=StreamPosition(epoch=int(data["epoch"]), index=int(data["index_in_epoch"])),
            seed=int(data["seed"]),
            loss=float(data["loss"]),
            loss_ema=float(data["loss_ema"]),
            loss_ema_count=int(data["loss_ema_count"]),
            config=dict(data["config"]),
            num_processes=int(data["num_processes"]),
        )


def checkpoint_path(checkpoints_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"


def _rng_file(process_index: int) -> str:
    return f"rng-{process_index}.pt"


def _is_complete(path: Path) -> bool:
    return all(
        (path / name).is_file() for name in (STATE_FILE, TRAINING_STATE_FILE, ADAPTER_WEIGHT_NAME)
    )


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and _is_complete(path):
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Delete half-written or half-deleted folders a killed run left behind."""
    if not checkpoints_dir.is_dir():
        return
    for path in checkpoints_dir.iterdir():
        if path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _remove_tree(path: Path) -> None:
    # Rename first: a crash mid-delete then leaves a trash folder, never a broken checkpoint.
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def apply_retention(checkpoints_dir: Path, *, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints; return the removed steps."""
    found = list_checkpoints(checkpoints_dir)
    removed = []
    for step, path in found[: max(0, len(found) - keep)]:
        _remove_tree(path)
        removed.append(step)
    return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder to ``final``, replacing what was there."""
    if final.exists():
        _remove_tree(final)
    os.replace(tmp, final)


def _rng_states() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        # Plain lists and tensors only, so torch.load(weights_only=True) can read it back.
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), np_pos, np_has_gauss, np_cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = states["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = states["numpy"]
    np.random.set_state(
        (np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_cached)
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_checkpoint(
    checkpoints_dir: Path,
    *,
    state: CheckpointState,
    accelerator: Accelerator,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    keep: int,
) -> Path:
    """Write the checkpoint of ``state.step`` atomically and prune old ones (all processes)."""
    final = checkpoint_path(checkpoints_dir, state.step)
    # One name on every process: each writes its RNG file into the same folder.
    tmp = checkpoints_dir / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_states(), tmp / _rng_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(tmp, unet=unet, text_encoder=text_encoder)
        training_state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
        }
        if accelerator.scaler is not None:
            training_state["scaler"] = accelerator.scaler.state_dict()
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
        replace_dir(tmp, final)
        apply_retention(checkpoints_dir, keep=keep)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> CheckpointState:
    """The JSON part of a checkpoint."""
    return CheckpointState.from_json(json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


def restore_training_state(
    path: Path,
    *,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
) -> None:
    """Load optimizer, scheduler, scaler and this process's RNG states from a checkpoint."""
    training_state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if accelerator.scaler is not None and "scaler" in training_state:
        accelerator.scaler.load_state_dict(training_state["scaler"])
    rng_path = path / _rng_file(accelerator.process_index)
    if rng_path.is_file():  # absent when resuming on more processes than the run had
        _restore_rng_states(torch.load(rng_path, map_location="cpu", weights_only=True))
