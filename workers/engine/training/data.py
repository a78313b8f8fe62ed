"""Training data: items, image preprocessing and a resumable, seeded sample stream.

Every random choice about a sample (epoch order, caption, crop, flip, caption dropout) is drawn
from a generator seeded by (run seed, epoch, index) rather than from a shared running RNG. The
position in the stream, two integers, is then all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from workers.engine.training.errors import TrainingDataError

# Tags that keep the seeded streams of different purposes independent of each other.
_ORDER_STREAM = 0
_SAMPLE_STREAM = 1
_NOISE_STREAM = 2
_CACHE_CROP_STREAM = 3


@dataclass(frozen=True)
class TrainItem:
    """One training image with one or more captions (one is drawn per step)."""

    image_path: Path
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if isinstance(self.captions, str):
            object.__setattr__(self, "captions", (self.captions,))
        else:
            object.__setattr__(self, "captions", tuple(self.captions))
        if not self.captions:
            raise TrainingDataError(f"{self.image_path}: at least one caption is needed")


@dataclass(frozen=True)
class SampleDraw:
    """What one position of the stream trains on: an item, a caption and its augmentation."""

    item_index: int
    caption: str
    flip: bool
    crop_fraction: tuple[float, float]  # (x, y) in [0, 1): where a random crop starts
    epoch: int


@dataclass(frozen=True)
class StreamPosition:
    """Where the next sample comes from: the epoch and the index in its shuffled order."""

    epoch: int = 0
    index: int = 0


def epoch_order(*, seed: int, epoch: int, num_items: int) -> np.ndarray:
    """The shuffled item order of one epoch (the same for a given seed and epoch)."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(num_items)


class SampleStream:
    """An endless sequence of seeded samples: epoch after epoch, each shuffled."""

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        seed: int,
        caption_dropout: float,
        random_flip: bool,
        position: StreamPosition | None = None,
    ) -> None:
        if not items:
            raise TrainingDataError("no training items")
        self._items = items
        self._seed = seed
        self._caption_dropout = caption_dropout
        self._random_flip = random_flip
        self.position = position or StreamPosition()
        self._order = epoch_order(seed=seed, epoch=self.position.epoch, num_items=len(items))

    def take(self, count: int) -> list[SampleDraw]:
        """The next ``count`` samples; a batch may run across an epoch boundary."""
        draws = []
        for _ in range(count):
            epoch, index = self.position.epoch, self.position.index
            item_index = int(self._order[index])
            draws.append(self._draw(epoch=epoch, index=index, item_index=item_index))
            index += 1
            if index == len(self._items):
                epoch, index = epoch + 1, 0
                self._order = epoch_order(seed=self._seed, epoch=epoch, num_items=len(self._items))
            self.position = StreamPosition(epoch=epoch, index=index)
        return draws

    def _draw(self, *, epoch: int, index: int, item_index: int) -> SampleDraw:
        rng = np.random.default_rng([self._seed, _SAMPLE_STREAM, epoch, index])
        captions = self._items[item_index].captions
        caption = captions[int(rng.integers(len(captions)))]
        # Always draw every value so that one setting does not shift the others' streams.
        drop = rng.random() < self._caption_dropout
        flip = bool(rng.random() < 0.5) and self._random_flip
        crop = (float(rng.random()), float(rng.random()))
        return SampleDraw(
            item_index=item_index,
            caption="" if drop else caption,
            flip=flip,
            crop_fraction=crop,
            epoch=epoch,
        )


def noise_generator(
    *, seed: int, step: int, micro_step: int, process_index: int
) -> torch.Generator:
    """A CPU generator for one micro-batch's latent sample, noise and timesteps."""
    state = np.random.SeedSequence([seed, _NOISE_STREAM, step, micro_step, process_index])
    return torch.Generator("cpu").manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def cache_crop_fraction(*, seed: int, item_index: int) -> tuple[float, float]:
    """The one random crop an item keeps when its latents are cached."""
    rng = np.random.default_rng([seed, _CACHE_CROP_STREAM, item_index])
    return float(rng.random()), float(rng.random())


def load_image(
    path: Path,
    *,
    resolution: int,
    center_crop: bool,
    crop_fraction: tuple[float, float],
    flip: bool,
) -> torch.Tensor:
    """Open an image as a (3, resolution, resolution) float tensor in [-1, 1].

    The shorter side is resized to ``resolution``; the square crop is centred or placed at
    ``crop_fraction`` of the free range; ``flip`` mirrors left-right.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"cannot read image {path}: {exc}") from exc
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    free_x, free_y = new_size[0] - resolution, new_size[1] - resolution
    if center_crop:
        left, top = free_x // 2, free_y // 2
    else:
        left = min(free_x, int(crop_fraction[0] * (free_x + 1)))
        top = min(free_y, int(crop_fraction[1] * (free_y + 1)))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
