"""A resident training planner: one `lorastack plan --serve` child process per API process.

The planner needs torch and diffusers, which the API process never imports, so it runs as a
child. Started for every request it would cost seconds of imports each time; kept resident it
answers in a fraction of a second (the meta-device pass only), which is what lets `POST /jobs`
check every run's plan by default. Requests go one at a time over the child's stdin and
stdout as JSON lines; answers for equal requests are remembered (plans are deterministic).

The child exits when its stdin closes, so it never outlives the API. A child that does not
answer in time is killed; the next request starts a fresh one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from typing import IO, Any

# The `lorastack plan` command, run through this interpreter: the planner needs torch.
PLANNER_COMMAND = (sys.executable, "-m", "lorastack.cli", "plan", "--serve")


class PlannerUnavailable(Exception):
    """The planner could not answer: ``code`` is ``planner_timeout`` or ``planner_failed``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ResidentPlanner:
    """Plans through one long-lived child process; thread-safe, one request at a time."""

    def __init__(
        self, command: tuple[str, ...] = PLANNER_COMMAND, *, cache_size: int = 256
    ) -> None:
        self._command = command
        self._cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._pending = b""

    def plan(self, request: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """The child's answer: ``{"plan": ...}`` or ``{"error": {"field", "message"}}``."""
        key = json.dumps(request, sort_keys=True)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            answer = self._ask(key, timeout_s)
            if "plan" in answer or "error" in answer:
                self._cache[key] = answer
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                return answer
            raise PlannerUnavailable(
                "planner_failed", f"the training planner failed: {answer.get('failed')}"
            )

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ask(self, line: str, timeout_s: float) -> dict[str, Any]:
        proc = self._ensure_started()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died() from None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self._stop()
                    raise PlannerUnavailable(
                        "planner_timeout", f"the training planner took over {timeout_s:g} s"
                    )
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise self._died()
                self._pending += chunk
        answer_line, self._pending = self._pending.split(b"\n", 1)
        try:
            answer: dict[str, Any] = json.loads(answer_line)
        except json.JSONDecodeError:
            self._stop()
            raise PlannerUnavailable(
                "planner_failed", "the training planner wrote something that is not JSON"
            ) from None
        return answer

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        # Closed in _stop, with the child it belongs to.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            list(self._command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._pending = b""
        return self._proc

    def _died(self) -> PlannerUnavailable:
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip()[-300:]
        self._stop()
        return PlannerUnavailable("planner_failed", f"the training planner exited: {tail}")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a write buffered for a dead child
                        stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._pending = b""


PLANNER = ResidentPlanner()
atexit.register(PLANNER.close)
