"""``AdapterEvaluator``: one adapter (a checkpoint or a version) judged against the base model.

Every target and control prompt is rendered at every seed without the LoRA and with it, on the
worker's warm ``InferenceEngine`` (its pipeline and slot pool: no second copy of the base
model), in batches of compatible requests. The images without the LoRA do not change during a
run, so they are rendered once per evaluator. The images are then embedded with the evaluator
models and scored (``metrics``): per prompt (mean over seeds) and aggregated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import torch
from PIL import Image

from workers.engine.evaluation import metrics as formulas
from workers.engine.evaluation.models import EvaluatorModels
from workers.engine.inference.generation import AdapterRef, GenerationRequest, InferenceEngine

METRICS: Final = ("clip_score", "fidelity", "strength", "leakage", "cmmd")
# The aggregate figures each metric adds (what ``select`` may name).
AGGREGATES: Final[dict[str, tuple[str, ...]]] = {
    "clip_score": ("clip_score", "clip_score_base", "clip_score_gain"),
    "fidelity": ("fidelity_dino", "fidelity_clip_i"),
    "strength": ("strength",),
    "leakage": ("leakage",),
    "cmmd": ("cmmd",),
}
# LPIPS needs torchvision, which this engine does not depend on: strength and leakage are the
# cosine distance of DINO features, and say so in their output.
FEATURE_DISTANCE: Final = "dino_cosine"
_DIGITS = 6
_T = TypeVar("_T")


@dataclass(frozen=True)
class EvaluationSpec:
    """What to render and score (the job's ``evaluation`` with its defaults filled in)."""

    prompts: tuple[str, ...]
    control_prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1)
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    metrics: tuple[str, ...] = METRICS
    batch_size: int = 8  # images per pipeline call
    cmmd_min_images: int = 4  # training images needed before CMMD is reported
    max_reference_images: int = 64  # training images embedded for fidelity and CMMD

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("evaluation needs at least one target prompt")
        if not self.seeds:
            raise ValueError("evaluation needs at least one seed")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {list(METRICS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **limits: int) -> EvaluationSpec:
        """From the job's stored ``evaluation`` (unknown keys, such as ``select``, ignored)."""
        return cls(
            prompts=tuple(data["prompts"]),
            control_prompts=tuple(data.get("control_prompts") or ()),
            seeds=tuple(int(s) for s in data.get("seeds") or (0, 1)),
            num_inference_steps=int(data.get("num_inference_steps", 20)),
            guidance_scale=float(data.get("guidance_scale", 7.5)),
            metrics=tuple(data.get("metrics") or METRICS),
            **limits,
        )

    def cells(self) -> list[tuple[str, str, int]]:
        """(prompt, kind, seed) of every image pair, target prompts first."""
        kinds = [(p, "target") for p in self.prompts] + [
            (p, "control") for p in self.control_prompts
        ]
        return [(prompt, kind, seed) for prompt, kind in kinds for seed in self.seeds]


@dataclass(frozen=True)
class ImagePair:
    """One prompt at one seed, rendered without and with the adapter."""

    prompt: str
    kind: str  # "target" or "control"
    seed: int
    base: Image.Image
    lora: Image.Image


@dataclass(frozen=True)
class Evaluation:
    """Aggregates (``metrics``), per-prompt figures, how they were computed, and the images."""

    metrics: dict[str, float]
    per_prompt: list[dict[str, Any]]
    methods: dict[str, str]
    pairs: list[ImagePair] = field(repr=False)
    render_s: float
    score_s: float


class AdapterEvaluator:
    """Scores adapters for one run: base images and training-image embeddings are kept."""

    def __init__(
        self,
        *,
        engine: InferenceEngine,
        models: EvaluatorModels,
        spec: EvaluationSpec,
        training_images: Sequence[Path],
    ) -> None:
        self.engine = engine
        self.models = models
        self.spec = spec
        self.training_images = list(training_images)[: spec.max_reference_images]
        self._base: dict[tuple[str, int], Image.Image] = {}
        self._references: dict[str, torch.Tensor] = {}

    def evaluate(self, adapter: AdapterRef) -> Evaluation:
        """Render and score ``adapter`` against the base model at the spec's seeds."""
        started = time.perf_counter()
        cells = self.spec.cells()
        missing = sorted({(p, s) for p, _, s in cells} - set(self._base))
        for (prompt, seed), image in zip(missing, self._render(missing, ()), strict=True):
            self._base[(prompt, seed)] = image
        lora_images = self._render([(p, s) for p, _, s in cells], (adapter,))
        pairs = [
            ImagePair(prompt, kind, seed, self._base[(prompt, seed)], lora)
            for (prompt, kind, seed), lora in zip(cells, lora_images, strict=True)
        ]
        rendered = time.perf_counter()
        per_prompt, aggregates = self.score(pairs)
        methods = {}
        if {"strength", "leakage"} & set(self.spec.metrics):
            methods["distance"] = FEATURE_DISTANCE
        if "fidelity" in self.spec.metrics:
            methods["fidelity"] = "dino, clip_i: mean cosine similarity to the training images"
        return Evaluation(
            metrics=aggregates,
            per_prompt=per_prompt,
            methods=methods,
            pairs=pairs,
            render_s=rendered - started,
            score_s=time.perf_counter() - rendered,
        )

    def score(self, pairs: Sequence[ImagePair]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Per-prompt figures (means over seeds) and the aggregates, from rendered pairs."""
        wanted = set(self.spec.metrics)
        lora = [p.lora for p in pairs]
        base = [p.base for p in pairs]
        columns: dict[str, torch.Tensor] = {}
        if wanted & {"clip_score", "fidelity", "cmmd"}:
            clip_lora = self.models.clip_images(lora)
        if "clip_score" in wanted:
            texts = self.models.clip_text([p.prompt for p in pairs])
            columns["clip_score"] = formulas.clip_scores(clip_lora, texts)
            columns["clip_score_base"] = formulas.clip_scores(self.models.clip_images(base), texts)
        if wanted & {"fidelity", "strength", "leakage"}:
            dino_lora = self.models.dino_images(lora)
        if "fidelity" in wanted and self.training_images:
            columns["fidelity_dino"] = formulas.mean_similarity(dino_lora, self._reference("dino"))
            columns["fidelity_clip_i"] = formulas.mean_similarity(
                clip_lora, self._reference("clip")
            )
        if wanted & {"strength", "leakage"}:
            columns["distance"] = formulas.feature_distances(
                self.models.dino_images(base), dino_lora
            )
        per_prompt = self._per_prompt(pairs, columns)
        aggregates = self._aggregates(pairs, columns)
        if "cmmd" in wanted and len(self.training_images) >= self.spec.cmmd_min_images:
            targets = torch.tensor([p.kind == "target" for p in pairs])
            aggregates["cmmd"] = round(
                formulas.cmmd(clip_lora[targets], self._reference("clip")), _DIGITS
            )
        return per_prompt, aggregates

    # -- internals ---------------------------------------------------------------------------

    def _render(
        self, cells: Sequence[tuple[str, int]], adapters: tuple[AdapterRef, ...]
    ) -> list[Image.Image]:
        requests = [
            GenerationRequest(
                prompt=prompt,
                adapters=adapters,
                num_inference_steps=self.spec.num_inference_steps,
                guidance_scale=self.spec.guidance_scale,
                seed=seed,
            )
            for prompt, seed in cells
        ]
        images: list[Image.Image] = []
        for chunk in _chunks(requests, self.spec.batch_size):
            images.extend(r.images[0] for r in self.engine.generate_batch(chunk))
        return images

    def _reference(self, model: str) -> torch.Tensor:
        if model not in self._references:
            pictures = []
            for path in self.training_images:
                with Image.open(path) as picture:
                    pictures.append(picture.convert("RGB"))
            embed = self.models.clip_images if model == "clip" else self.models.dino_images
            self._references[model] = torch.cat([embed(c) for c in _chunks(pictures, 16)])
        return self._references[model]

    def _per_prompt(
        self, pairs: Sequence[ImagePair], columns: dict[str, torch.Tensor]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        order = list(dict.fromkeys((p.prompt, p.kind) for p in pairs))
        for prompt, kind in order:
            rows = torch.tensor([(p.prompt, p.kind) == (prompt, kind) for p in pairs])
            entry: dict[str, Any] = {"prompt": prompt, "kind": kind}
            for name, values in columns.items():
                key = name
                if name == "distance":
                    key = "strength" if kind == "target" else "leakage"
                    if key not in self.spec.metrics:
                        continue
                elif name.startswith("fidelity_") and kind != "target":
                    continue
                entry[key] = round(float(values[rows].mean()), _DIGITS)
            out.append(entry)
        return out

    def _aggregates(
        self, pairs: Sequence[ImagePair], columns: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        wanted = set(self.spec.metrics)
        target = torch.tensor([p.kind == "target" for p in pairs])
        control = ~target
        out: dict[str, float] = {}

        def mean(name: str, rows: torch.Tensor) -> float:
            return round(float(columns[name][rows].mean()), _DIGITS)

        if "clip_score" in columns:
            out["clip_score"] = mean("clip_score", target)
            out["clip_score_base"] = mean("clip_score_base", target)
            out["clip_score_gain"] = round(out["clip_score"] - out["clip_score_base"], _DIGITS)
        if "fidelity_dino" in columns:
            out["fidelity_dino"] = mean("fidelity_dino", target)
            out["fidelity_clip_i"] = mean("fidelity_clip_i", target)
        if "strength" in wanted:
            out["strength"] = mean("distance", target)
        if "leakage" in wanted and bool(control.any()):
            out["leakage"] = mean("distance", control)
        return out


def _chunks(items: Sequence[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + size])
