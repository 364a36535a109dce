"""shmpool.gunicorn: a real gunicorn, its workers on one embedded manager.

Each test runs ``python -m gunicorn`` with examples/gunicorn.conf.py (the
hooks) and the app of tests/gunicorn_testapp.py, on a free port, and talks
to it over HTTP from several threads; the manager's books are read through
a connection of the test's own (named "stats", so that ``client_entries``
leaves it out).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import MP_TIMEOUT, assert_balanced, client_entries, shm_names, wait_for

import shmpool
import shmpool.default
import shmpool.gunicorn
from shmpool.address import ENV_VAR

# Importing the hooks let get_pool() in this process start a manager, were it a
# gunicorn master; it is not, and the other tests expect AddressNotSetError.
shmpool.default._set_fallback(None)

gunicorn_config = pytest.importorskip("gunicorn.config")

HOOKS = ("child_exit", "on_exit", "on_reload", "on_starting", "post_fork")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "gunicorn.conf.py"
TESTS = Path(__file__).resolve().parent
LOAD_THREADS = 8


class Server:
    """A running gunicorn master, its log, and the manager its hooks started."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.port = int(wait_for(self._port).group(1))

    def _port(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited early:\n{self.log.read_text()}")
        return re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log.read_text())

    @property
    def master(self) -> int:
        return self.proc.pid

    def request(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        """One HTTP request on a new connection; the decoded JSON body (raises on errors)."""
        status, data = self.raw(path, method, body)
        assert status == 200, (status, data)
        return json.loads(data)

    def raw(self, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=MP_TIMEOUT)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stats(self, address: str) -> dict[str, Any]:
        with shmpool.connect(address, name="stats") as pool:
            return pool.stats()

    def children(self) -> set[int]:
        """The live children of the master: its workers, and the manager."""
        return children_of(self.master)

    def workers(self, manager_pid: int) -> set[int]:
        return self.children() - {manager_pid}


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in "ZX":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@contextlib.contextmanager
def gunicorn(
    tmp_path: Path, *args: str, eager: bool = False, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run gunicorn until the block ends, then stop it (SIGTERM) and check that it exited well."""
    environ = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    environ["SHMPOOL_TESTAPP_EAGER"] = "1" if eager else "0"
    environ.update(env or {})
    log = tmp_path / "gunicorn.log"
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind", "127.0.0.1:0",
        "--pythonpath", str(TESTS), "--graceful-timeout", "20", "--timeout", "60",
        *args, "gunicorn_testapp:app",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=environ, cwd=tmp_path)
    try:
        server = Server(proc, log)
        wait_for(lambda: _answers(server))
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(MP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"gunicorn did not stop:\n{log.read_text()}") from None
    assert proc.returncode == 0, log.read_text()


def _answers(server: Server) -> bool:
    with contextlib.suppress(OSError, http.client.HTTPException):
        return server.raw("/pid")[0] == 200
    return False


def load(server: Server, paths: list[str]) -> list[Any]:
    """GET every path from ``LOAD_THREADS`` threads; each answer, or the exception it raised."""

    def one(path: str) -> Any:
        try:
            return server.request(path)
        except (OSError, http.client.HTTPException, AssertionError) as exc:
            return exc

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        return list(pool.map(one, paths))


def assert_all_served(answers: list[Any], server: Server) -> None:
    """Every request was answered (none was a 500: see the server's log)."""
    failed = [repr(a) for a in answers if not isinstance(a, dict)]
    if failed:
        log = server.log.read_text()
        raise AssertionError(f"{len(failed)} requests failed: {failed[:5]}\n{log[-5000:]}")


def books_settled(server: Server, address: str) -> dict[str, Any] | None:
    """The manager's stats once no client of a dead process is left and the books add up.

    Every slot out is held by a live client (no handoffs here, so none is in transit).
    """
    stats = server.stats(address)
    clients = [c for c in stats["clients"] if c["name"] != "stats"]
    if not all(alive(c["pid"]) for c in clients):
        return None
    out = sum(c["leased"] for c in stats["classes"]) + stats["oversize"]["leases"]
    if out != sum(c["leased"] for c in clients) or stats["in_transit"]:
        return None
    return stats


def stopped(manager_pid: int, address: str) -> bool:
    return not alive(manager_pid) and not os.path.exists(address)


# ---------------------------------------------------------------- the hooks alone


def test_the_hooks_are_what_gunicorn_accepts() -> None:
    """gunicorn checks each hook's arity when it reads the config file."""
    config = gunicorn_config.Config()
    for name in HOOKS:
        config.set(name, getattr(shmpool.gunicorn, name))
        assert getattr(config, name) is getattr(shmpool.gunicorn, name)
    assert set(HOOKS) <= set(shmpool.gunicorn.__all__)


def test_configure_takes_the_settings_of_start() -> None:
    saved = dict(shmpool.gunicorn._settings)
    try:
        shmpool.gunicorn.configure(memory="32MiB", min_size="8KiB", idle_release=5)
        assert shmpool.gunicorn._start_settings()["memory"] == "32MiB"
        with pytest.raises(TypeError, match="adress"):
            shmpool.gunicorn.configure(adress="/tmp/x.sock")
        with pytest.raises(TypeError, match="address"):
            shmpool.gunicorn.configure(address="/tmp/x.sock")
    finally:
        shmpool.gunicorn._settings.clear()
        shmpool.gunicorn._settings.update(saved)


def test_the_fallback_starts_no_manager_outside_a_master(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[bool] = []

    def ensure_manager() -> str:
        started.append(True)
        return "x"

    monkeypatch.setattr(shmpool.gunicorn, "ensure_manager", ensure_manager)
    monkeypatch.delitem(sys.modules, "gunicorn.arbiter", raising=False)
    assert shmpool.gunicorn._fallback() is None  # this process runs no gunicorn
    monkeypatch.setitem(sys.modules, "gunicorn.arbiter", sys.modules["gunicorn.config"])
    assert shmpool.gunicorn._fallback() == "x"  # a master before on_starting: --preload
    monkeypatch.setattr(shmpool.gunicorn, "_master_pid", os.getpid() + 1)
    assert shmpool.gunicorn._fallback() is None  # not the process that ran on_starting
    monkeypatch.setattr(shmpool.gunicorn, "_master_pid", None)
    monkeypatch.setattr(shmpool.gunicorn, "_in_worker", True)
    assert shmpool.gunicorn._fallback() is None  # post_fork ran: a worker
    assert started == [True]


# ---------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_workers_share_the_manager_and_lose_nothing(
    tmp_path: Path, worker: str, preload: bool
) -> None:
    args = ["--workers", "2", "--worker-class", worker]
    if worker == "gthread":
        args += ["--threads", "8"]
    if preload:
        args.append("--preload")
    shm_before = shm_names()
    with gunicorn(tmp_path, *args, eager=preload) as server:
        address = server.request("/pid")["address"]
        manager_pid = server.stats(address)["manager"]["pid"]
        assert server.children() - {manager_pid}  # the manager is the master's child

        # Concurrent requests: each worker opens one connection, however many threads it has.
        sizes = [1000 + 7919 * i for i in range(120)]
        answers = load(server, [f"/big?size={n}" for n in sizes])
        assert_all_served(answers, server)
        for n, answer in zip(sizes, answers, strict=True):
            assert answer["crc32"] == zlib.crc32(bytes([answer["pid"] % 251]) * n), answer
        stats = server.stats(address)
        workers = server.workers(manager_pid)
        for pid in {a["pid"] for a in answers} | workers:
            assert len(client_entries(stats, pid)) <= 1, (pid, stats["clients"])
        assert len(client_entries(stats, server.master)) == (1 if preload else 0)

        # Every worker holds leases, then dies by SIGKILL under load.
        holders = wait_for(lambda: _hold_in_all(server, manager_pid))
        assert server.stats(address)["leased_bytes"] > 0
        answers = []
        stop = threading.Event()
        loader = threading.Thread(target=lambda: _keep_loading(server, stop, answers))
        loader.start()
        try:
            wait_for(lambda: len(answers) > 10)
            for pid in holders:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not (server.workers(manager_pid) & holders))
            count = len(answers)
            wait_for(lambda: sum(isinstance(a, dict) for a in answers[count:]) > 20)  # new workers
        finally:
            stop.set()
            loader.join(MP_TIMEOUT)
        assert sum(isinstance(a, dict) for a in answers) > 30
        stats = wait_for(lambda: books_settled(server, address))
        assert_balanced(stats)
        for pid in holders:
            assert not client_entries(stats, pid)
        assert server.stats(address)["manager"]["pid"] == manager_pid  # the same manager
    assert wait_for(lambda: stopped(manager_pid, address))
    assert not shm_names() - shm_before


def _hold_in_all(server: Server, manager_pid: int) -> set[int] | None:
    """Ask /hold until every current worker holds leases; the set of those workers."""
    workers = server.workers(manager_pid)
    seen = {a["pid"] for a in load(server, ["/hold?n=3&size=60000"] * 8) if isinstance(a, dict)}
    return workers if workers and workers <= seen else None


def _keep_loading(server: Server, stop: threading.Event, answers: list[Any]) -> None:
    while not stop.is_set():
        answers.extend(load(server, [f"/big?size={50_000 + i}" for i in range(LOAD_THREADS)]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--worker-class", "sync"], ["--worker-class", "gthread", "--threads", "4"]]
)
def test_max_requests_recycles_workers(tmp_path: Path, args: list[str]) -> None:
    with gunicorn(tmp_path, "--workers", "2", "--max-requests", "5", *args) as server:
        address = server.request("/pid")["address"]
        answers = load(server, [f"/big?size={10_000 + i}" for i in range(80)])
        assert_all_served(answers, server)
        assert len({a["pid"] for a in answers}) > 2  # workers were recycled
        stats = wait_for(lambda: books_settled(server, address))
        assert_balanced(stats)
        manager_pid = stats["manager"]["pid"]
        for pid in server.workers(manager_pid):
            assert len(client_entries(stats, pid)) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_hup_keeps_the_one_manager(tmp_path: Path, preload: bool) -> None:
    args = ["--workers", "2"] + (["--preload"] if preload else [])
    with gunicorn(tmp_path, *args, eager=preload) as server:
        address = server.request("/pid")["address"]
        manager_pid = server.stats(address)["manager"]["pid"]
        old = wait_for(
            lambda: len(server.workers(manager_pid)) == 2 and server.workers(manager_pid)
        )
        server.request("/big?size=300000")
        os.kill(server.master, signal.SIGHUP)
        wait_for(lambda: _replaced(server, manager_pid, old))
        answers = load(server, ["/pid"] * 16)
        assert all(a["address"] == address for a in answers)
        assert not {a["pid"] for a in answers} & old
        assert server.children() == server.workers(manager_pid) | {manager_pid}  # one manager
        stats = wait_for(lambda: books_settled(server, address))
        assert stats["manager"]["pid"] == manager_pid
        assert "starting it again" not in server.log.read_text()
    assert wait_for(lambda: stopped(manager_pid, address))


def _replaced(server: Server, manager_pid: int, old: set[int]) -> bool:
    workers = server.workers(manager_pid)
    return len(workers) == 2 and not workers & old


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["child_exit", "on_reload"])
def test_a_dead_manager_is_started_again(tmp_path: Path, trigger: str) -> None:
    """Killed, the manager comes back at its address when a worker exits or on HUP."""
    with gunicorn(tmp_path, "--workers", "2") as server:
        address = server.request("/pid")["address"]
        manager_pid = server.stats(address)["manager"]["pid"]
        server.request("/big?size=100000")
        os.kill(manager_pid, signal.SIGKILL)
        wait_for(lambda: not alive(manager_pid))
        if trigger == "child_exit":
            os.kill(min(server.workers(manager_pid)), signal.SIGKILL)
        else:
            os.kill(server.master, signal.SIGHUP)
        new_pid = wait_for(lambda: _manager_pid(server, address, manager_pid))
        # Each worker's pool broke with the old manager; get_pool() connects anew.
        wait_for(lambda: all(isinstance(a, dict) for a in load(server, ["/big?size=5000"] * 8)))
        assert server.children() == server.workers(new_pid) | {new_pid}
        assert "starting it again" in server.log.read_text()
    assert wait_for(lambda: stopped(new_pid, address))


def _manager_pid(server: Server, address: str, old: int) -> int | None:
    """The pid of the manager at ``address``, once it is another than ``old``."""
    try:
        pid = int(server.stats(address)["manager"]["pid"])
    except shmpool.ManagerGoneError:
        return None
    return pid if pid != old else None


@pytest.mark.slow
def test_a_manager_of_your_own(tmp_path: Path, manager: shmpool.ManagerProcess) -> None:
    """With $SHMPOOL_ADDRESS set, the hooks start no manager and stop none."""
    with gunicorn(tmp_path, "--workers", "2", env={ENV_VAR: manager.address}) as server:
        answers = load(server, ["/pid"] * 8)
        assert {a["address"] for a in answers} == {manager.address}
        workers = server.children()
        assert {a["pid"] for a in answers} <= workers  # no manager among the children
        stats = manager.stats()
        assert all(len(client_entries(stats, pid)) == 1 for pid in {a["pid"] for a in answers})
    assert manager.running
    wait_for(lambda: not any(client_entries(manager.stats(), pid) for pid in workers))


@pytest.mark.slow
def test_without_the_hooks_the_error_names_them(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    cmd = [
        sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", "--workers", "1",
        "--pythonpath", str(TESTS), "gunicorn_testapp:app",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=environ, cwd=tmp_path)
    try:
        server = Server(proc, log)
        status, body = wait_for(lambda: _try_raw(server, "/pid"))
        assert status == 503
        answer = json.loads(body)
        assert answer["error"] == "AddressNotSetError"
        assert "shmpool.gunicorn" in answer["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(MP_TIMEOUT)


def _try_raw(server: Server, path: str) -> tuple[int, bytes] | None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        return server.raw(path)
    return None


@pytest.mark.slow
def test_the_example(tmp_path: Path) -> None:
    """examples/gunicorn.conf.py with examples/gunicorn_app.py, as its docstring runs them."""
    environ = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind", "127.0.0.1:0",
        "--workers", "1",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=environ, cwd=ROOT)
    try:
        server = Server(proc, log)
        status, body = wait_for(lambda: _try_raw(server, "/report?size=300000"))
        assert status == 200 and len(body) == 300_000
        assert body.startswith(b"line 00000000 of a report") and body.count(b"\n") > 5000
        payload = os.urandom(3_000_000)
        answer = server.request("/checksum", "POST", payload)
        assert answer["crc32"] == zlib.crc32(payload) and answer["bytes"] == len(payload)
        assert server.request("/checksum", "POST", b"again")["crc32"] == zlib.crc32(b"again")
        stats = server.request("/stats")
        assert_balanced(stats)
        assert server.raw("/nothing")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(MP_TIMEOUT)
    assert proc.returncode == 0, log.read_text()
