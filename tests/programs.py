"""Run a Python program the way a user would, and check that it leaves nothing behind.

For the examples/ programs (tests/test_examples.py) and the blocks of the
docs (tests/test_docs.py). The program runs with this interpreter, in a
process group of its own, with a private ``$XDG_RUNTIME_DIR`` (where the
managers it starts put their sockets) and no ``$SHMPOOL_ADDRESS`` unless the
caller gives one. It passes when it exits with status 0, writes nothing to
stderr (no traceback, no warning), and then nothing of it is left: no
process of its group, no manager still listening, no ``shmpool.*`` name in
/dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from conftest import MP_TIMEOUT, shm_names, wait_for

import shmpool

#: How long a program may run: under pytest-timeout's 120 s a test (pyproject.toml).
RUN_TIMEOUT = 100.0
#: How long what a finished program started (its manager, workers) may take to go away.
SETTLE_TIMEOUT = 10.0


@dataclass
class Finished:
    """What a program printed."""

    stdout: str
    stderr: str


@contextlib.contextmanager
def runtime_dir() -> Iterator[Path]:
    """A fresh private directory with a short path (a socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="shmpool-run-") as path:
        yield Path(path)


def run_program(
    argv: Sequence[str],
    *,
    cwd: Path,
    runtime: Path,
    address: str | None = None,
    what: str = "",
) -> Finished:
    """Run ``python ARGV`` in ``cwd`` until it ends; fail unless it ran and ended cleanly.

    ``runtime`` becomes its ``$XDG_RUNTIME_DIR``: it must not be ``cwd``, or
    the ``shmpool/`` directory that managers make there would shadow the package.
    """
    what = what or " ".join(argv)
    env = {k: v for k, v in os.environ.items() if k != shmpool.ENV_VAR}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    # The shmpool this test run imported, as start() gives its manager.
    here = str(Path(shmpool.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    if address is not None:
        env[shmpool.ENV_VAR] = address
    shm_before = shm_names()
    # Files, not pipes: a process it leaves running must not hold up the wait for it.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group, whose id is its pid
        )
        try:
            proc.wait(timeout=RUN_TIMEOUT)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=MP_TIMEOUT)
            hung = True
        out, err = _read(stdout), _read(stderr)
    if hung:
        raise AssertionError(f"{what}: still running after {RUN_TIMEOUT} s\n{_output(out, err)}")
    try:
        assert proc.returncode == 0, f"{what}: exit status {proc.returncode}"
        assert not err, f"{what}: wrote to stderr"
        _gone(lambda: group_members(proc.pid), f"{what}: left processes running")
        _gone(lambda: sockets(runtime, address), f"{what}: left a manager listening")
        _gone(lambda: shm_names() - shm_before, f"{what}: left shared memory in /dev/shm")
    except AssertionError as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{exc}\n{_output(out, err)}") from None
    return Finished(out, err)


def _read(file: IO[str]) -> str:
    file.seek(0)
    return file.read()


def _output(out: str, err: str) -> str:
    return f"--- stdout\n{out}--- stderr\n{err}"


def _gone(left: Callable[[], Collection[object]], message: str) -> None:
    """Wait until ``left()`` is empty; fail with ``message`` and what is left if it stays."""
    try:
        wait_for(lambda: not left(), timeout=SETTLE_TIMEOUT, interval=0.02)
    except AssertionError:
        raise AssertionError(f"{message}: {sorted(map(str, left()))}") from None


def group_members(pgid: int) -> set[int]:
    """The live processes (zombies left out) of process group ``pgid``."""
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.add(int(entry))
    return members


def sockets(runtime: Path, keep: str | None = None) -> list[str]:
    """The manager sockets under ``runtime``, but ``keep`` (a manager the caller runs)."""
    return sorted(str(p) for p in runtime.rglob("*.sock") if str(p) != keep)
