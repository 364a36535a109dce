"""A real ``shmpool serve`` in a subprocess, for the tests of the command line and metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from conftest import MP_TIMEOUT, wait_for

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(address: str) -> bool:
    """Whether a manager accepts connections at ``address``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


def shmpool_cmd(*args: str) -> list[str]:
    """``python -m shmpool ARGS`` with this interpreter."""
    return [sys.executable, "-m", "shmpool", *args]


def child_env(**extra: str) -> dict[str, str]:
    """Our environment, with this checkout first on the path and ``extra`` added."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


class Serve:
    """``shmpool serve --address ADDRESS ARGS`` running, its stderr in ``log``.

    ``with Serve(...) as s:`` waits until it listens (or fails if it exits
    first) and, at the end, stops it with SIGTERM unless it already ended.
    """

    def __init__(
        self, address: str, *args: str, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.address = address
        self.log = log
        cmd = shmpool_cmd("serve", "--address", address, *args)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, env=dict(env or child_env()), cwd=ROOT
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.text()}")
            return listening(self.address)

        wait_for(up)

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the serve process."""
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        return self.proc.wait(MP_TIMEOUT)

    def __enter__(self) -> Serve:
        try:
            self.wait_listening()
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self._kill()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(MP_TIMEOUT)
        with contextlib.suppress(OSError):
            os.unlink(self.address)  # left only by a killed manager


@contextlib.contextmanager
def serving(address: str, *args: str, log: Path, **env: str) -> Iterator[Serve]:
    """``Serve`` as a plain context manager, with ``env`` added to our environment."""
    with Serve(address, *args, log=log, env=child_env(**env)) as server:
        yield server
