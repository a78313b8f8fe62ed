"""``InferenceEngine``: one shared Stable Diffusion pipeline per worker, LoRA adapters hot-swapped.

The base pipeline is loaded once (``StableDiffusionPipeline.from_pretrained``); a fixed pool of
LoRA slots is injected into it (see ``slots``) and adapters flow through an ``AdapterCache``
(see ``cache``). ``generate`` switches the requested adapter set in (constant time, whatever
the number of resident adapters), denoises, then decodes, and reports each phase's time.

Batching: ``generate_batch`` groups requests that share the image shape (width, height), the
number of steps, the scheduler and the guidance scale, whatever their adapters, and runs each
group as one pipeline call, one generator per image so every image depends only on its own
seed. A group whose requests all use the same adapters at the same weights switches them in for
every row (the cheaper path in the dynamic slot mode); any other group is a mixed batch: the
union of its adapters sits in the slots and every image (row) gets its own weights, 0 for the
adapters it does not use (``LoraSlotPool.activate_rows``). A group whose union of adapters does
not fit the slots is split into several calls. Results come back in the order of the requests;
the requests of one call share that call's timings.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from workers.engine.inference.cache import AdapterCache, AdapterSource, CacheSnapshot
from workers.engine.inference.schedulers import SCHEDULERS, make_scheduler
from workers.engine.inference.slots import DEFAULT_TARGET_MODULES, LoraSlotPool

_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class AdapterRef:
    """An adapter to apply: its cache key, where to get it and its weight."""

    key: str
    source: AdapterSource = None
    weight: float = 1.0


AdapterSpec = AdapterRef | tuple[str, AdapterSource, float]


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image request. ``width``/``height`` default to the model's native size."""

    prompt: str
    negative_prompt: str | None = None
    adapters: Sequence[AdapterSpec] = ()
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = "pndm"

    def adapter_refs(self) -> tuple[AdapterRef, ...]:
        """The adapters as ``AdapterRef``s (tuples are read as (key, source, weight))."""
        return tuple(a if isinstance(a, AdapterRef) else AdapterRef(*a) for a in self.adapters)

    def validate(self) -> None:
        """Raise ``ValueError`` for a request no pipeline call could serve."""
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if self.num_images < 1:
            raise ValueError("num_images must be at least 1")
        for size in (self.width, self.height):
            if size is not None and (size < 8 or size % 8):
                raise ValueError("width and height must be positive multiples of 8")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}")
        if self.seed is not None and not 0 <= self.seed <= _MAX_SEED:
            raise ValueError("seed must be between 0 and 2**63 - 1")
        for ref in self.adapter_refs():
            if not math.isfinite(ref.weight):
                raise ValueError(f"adapter {ref.key!r} has a non-finite weight")


@dataclass(frozen=True)
class GenerationProgress:
    """Where a ``generate_batch`` call is: denoising steps done over all its pipeline calls,
    and images finished."""

    step: int
    total_steps: int
    images_done: int
    images_total: int


# Called after every denoising step; answering True stops the call (GenerationCancelled).
ProgressCallback = Callable[[GenerationProgress], bool]


class GenerationCancelled(Exception):
    """A ``generate_batch`` call stopped because its progress callback asked it to."""

    def __init__(self, progress: GenerationProgress) -> None:
        super().__init__(
            f"generation cancelled after step {progress.step} of {progress.total_steps}"
        )
        self.progress = progress


@dataclass(frozen=True)
class GenerationTimings:
    """Seconds spent in each phase (a batch's requests share their group's figures)."""

    adapter_load_s: float
    adapter_switch_s: float
    denoise_s: float
    decode_s: float
    total_s: float


@dataclass
class GenerationResult:
    """Images, the seed of each image, the final latents (CPU, float32) and timings."""

    images: list[Image.Image]
    seeds: list[int]
    timings: GenerationTimings
    adapters: tuple[tuple[str, float], ...]
    latents: torch.Tensor = field(repr=False)


