"""The evaluator on the tiny pipeline and tiny evaluator models: every metric, by its formula,
deterministic at fixed seeds, and zero strength for an adapter that changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.conftest_inference import (  # noqa: F401 (fixtures)
    lora_files,
    lora_writer,
    single_cpu_thread,
)
from workers.engine.evaluation import metrics
from workers.engine.evaluation.evaluator import AdapterEvaluator, EvaluationSpec
from workers.engine.evaluation.models import EvaluatorModels, build_tiny_evaluators
from workers.engine.inference.generation import AdapterRef, InferenceEngine
from workers.engine.training import TrainItem

SPEC = EvaluationSpec(
    prompts=("a red circle", "a blue triangle"),
    control_prompts=("a city street",),
    seeds=(3, 4),
    num_inference_steps=2,
    batch_size=4,
)


@pytest.fixture(scope="module")
def evaluator_models(tmp_path_factory: pytest.TempPathFactory) -> EvaluatorModels:
    folders = build_tiny_evaluators(tmp_path_factory.mktemp("evaluators"))
    return EvaluatorModels({name: str(path) for name, path in folders.items()})


@pytest.fixture(scope="module")
def engine(tiny_pipeline_dir: Path) -> InferenceEngine:
    return InferenceEngine(pipeline_dir=tiny_pipeline_dir, max_active=2, max_rank=16)


def test_formulas() -> None:
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    y = torch.nn.functional.normalize(x + 0.5)
    assert metrics.cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert metrics.cmmd(x, y) > 0
    expected = 100 * max(float(x[0] @ y[0]), 0.0)
    assert float(metrics.clip_scores(x[:1], y[:1])[0]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics.feature_distances(x[:1], x[:1])[0]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.mean_similarity(x[:2], y).shape == (2,)


def test_spec_refuses_what_cannot_run() -> None:
    with pytest.raises(ValueError, match="target prompt"):
        EvaluationSpec(prompts=())
    with pytest.raises(ValueError, match="unknown metrics"):
        EvaluationSpec(prompts=("a",), metrics=("beauty",))


def test_evaluation_scores_by_the_formulas_and_repeats(
    engine: InferenceEngine,
    evaluator_models: EvaluatorModels,
    lora_files: dict[str, Path],  # noqa: F811
    shape_items: list[TrainItem],
) -> None:
    images = [item.image_path for item in shape_items]
    evaluator = AdapterEvaluator(
        engine=engine, models=evaluator_models, spec=SPEC, training_images=images
    )
    adapter = AdapterRef(key="a", source=lora_files["a"], weight=1.0)
    first = evaluator.evaluate(adapter)
    assert set(first.metrics) == {
        "clip_score",
        "clip_score_base",
        "clip_score_gain",
        "fidelity_dino",
        "fidelity_clip_i",
        "strength",
        "leakage",
        "cmmd",
    }
    assert first.methods["distance"] == "dino_cosine"
    assert len(first.pairs) == 6 and [p["kind"] for p in first.per_prompt] == [
        "target",
        "target",
        "control",
    ]
    assert first.metrics["strength"] > 0 and first.metrics["leakage"] > 0

    # By hand, from the images: the mean DINO cosine distance over the target pairs.
    targets = [p for p in first.pairs if p.kind == "target"]
    base = evaluator_models.dino_images([p.base for p in targets])
    lora = evaluator_models.dino_images([p.lora for p in targets])
    by_hand = float((1 - (base * lora).sum(dim=-1)).mean())
    assert first.metrics["strength"] == pytest.approx(by_hand, abs=1e-6)
    red = [p for p in first.pairs if p.prompt == "a red circle"]
    text = evaluator_models.clip_text(["a red circle"])
    scores = [100 * max(float(evaluator_models.clip_images([p.lora]) @ text.T), 0.0) for p in red]
    assert first.per_prompt[0]["clip_score"] == pytest.approx(sum(scores) / 2, abs=1e-4)

    # Deterministic: the same numbers again, and from a fresh evaluator (fresh base images).
    again = AdapterEvaluator(
        engine=engine, models=evaluator_models, spec=SPEC, training_images=images
    ).evaluate(adapter)
    assert again.metrics == first.metrics and again.per_prompt == first.per_prompt

    # An adapter at weight 0 changes nothing: no strength, no leakage, no CLIP gain.
    still = evaluator.evaluate(AdapterRef(key="a", source=lora_files["a"], weight=0.0))
    assert still.metrics["strength"] == pytest.approx(0.0, abs=1e-5)
    assert still.metrics["leakage"] == pytest.approx(0.0, abs=1e-5)
    assert still.metrics["clip_score_gain"] == pytest.approx(0.0, abs=1e-3)


def test_cmmd_needs_enough_training_images(
    engine: InferenceEngine,
    evaluator_models: EvaluatorModels,
    lora_files: dict[str, Path],  # noqa: F811
    shape_items: list[TrainItem],
) -> None:
    spec = EvaluationSpec(
        prompts=("a red circle",), seeds=(1,), num_inference_steps=2, metrics=("cmmd", "leakage")
    )
    evaluator = AdapterEvaluator(
        engine=engine,
        models=evaluator_models,
        spec=spec,
        training_images=[i.image_path for i in shape_items[:2]],
    )
    result = evaluator.evaluate(AdapterRef(key="a", source=lora_files["a"]))
    # Too few training images for CMMD, and no control prompt to measure leakage on.
    assert result.metrics == {} and result.per_prompt == [
        {"prompt": "a red circle", "kind": "target"}
    ]
