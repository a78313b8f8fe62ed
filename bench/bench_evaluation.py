"""What evaluation adds to a training run: seconds per checkpoint per prompt, against a
training step, on the tiny model and tiny evaluator models (CPU).

Trains a LoRA with our trainer (timing its steps after the first), then evaluates the result
the way a training job does at each checkpoint: every prompt at every seed with the LoRA on the
warm InferenceEngine, scored with the evaluator models. The first evaluation of a run also
renders the base images (once per run); the later ones, the per-checkpoint cost, render the
LoRA images only. Run:

    .venv/bin/python bench/bench_evaluation.py [--steps 12] [--eval-steps 20] [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from workers.engine.evaluation.evaluator import AdapterEvaluator, EvaluationSpec
from workers.engine.evaluation.models import EvaluatorModels, build_tiny_evaluators
from workers.engine.inference.generation import AdapterRef, InferenceEngine
from workers.engine.model_builder import build_pipeline_folder
from workers.engine.training import NullCallbacks, StepProgress, TrainConfig, TrainItem, train_lora

PROMPTS = ("a red square", "a blue circle")
CONTROL = ("a city street at night",)


class StepClock(NullCallbacks):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, progress: StepProgress) -> None:
        self.times.append(time.perf_counter())


def make_items(folder: Path) -> list[TrainItem]:
    items = []
    for index, (colour, name) in enumerate([((220, 30, 30), "red"), ((40, 60, 230), "blue")] * 2):
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        ImageDraw.Draw(image).rectangle((12, 12, 52, 52), fill=colour)
        path = folder / f"{index}.png"
        image.save(path)
        items.append(TrainItem(path, (f"a {name} square",)))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="training steps")
    parser.add_argument("--eval-steps", type=int, default=20, help="inference steps per image")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="per-checkpoint evaluations timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline_dir = build_pipeline_folder("tiny", root / "tiny")
        items = make_items(root)
        clock = StepClock()
        config = TrainConfig.from_dict(
            {
                "rank": 4,
                "resolution": 64,
                "max_steps": args.steps,
                "seed": 0,
                "checkpoint_every": 10_000,
                "learning_rate": 1e-3,
            }
        )
        result = train_lora(
            pipeline_dir=pipeline_dir,
            items=items,
            config=config,
            output_dir=root / "run",
            callbacks=clock,
        )
        step_s = statistics.median(
            b - a for a, b in zip(clock.times, clock.times[1:], strict=False)
        )
        folders = build_tiny_evaluators(root / "evaluators")
        models = EvaluatorModels({name: str(path) for name, path in folders.items()})
        engine = InferenceEngine(pipeline_dir=pipeline_dir, max_active=2, max_rank=16)
        spec = EvaluationSpec(
            prompts=PROMPTS,
            control_prompts=CONTROL,
            seeds=tuple(range(args.seeds)),
            num_inference_steps=args.eval_steps,
        )
        evaluator = AdapterEvaluator(
            engine=engine, models=models, spec=spec, training_images=[i.image_path for i in items]
        )
        adapter = AdapterRef(key="bench", source=result.adapter_path)
        started = time.perf_counter()
        evaluator.evaluate(adapter)
        first_s = time.perf_counter() - started
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            evaluation = evaluator.evaluate(adapter)
            timings.append((time.perf_counter() - started, evaluation.render_s, evaluation.score_s))
    prompts = len(PROMPTS) + len(CONTROL)
    per_checkpoint = statistics.median(t[0] for t in timings)
    render = statistics.median(t[1] for t in timings)
    score = statistics.median(t[2] for t in timings)
    per_prompt = per_checkpoint / prompts
    print(
        f"tiny model, CPU, 1 thread: {prompts} prompts x {args.seeds} seeds, "
        f"{args.eval_steps} inference steps, resolution 64"
    )
    print(f"training step (median):               {step_s * 1000:8.1f} ms")
    print(f"first evaluation (+ base images):     {first_s * 1000:8.1f} ms")
    print(
        f"per checkpoint (median of {args.repeats}):       {per_checkpoint * 1000:8.1f} ms"
        f"  (render {render * 1000:.1f}, score {score * 1000:.1f})"
    )
    print(
        f"per checkpoint per prompt:            {per_prompt * 1000:8.1f} ms"
        f"  = {per_prompt / step_s:.2f} training steps"
    )


if __name__ == "__main__":
    main()