class InferenceEngine:
    """A worker's single Stable Diffusion pipeline with a LoRA slot pool and an adapter cache."""

    def __init__(
        self,
        *,
        pipeline_dir: Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_active: int = 4,
        max_rank: int = 64,
        fetch: Callable[[str], Path] | None = None,
        disk_limit_bytes: int | None = None,
        cpu_limit_bytes: int | None = 2 * 1024**3,
        device_limit_count: int | None = 64,
        device_limit_bytes: int | None = None,
        delete_evicted_files: bool = False,
        target_modules: Mapping[str, Sequence[str]] = DEFAULT_TARGET_MODULES,
        static_graph: bool = False,
    ) -> None:
        if device_limit_count is not None and device_limit_count < max_active:
            raise ValueError("device_limit_count must be at least max_active")
        self.device = torch.device(device)
        self.dtype = dtype
        pipeline = StableDiffusionPipeline.from_pretrained(
            pipeline_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        self.slots = LoraSlotPool(
            {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder},
            max_active=max_active,
            max_rank=max_rank,
            target_modules=target_modules,
            static_graph=static_graph,
        )
        self.cache = AdapterCache(
            make_resident=self.slots.make_resident,
            on_device_evict=self.slots.release,
            fetch=fetch,
            disk_limit_bytes=disk_limit_bytes,
            cpu_limit_bytes=cpu_limit_bytes,
            device_limit_count=device_limit_count,
            device_limit_bytes=device_limit_bytes,
            delete_evicted_files=delete_evicted_files,
        )
        self._lock = threading.Lock()
        unet_config = pipeline.unet.config
        self.default_size = int(unet_config.sample_size) * pipeline.vae_scale_factor

    def snapshot(self) -> dict[str, Any]:
        """The worker's state for /workers: active adapters and each cache tier's contents."""
        cache: CacheSnapshot = self.cache.snapshot()
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_active": self.slots.max_active,
            "max_rank": self.slots.max_rank,
            "active": [{"key": key, "weight": weight} for key, weight in self.slots.active],
            "cache": cache,
        }

    def switch_adapters(self, adapters: Sequence[AdapterSpec]) -> tuple[float, float]:
        """Make ``adapters`` the active set; returns (load seconds, switch seconds)."""
        refs = tuple(a if isinstance(a, AdapterRef) else AdapterRef(*a) for a in adapters)
        with self._lock:
            return self._switch(refs)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request with its adapters (an empty list gives the base model's output)."""
        return self.generate_batch([request])[0]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, on_step: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Run ``requests``, one pipeline call per group of compatible requests (module doc).

        ``on_step`` is called after every denoising step; when it answers True the call stops
        there and raises ``GenerationCancelled`` (cooperative cancel within one step).
        """
        for request in requests:
            request.validate()
        calls = self._plan_calls(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        tracker = _ProgressTracker(
            on_step,
            total_steps=sum(requests[c[0]].num_inference_steps for c in calls),
            images_total=sum(r.num_images for r in requests),
        )
        with self._lock:
            for positions in calls:
                group = [requests[p] for p in positions]
                for position, result in zip(
                    positions, self._run_group(group, tracker), strict=True
                ):
                    results[position] = result
                tracker.images_done += sum(r.num_images for r in group)
        return [r for r in results if r is not None]

    # -- internals ---------------------------------------------------------------------------

    def _group_key(self, request: GenerationRequest) -> tuple[Any, ...]:
        return (
            request.width or self.default_size,
            request.height or self.default_size,
            request.num_inference_steps,
            request.scheduler,
            request.guidance_scale,
        )

    def _plan_calls(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Positions of the requests of each pipeline call: one shape per call, and a union of
        adapters that fits the slots (a request that would overflow it opens another call)."""
        calls: list[list[int]] = []
        unions: list[set[str]] = []
        open_call: dict[tuple[Any, ...], int] = {}
        for position, request in enumerate(requests):
            key = self._group_key(request)
            keys = {ref.key for ref in request.adapter_refs()}
            index = open_call.get(key)
            if index is None or len(unions[index] | keys) > self.slots.max_active:
                index = open_call[key] = len(calls)
                calls.append([])
                unions.append(set())
            calls[index].append(position)
            unions[index] |= keys
        return calls

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _switch(self, refs: Sequence[AdapterRef]) -> tuple[float, float]:
        # Refuse before anything is fetched or loaded.
        if len(refs) > self.slots.max_active:
            raise ValueError(
                f"{len(refs)} adapters requested; the engine has {self.slots.max_active} slots"
            )
        if len({ref.key for ref in refs}) != len(refs):
            raise ValueError("an adapter is requested twice")
        started = time.perf_counter()
        residents = self.cache.activate_many([(ref.key, ref.source) for ref in refs])
        loaded = time.perf_counter()
        self.slots.activate([(r, ref.weight) for r, ref in zip(residents, refs, strict=True)])
        self._sync()
        return loaded - started, time.perf_counter() - loaded

    def _switch_rows(self, group: Sequence[GenerationRequest]) -> tuple[float, float]:
        """A mixed batch: the union of the group's adapters in slots, each image with its own
        weights; returns (load seconds, switch seconds)."""
        union: dict[str, AdapterRef] = {}
        for request in group:
            refs = request.adapter_refs()
            if len({ref.key for ref in refs}) != len(refs):
                raise ValueError("an adapter is requested twice")
            for ref in refs:
                union.setdefault(ref.key, ref)
        if len(union) > self.slots.max_active:
            raise ValueError(
                f"{len(union)} adapters in one batch; the engine has {self.slots.max_active} slots"
            )
        started = time.perf_counter()
        residents = self.cache.activate_many([(ref.key, ref.source) for ref in union.values()])
        loaded = time.perf_counter()
        weights: list[list[float]] = []
        for request in group:
            own = {ref.key: ref.weight for ref in request.adapter_refs()}
            weights += [[own.get(key, 0.0) for key in union]] * request.num_images
        # Classifier-free guidance runs the UNet on [negative rows, positive rows].
        guided = (
            group[0].guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None
        )
        self.slots.activate_rows(residents, weights, repeats={"unet": 2 if guided else 1})
        self._sync()
        return loaded - started, time.perf_counter() - loaded

    def _run_group(
        self, group: Sequence[GenerationRequest], tracker: _ProgressTracker
    ) -> list[GenerationResult]:
        started = time.perf_counter()
        first = group[0]
        own_adapters = [
            tuple((ref.key, float(ref.weight)) for ref in request.adapter_refs())
            for request in group
        ]
        if self.slots.static_graph or len(set(own_adapters)) > 1:
            load_s, switch_s = self._switch_rows(group)
        else:
            load_s, switch_s = self._switch(first.adapter_refs())

        seeds_per_request = [_seeds(request) for request in group]
        prompts = [r.prompt for r in group for _ in range(r.num_images)]
        negatives = [r.negative_prompt or "" for r in group for _ in range(r.num_images)]
        seeds = [seed for request_seeds in seeds_per_request for seed in request_seeds]
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]

        pipeline = self.pipeline
        pipeline.scheduler = make_scheduler(first.scheduler, self._base_scheduler_config)
        denoise_started = time.perf_counter()
        latents = pipeline(
            prompt=prompts,
            negative_prompt=negatives,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            width=first.width or self.default_size,
            height=first.height or self.default_size,
            generator=generators,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=tracker.step_end if tracker.callback else None,
        )[0]
        self._sync()
        decode_started = time.perf_counter()
        images = self._decode(latents)
        self._sync()
        finished = time.perf_counter()

        timings = GenerationTimings(
            adapter_load_s=load_s,
            adapter_switch_s=switch_s,
            denoise_s=decode_started - denoise_started,
            decode_s=finished - decode_started,
            total_s=finished - started,
        )
        latents_cpu = latents.detach().to("cpu", torch.float32)
        results: list[GenerationResult] = []
        offset = 0
        for request_seeds, adapters in zip(seeds_per_request, own_adapters, strict=True):
            end = offset + len(request_seeds)
            results.append(
                GenerationResult(
                    images=images[offset:end],
                    seeds=request_seeds,
                    timings=timings,
                    adapters=adapters,
                    latents=latents_cpu[offset:end].clone(),
                )
            )
            offset = end
        return results

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode as the pipeline's own ``output_type="pil"`` path does (no safety checker)."""
        vae = self.pipeline.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = self.pipeline.image_processor.postprocess(
            decoded, output_type="pil", do_denormalize=[True] * decoded.shape[0]
        )
        return list(images)


def _seeds(request: GenerationRequest) -> list[int]:
    """Image i of a request uses seed + i (a random base seed when the request has none)."""
    base = request.seed if request.seed is not None else random.randrange(_MAX_SEED)
    return [(base + i) % (_MAX_SEED + 1) for i in range(request.num_images)]


class _ProgressTracker:
    """Counts steps across a batch's pipeline calls and relays them to the caller's callback
    (the pipeline's ``callback_on_step_end``); raising from it stops the pipeline at once."""

    def __init__(self, callback: ProgressCallback | None, *, total_steps: int, images_total: int):
        self.callback = callback
        self.total_steps = total_steps
        self.images_total = images_total
        self.step = 0
        self.images_done = 0

    def step_end(
        self, _pipe: Any, _index: int, _timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        self.step = min(self.step + 1, self.total_steps)
        progress = GenerationProgress(
            step=self.step,
            total_steps=self.total_steps,
            images_done=self.images_done,
            images_total=self.images_total,
        )
        if self.callback is not None and self.callback(progress):
            raise GenerationCancelled(progress)
        return kwargs
