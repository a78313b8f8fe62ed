"""The API's resident planner: a real child process, answers per line, timeouts and deaths."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from service.jobs.planner import PLANNER_COMMAND, PlannerUnavailable, ResidentPlanner


def _child(script: str) -> tuple[str, ...]:
    return (sys.executable, "-c", script)


ECHO = """
import json, sys
for n, line in enumerate(sys.stdin):
    request = json.loads(line)
    print(json.dumps({"plan": {"n": n, "request": request}}), flush=True)
"""


def test_one_child_answers_request_after_request_and_remembers_equal_ones() -> None:
    planner = ResidentPlanner(_child(ECHO), cache_size=2)
    try:
        first = planner.plan({"a": 1}, timeout_s=30)
        assert first == {"plan": {"n": 0, "request": {"a": 1}}}
        assert planner.plan({"a": 2}, timeout_s=30)["plan"]["n"] == 1  # the same child
        assert planner.plan({"a": 1}, timeout_s=30) == first  # remembered, not asked again
        planner.plan({"a": 3}, timeout_s=30)
        planner.plan({"a": 4}, timeout_s=30)  # {"a": 1} falls out of the two remembered
        assert planner.plan({"a": 1}, timeout_s=30)["plan"]["n"] == 4
    finally:
        planner.close()


def test_a_silent_child_times_out_and_the_next_request_gets_a_fresh_one() -> None:
    script = "import sys, time\nif sys.stdin.readline(): time.sleep(60)"
    planner = ResidentPlanner(_child(script))
    try:
        started = time.monotonic()
        with pytest.raises(PlannerUnavailable) as caught:
            planner.plan({"a": 1}, timeout_s=0.5)
        assert caught.value.code == "planner_timeout"
        assert time.monotonic() - started < 10
        with pytest.raises(PlannerUnavailable):
            planner.plan({"a": 2}, timeout_s=0.5)
    finally:
        planner.close()


def test_a_child_that_dies_or_fails_is_reported_with_its_words() -> None:
    dying = ResidentPlanner(_child("import sys; sys.stderr.write('no torch here'); sys.exit(3)"))
    with pytest.raises(PlannerUnavailable) as caught:
        dying.plan({"a": 1}, timeout_s=30)
    assert caught.value.code == "planner_failed" and "no torch here" in caught.value.message
    dying.close()

    failing = ResidentPlanner(
        _child('import sys\nfor line in sys.stdin: print(\'{"failed": "boom"}\', flush=True)')
    )
    try:
        with pytest.raises(PlannerUnavailable) as caught:
            failing.plan({"a": 1}, timeout_s=30)
        assert "boom" in caught.value.message
    finally:
        failing.close()


def test_the_real_planner_serves_plans_and_config_errors(tiny_model_dir: Path) -> None:
    planner = ResidentPlanner(PLANNER_COMMAND)
    try:
        request = {"pipeline_dir": str(tiny_model_dir), "num_items": 4}
        plan = planner.plan({**request, "hyperparameters": {"rank": 4}}, timeout_s=120)
        assert plan["plan"]["trainable_params"]["total"] > 0
        error = planner.plan({**request, "hyperparameters": {"nonsense": 1}}, timeout_s=120)
        assert error["error"]["field"] == "nonsense"
    finally:
        planner.close()
