"""Plan a training run from a JSON request (`lorastack plan`; the API keeps one resident
`lorastack plan --serve` to plan every `POST /jobs`).

Input: {"pipeline_dir": str, "hyperparameters": {...}, "num_items": int}. Output:
{"plan": {...}} or {"error": {"field": str, "message": str}}; in serve mode a request that
fails otherwise answers {"failed": str} and the loop goes on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any


def serve(requests: IO[str], answers: IO[str]) -> None:
    """Answer one JSON request per line until ``requests`` ends (the API closed the pipe)."""
    for line in requests:
        if not line.strip():
            continue
        try:
            answer = plan_from_request(json.loads(line))
        except Exception as exc:  # one bad request must not end the resident planner
            answer = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def serve_stdio() -> None:
    """``serve`` on stdin/stdout, with anything a library prints moved to stderr so that
    stdout carries answers only."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, answers)


def plan_from_request(request: dict[str, Any]) -> dict[str, Any]:
    """The plan for one request, or the config error naming its field."""
    from workers.engine.training.config import TrainConfig
    from workers.engine.training.errors import ConfigError
    from workers.engine.training.plan import plan_training

    try:
        config = TrainConfig.from_dict(request["hyperparameters"])
        result = plan_training(
            pipeline_dir_or_config=Path(request["pipeline_dir"]),
            config=config,
            num_items=request.get("num_items"),
        )
    except ConfigError as exc:
        return {"error": {"field": exc.field, "message": exc.message}}
    memory = {k: int(v) for k, v in vars(result.memory).items()}
    return {
        "plan": {
            "total_steps": result.total_steps,
            "trainable_params": {
                "unet": result.trainable_params.unet,
                "text_encoder": result.trainable_params.text_encoder,
                "total": result.trainable_params.total,
            },
            "adapter_file_bytes": result.adapter_bytes,
            "peak_memory_bytes": int(result.memory.total),
            "memory": memory,
            "seconds_per_step": result.seconds_per_step,
            "estimated_duration_s": result.estimated_duration_s,
            "assumptions": {
                "assumed_tflops": result.assumed_tflops,
                "flops_per_step": result.flops_per_step,
            },
        }
    }
