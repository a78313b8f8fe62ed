"""Evaluation of a training job in its worker (docs/evaluation.md).

At each checkpoint (and for the final weights) the engine's ``AdapterEvaluator`` renders the
job's prompts with and without the LoRA on the process's warm ``InferenceEngine`` (the one
``/generate`` uses: no second copy of the base model) and scores them with the evaluator
models, which are loaded once per process next to it. Each evaluation is stored in SQL as a
``metrics`` event (aggregates, per-prompt figures, image ids) and on its checkpoint row; the
events are what the end of the run reads back, so a run resumed on another worker still sees
the checkpoints evaluated before. The best checkpoint so far (by ``evaluation.select``) has its
weights copied into the adapter store, so retention cannot remove them before it is published.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import lifecycle
from service.db import transaction
from service.lifecycle import LeasedJob
from service.models import Checkpoint, Image, JobEvent
from service.publishing import store_job_weights
from service.storage import StoredObject
from workers.images import store_png
from workers.runtime import WorkerRuntime

if TYPE_CHECKING:
    from workers.engine.evaluation.evaluator import AdapterEvaluator, Evaluation
    from workers.engine.evaluation.models import EvaluatorModels

log = logging.getLogger("lorastack.worker")

_models: EvaluatorModels | None = None


def get_evaluator_models(rt: WorkerRuntime) -> EvaluatorModels:
    """The process's evaluator models, loaded once (the tiny ones built on first use when none
    are configured)."""
    global _models
    if _models is None:
        from workers.engine.evaluation.models import EvaluatorModels

        settings = rt.settings
        if not settings.evaluator_models:
            _ensure_tiny_evaluators(settings.tiny_evaluators_dir)
        _models = EvaluatorModels(settings.evaluator_sources, device=rt.info.get("device", "cpu"))
    return _models


def _ensure_tiny_evaluators(folder: Path) -> None:
    """Build the tiny evaluators into ``folder`` once (a temporary folder renamed into place,
    so two workers starting together cannot leave a half-written one)."""
    from workers.engine.evaluation.models import EVALUATOR_NAMES, build_tiny_evaluators

    if all((folder / name / "config.json").is_file() for name in EVALUATOR_NAMES):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_evaluators(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another worker's build got there first
        shutil.rmtree(tmp, ignore_errors=True)


class EvaluationUnavailable(Exception):
    """This worker cannot evaluate the job (e.g. its warm pipeline is another base model)."""


@dataclass(frozen=True)
class Select:
    """The aggregate that ranks checkpoints, and whether more is better."""

    metric: str
    mode: str

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value > than if self.mode == "max" else value < than

    def best(self, records: dict[int, dict[str, Any]]) -> int | None:
        """The step whose record is best (the earliest of equals); None when none has it."""
        best_step, best_value = None, None
        for step in sorted(records):
            value = records[step]["evaluation"].get(self.metric)
            finite = isinstance(value, int | float) and math.isfinite(value)
            if finite and self.better(value, best_value):
                best_step, best_value = step, value
        return best_step


@dataclass(frozen=True)
class EvaluationOutcome:
    """Every evaluated step's event data, the final step and the best one."""

    records: dict[int, dict[str, Any]]
    final_step: int
    best_step: int | None
    select: Select

    def stored_weights(self, step: int) -> StoredObject:
        weights = self.records[step]["weights"]
        return StoredObject(key=weights["key"], sha256=weights["sha256"], size=weights["size"])

    def summary(self) -> dict[str, Any]:
        """What the job's result says about its evaluation."""
        return {
            "select": {"metric": self.select.metric, "mode": self.select.mode},
            "best_step": self.best_step,
            "final_step": self.final_step,
            "checkpoints": [
                {"step": step, "metrics": self.records[step]["evaluation"]}
                for step in sorted(self.records)
            ],
        }


class JobEvaluation:
    """A training job's evaluation: the engine's evaluator for its prompts and training images,
    and the SQL records of what it scored."""

    def __init__(self, rt: WorkerRuntime, job: LeasedJob, *, training_images: list[Path]):
        from service.job_params import TrainParams

        self.rt = rt
        self.job = job
        params = TrainParams.model_validate(job.params)
        assert params.evaluation is not None
        self.config: dict[str, Any] = params.evaluation
        self.every = bool(self.config.get("every", True))
        choice = self.config.get("select") or {}
        self.select = Select(choice.get("metric", "clip_score"), choice.get("mode", "max"))
        self.training_images = training_images
        self._evaluator: AdapterEvaluator | None = None
        self._base_image_ids: dict[tuple[str, int], str] = {}

    # -- one evaluation ----------------------------------------------------------------------

    def evaluate_checkpoint(self, step: int, weights: Path) -> None:
        """Score a checkpoint; a failure to evaluate is reported, and training goes on."""
        try:
            key = str(weights.relative_to(self.rt.store.root))
            self._evaluate(step=step, weights=weights, key=key, checkpoint=True)
        except EvaluationUnavailable as exc:
            self._warn(step, str(exc))

    def evaluate_if_missing(self, step: int, weights: Path) -> None:
        """Score a checkpoint that has no evaluation record yet (a run resumed from it after
        its worker was lost mid-evaluation)."""
        if step not in self.records() and weights.exists():
            self.evaluate_checkpoint(step, weights)

    def _evaluate(self, *, step: int, weights: Path, key: str, checkpoint: bool) -> dict[str, Any]:
        from workers.engine.inference.generation import AdapterRef
        from workers.engine.inference.lora_file import AdapterFormatError

        try:
            result = self._get_evaluator().evaluate(AdapterRef(key=key))
        except AdapterFormatError as exc:
            raise EvaluationUnavailable(
                f"the inference engine cannot load the adapter: {exc}"
            ) from exc
        previous = self.records()
        best_before = self.select.best(previous)
        value = result.metrics.get(self.select.metric)
        stored: StoredObject | None = None
        is_best = value is not None and (
            best_before is None
            or self.select.better(value, previous[best_before]["evaluation"][self.select.metric])
        )
        if is_best or not checkpoint:
            # Kept in the adapter store: retention may remove the checkpoint folder before the
            # end of the run publishes it.
            stored = store_job_weights(
                self.rt.store,
                self.rt.settings,
                base_model=self.job.base_model or "",
                weights=weights,
            ).stored
        return self._record(step, result, stored=stored, checkpoint=checkpoint, previous=previous)

    def _get_evaluator(self) -> AdapterEvaluator:
        if self._evaluator is None:
            from workers.engine.evaluation.evaluator import AdapterEvaluator, EvaluationSpec
            from workers.generation import get_engine

            settings = self.rt.settings
            if self.job.base_model != settings.default_base_model:
                raise EvaluationUnavailable(
                    f"this worker's warm pipeline is {settings.default_base_model!r}, "
                    f"not the job's base model {self.job.base_model!r}"
                )
            spec = EvaluationSpec.from_dict(
                self.config,
                batch_size=settings.eval_batch_size,
                cmmd_min_images=settings.eval_cmmd_min_images,
                max_reference_images=settings.eval_max_reference_images,
            )
            self._evaluator = AdapterEvaluator(
                engine=get_engine(self.rt),
                models=get_evaluator_models(self.rt),
                spec=spec,
                training_images=self.training_images,
            )
        return self._evaluator

    def _record(
        self,
        step: int,
        result: Evaluation,
        *,
        stored: StoredObject | None,
        checkpoint: bool,
        previous: dict[int, dict[str, Any]],
    ) -> dict[str, Any]:
        """Store the images and the same-seed grid, then the event and the checkpoint's
        metrics, in one transaction."""
        with transaction(self.rt.session_factory) as session:
            images = []
            for pair in result.pairs:
                base_id = self._base_image_ids.get((pair.prompt, pair.seed))
                if base_id is None:
                    base_id = self._store_image(session, pair.base, pair.seed)
                    self._base_image_ids[(pair.prompt, pair.seed)] = base_id
                lora_id = self._store_image(session, pair.lora, pair.seed)
                images.append(
                    {
                        "prompt": pair.prompt,
                        "kind": pair.kind,
                        "seed": pair.seed,
                        "base_image_id": base_id,
                        "lora_image_id": lora_id,
                    }
                )
            data: dict[str, Any] = {
                "step": step,
                "evaluation": result.metrics,
                "methods": result.methods,
                "per_prompt": result.per_prompt,
                "images": images,
                "render_s": round(result.render_s, 3),
                "score_s": round(result.score_s, 3),
                "checkpoint": checkpoint,
            }
            data["grid"] = self._grid(session, step, result, previous)
            if stored is not None:
                data["weights"] = {"key": stored.key, "sha256": stored.sha256, "size": stored.size}
            if checkpoint:
                row = session.scalar(
                    select(Checkpoint).where(
                        Checkpoint.job_id == self.job.id, Checkpoint.step == step
                    )
                )
                if row is not None:
                    row.metrics = {
                        **row.metrics,
                        "evaluation": result.metrics,
                        "evaluation_per_prompt": result.per_prompt,
                    }
            lifecycle.add_event(session, job_id=self.job.id, type="metrics", data=data)
        return data

    def _grid(
        self,
        session: Session,
        step: int,
        result: Evaluation,
        previous: dict[int, dict[str, Any]],
    ) -> dict[str, Any]:
        """The same-seed grid: a row per prompt (target, then control), a column for the base
        model and one per evaluated step so far, at the first seed."""
        from workers.engine.grid import compose_grid

        seed = result.pairs[0].seed
        firsts = [pair for pair in result.pairs if pair.seed == seed]
        prompts = [pair.prompt for pair in firsts]
        columns: list[list[Any]] = [[pair.base for pair in firsts]]
        labels = ["base"]
        for earlier in sorted(s for s in previous if s != step):
            by_prompt = {
                i["prompt"]: i["lora_image_id"]
                for i in previous[earlier].get("images", [])
                if i["seed"] == seed
            }
            columns.append([self._load_image(session, by_prompt.get(p)) for p in prompts])
            labels.append(f"step {earlier}")
        columns.append([pair.lora for pair in firsts])
        labels.append(f"step {step}")
        row_labels = [
            pair.prompt if pair.kind == "target" else f"(control) {pair.prompt}" for pair in firsts
        ]
        cells = [[column[r] for column in columns] for r in range(len(prompts))]
        grid, layout = compose_grid(cells, row_labels=row_labels, column_labels=labels)
        return {
            "image_id": self._store_image(session, grid, seed),
            "seed": seed,
            "rows": row_labels,
            "columns": labels,
            "layout": layout.to_json(),
        }

    def _load_image(self, session: Session, image_id: str | None) -> Any:
        """A stored image by id, or None (a blank cell) when it is gone."""
        from PIL import Image as PILImage

        row = session.get(Image, image_id) if image_id else None
        if row is None or not self.rt.store.exists(row.storage_key):
            return None
        with PILImage.open(self.rt.store.path(row.storage_key)) as picture:
            return picture.convert("RGB")

    def _store_image(self, session: Any, picture: Any, seed: int) -> str:
        return store_png(
            session,
            self.rt.store,
            tenant_id=self.job.tenant_id,
            job_id=self.job.id,
            picture=picture,
            seed=seed,
        )

    def _warn(self, step: int, message: str) -> None:
        log.warning("evaluate %s at step %s: %s", self.job.id, step, message)
        with transaction(self.rt.session_factory) as session:
            lifecycle.add_event(
                session,
                job_id=self.job.id,
                type="message",
                level="warning",
                data={"step": step, "message": f"evaluation skipped: {message}"},
            )

    # -- the end of the run ------------------------------------------------------------------

    def records(self) -> dict[int, dict[str, Any]]:
        """Every evaluation of this job so far, by step (the newest record of a step wins)."""
        with self.rt.session_factory() as session:
            rows = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == self.job.id, JobEvent.type == "metrics")
                .order_by(JobEvent.seq)
            ).all()
        return {int(e.data["step"]): e.data for e in rows if "evaluation" in e.data}

    def conclude(self, *, final_step: int, final_weights: Path) -> EvaluationOutcome | None:
        """Evaluate the final weights (unless the last checkpoint was those weights) and pick
        the best step. None when nothing could be evaluated."""
        records = self.records()
        if final_step not in records:
            try:
                self._evaluate(
                    step=final_step,
                    weights=final_weights,
                    key=self._final_key(final_weights),
                    checkpoint=False,
                )
            except EvaluationUnavailable as exc:
                self._warn(final_step, str(exc))
            records = self.records()
        if final_step not in records:
            return None
        if "weights" not in records[final_step]:
            # The last checkpoint's record: not the best when evaluated, so not stored then.
            stored = store_job_weights(
                self.rt.store,
                self.rt.settings,
                base_model=self.job.base_model or "",
                weights=final_weights,
            ).stored
            records[final_step] = {
                **records[final_step],
                "weights": {"key": stored.key, "sha256": stored.sha256, "size": stored.size},
            }
        best = self.select.best(records)
        if best is not None and "weights" not in records[best]:
            best = None  # cannot happen: every best-so-far was stored when it was evaluated
        return EvaluationOutcome(
            records=records, final_step=final_step, best_step=best, select=self.select
        )

    def _final_key(self, final_weights: Path) -> str:
        """The canonical final file in the adapter store (what the published version serves)."""
        stored = store_job_weights(
            self.rt.store,
            self.rt.settings,
            base_model=self.job.base_model or "",
            weights=final_weights,
        ).stored
        return stored.key
