"""The command line's conventions: --version, --log-level anywhere, SHMPOOL_* defaults,
signals to ``shmpool serve``, ``shmpool top``, and full client names in ``shmpool stats``.

Real ``shmpool serve`` processes get real signals; ``top`` runs against real
managers, once in-process (``--once``) and live in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import MP_TIMEOUT, wait_for
from serving import Serve, child_env, listening, serving, shmpool_cmd

import shmpool
from shmpool import cli, envdefaults
from shmpool.address import unique_address
from shmpool.report import format_stats, format_summary
from shmpool.top import format_frame

KiB = 1024
MiB = 1024 * KiB
pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m shmpool ARGS`` to its end, with ``env`` added to ours."""
    return subprocess.run(
        shmpool_cmd(*args), capture_output=True, text=True, env=child_env(**env), timeout=MP_TIMEOUT
    )


def parse(*args: str) -> argparse.Namespace:
    return cli._parser().parse_args(list(args))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SHMPOOL_* default in our environment (a developer's shell may have some)."""
    for name in [*envdefaults.serve_variables(), envdefaults.variable("--log-level")]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------ --version


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"shmpool {shmpool.__version__}"
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"shmpool {shmpool.__version__}"


# ----------------------------------------------------------- --log-level


@pytest.mark.usefixtures("clean_env")
def test_log_level_before_or_after_the_command_any_case() -> None:
    assert parse("stats").log_level == "INFO"
    assert parse("--log-level", "debug", "stats").log_level == "DEBUG"
    assert parse("stats", "--log-level", "Warning").log_level == "WARNING"
    assert parse("serve", "--log-level", "error").log_level == "ERROR"
    assert parse("--log-level", "debug", "top", "--log-level", "critical").log_level == "CRITICAL"
    for command in ("serve", "stats", "top", "demo", "bench"):
        assert parse(command, "--log-level", "debug").log_level == "DEBUG"


@pytest.mark.parametrize("where", ["before", "after"])
def test_bad_log_level_is_refused(where: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = (
        ["--log-level", "loud", "stats"] if where == "before" else ["stats", "--log-level", "loud"]
    )
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --log-level: 'loud' is not a log level" in err
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in err


def test_log_level_from_the_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SHMPOOL_LOG_LEVEL", "debug")
    assert parse("stats").log_level == "DEBUG"
    assert parse("stats", "--log-level", "error").log_level == "ERROR"
    clean_env.setenv("SHMPOOL_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit):
        parse("stats")
    assert "SHMPOOL_LOG_LEVEL='chatty' is not a log level" in capsys.readouterr().err


def test_log_level_after_the_command_takes_effect(manager: shmpool.ManagerProcess) -> None:
    result = run_cli("stats", "--address", manager.address, "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert f"manager pid {manager.pid}" in result.stdout


# --------------------------------------------------- SHMPOOL_* defaults


def test_every_serve_option_has_a_variable() -> None:
    serve = next(
        action
        for action in cli._parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ).choices["serve"]
    flags = {
        action.option_strings[-1]
        for action in serve._actions
        if action.option_strings and action.help != argparse.SUPPRESS
    } - {"--help", "--log-level"}
    assert flags == set(envdefaults.SERVE_OPTIONS)
    for action in serve._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
            variable = envdefaults.variable(action.option_strings[-1])
            assert action.help is not None and action.help.endswith(f"[${variable}]"), action.help


def test_serve_defaults_come_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    base = parse("serve")
    assert (base.min_size, base.max_size, base.memory) == (4 * KiB, 64 * MiB, 1 << 30)
    assert base.allow_uid is None and base.client_quota is None and base.metrics_port is None
    values = {
        "SHMPOOL_ADDRESS": "/tmp/env.sock",
        "SHMPOOL_MIN_SIZE": "8KiB",
        "SHMPOOL_MAX_SIZE": "2MiB",
        "SHMPOOL_MEMORY": "256MiB",
        "SHMPOOL_ALLOW_UID": "1001, 1002",
        "SHMPOOL_ACQUIRE_WAIT": "0.5",
        "SHMPOOL_TRANSIT_TIMEOUT": "7",
        "SHMPOOL_MAX_CLIENTS": "10",
        "SHMPOOL_MAX_CLIENTS_PER_UID": "3",
        "SHMPOOL_HELLO_TIMEOUT": "1.5",
        "SHMPOOL_MAX_QUEUED_BYTES": "1MiB",
        "SHMPOOL_CLIENT_QUOTA": "16MiB",
        "SHMPOOL_IDLE_RELEASE": "0",
        "SHMPOOL_METRICS_PORT": "9464",
        "SHMPOOL_METRICS_HOST": "0.0.0.0",
    }
    for name, text in values.items():
        clean_env.setenv(name, text)
    args = parse("serve")
    assert args.address == "/tmp/env.sock"
    assert (args.min_size, args.max_size, args.memory) == (8 * KiB, 2 * MiB, 256 * MiB)
    assert args.allow_uid == [1001, 1002]
    assert (args.acquire_wait, args.transit_timeout, args.hello_timeout) == (0.5, 7.0, 1.5)
    assert (args.max_clients, args.max_clients_per_uid) == (10, 3)
    assert (args.max_queued_bytes, args.client_quota, args.idle_release) == (MiB, 16 * MiB, 0.0)
    assert (args.metrics_port, args.metrics_host) == (9464, "0.0.0.0")


def test_the_flag_wins_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SHMPOOL_MEMORY", "256MiB")
    clean_env.setenv("SHMPOOL_ALLOW_UID", "1001")
    clean_env.setenv("SHMPOOL_IDLE_RELEASE", "not a number")  # never read: the flag is given
    args = parse(
        "serve", "--memory", "2GiB", "--allow-uid", "7", "--allow-uid", "8", "--idle-release", "3"
    )
    assert (args.memory, args.allow_uid, args.idle_release) == (2 << 30, [7, 8], 3.0)


def test_an_empty_variable_is_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SHMPOOL_MEMORY", "")
    clean_env.setenv("SHMPOOL_MAX_CLIENTS", "  ")
    args = parse("serve")
    assert (args.memory, args.max_clients) == (1 << 30, 4096)


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("SHMPOOL_MEMORY", "lots", "is not a size"),
        ("SHMPOOL_MIN_SIZE", "-4KiB", "is not a size"),
        ("SHMPOOL_MAX_CLIENTS", "0", "is not a whole number >= 1"),
        ("SHMPOOL_ACQUIRE_WAIT", "-1", "is not a number of seconds >= 0"),
        ("SHMPOOL_HELLO_TIMEOUT", "0", "is not a number of seconds > 0"),
        ("SHMPOOL_IDLE_RELEASE", "nan", "is not a number of seconds >= 0 (0: never)"),
        ("SHMPOOL_ALLOW_UID", "root", "is not a list of uids"),
        ("SHMPOOL_METRICS_PORT", "99999", "is not a TCP port number"),
    ],
)
def test_a_bad_variable_is_named(
    name: str,
    text: str,
    why: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv(name, text)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{name}={text!r} {why}" in err, err


class _FakeManager:
    made: list[dict[str, Any]] = []

    def __init__(self, address: str | None, **kwargs: Any) -> None:
        self.made.append({"address": address, **kwargs})

    def serve(self, **kwargs: Any) -> None:
        pass


def test_serve_passes_the_environment_on(
    clean_env: pytest.MonkeyPatch,
) -> None:
    import shmpool.manager

    clean_env.setattr(shmpool.manager, "Manager", _FakeManager)
    _FakeManager.made.clear()
    clean_env.setenv("SHMPOOL_MEMORY", "32MiB")
    clean_env.setenv("SHMPOOL_CLIENT_QUOTA", "1MiB")
    clean_env.setenv("SHMPOOL_MAX_CLIENTS_PER_UID", "2")
    assert cli.main(["serve", "--client-quota", "2MiB"]) == 0
    (made,) = _FakeManager.made
    assert (made["memory"], made["client_quota"], made["max_clients_per_uid"]) == (
        32 * MiB,
        2 * MiB,
        2,
    )


def test_a_real_serve_reads_the_environment(tmp_path: Path) -> None:
    address = unique_address()
    env = {"SHMPOOL_MEMORY": "32MiB", "SHMPOOL_MIN_SIZE": "8KiB", "SHMPOOL_MAX_SIZE": "1MiB"}
    with (
        serving(address, "--max-size", "2MiB", log=tmp_path / "serve.log", **env),
        shmpool.connect(address) as pool,
    ):
        stats = pool.stats()
    assert (stats["memory_limit"], stats["min_size"], stats["max_size"]) == (
        32 * MiB,
        8 * KiB,
        2 * MiB,
    )


def test_start_ignores_the_serve_variables(clean_env: pytest.MonkeyPatch) -> None:
    """An embedded manager's settings are start()'s arguments, not a service's environment."""
    clean_env.setenv("SHMPOOL_MIN_SIZE", "1MiB")
    clean_env.setenv("SHMPOOL_MAX_CLIENTS", "1")
    clean_env.setenv("SHMPOOL_METRICS_PORT", "not a port")
    with shmpool.start(memory="16MiB") as manager, manager.connect() as a, manager.connect() as b:
        assert a.stats()["min_size"] == 4 * KiB
        b.stats()  # a second connection: max_clients is not 1


# --------------------------------------------------------------- signals


def test_sighup_logs_a_summary_and_keeps_serving(tmp_path: Path) -> None:
    address = unique_address()
    with Serve(address, "--memory", "64MiB", log=tmp_path / "serve.log") as server:
        with shmpool.connect(address, name="hup-test") as pool, pool.acquire(100_000):
            server.send(signal.SIGHUP)
            line = wait_for(lambda: re.search(r"SIGHUP: .*", server.text()))
            assert "clients 1," in line.group()  # hup-test; not the summary's own connection
            assert "committed" in line.group() and "slots leased" in line.group()
            for _ in range(3):  # a burst: folded, never fatal
                server.send(signal.SIGHUP)
            wait_for(lambda: server.text().count("SIGHUP:") >= 2)
            assert server.proc.poll() is None
            with pool.acquire(5000) as lease:  # still serving
                lease.view[:2] = b"ok"
        assert listening(address)
        assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.text()
    assert "stopped" in server.text()
    assert not os.path.exists(address)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly(sig: signal.Signals, tmp_path: Path) -> None:
    address = unique_address()
    with Serve(address, "--memory", "16MiB", log=tmp_path / "serve.log") as server:
        with shmpool.connect(address) as pool, pool.acquire(4096):
            pass
        assert server.stop(sig) == 0
    assert "Traceback" not in server.text() and "stopped" in server.text()
    assert not os.path.exists(address)


# -------------------------------------------------------------------- top


def test_top_once(manager: shmpool.ManagerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    with manager.connect(name="top-test-client") as pool, pool.acquire(100_000):
        assert cli.main(["top", "--once", "--address", manager.address]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shmpool top - manager pid {manager.pid} at {manager.address}")
    assert "\x1b[" not in out  # no terminal: no escape codes
    assert re.search(r"^ +128KiB +\d+ +\d+ +\d+ +[1-9]", out, re.MULTILINE), out
    (row,) = [line for line in out.splitlines() if line.endswith("top-test-client")]
    assert row.split()[0] == str(os.getpid())
    assert "shmpool top" not in out.split("client", 1)[1]  # its own connection is left out


def test_top_without_a_manager(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["top", "--once", "--address", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shmpool top: ") and "Traceback" not in err


def test_top_live_until_the_manager_goes(tmp_path: Path) -> None:
    """Frames keep coming; when the manager stops, top says so and exits 1."""
    out_path, err_path = tmp_path / "top.out", tmp_path / "top.err"
    with shmpool.start(memory="16MiB") as manager, open(out_path, "wb") as out:
        with open(err_path, "wb") as err:
            cmd = shmpool_cmd("top", "--interval", "0.05", "--address", manager.address)
            top = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env())
        try:
            wait_for(lambda: out_path.read_text().count("shmpool top - manager") >= 3)
            manager.stop()
            assert top.wait(MP_TIMEOUT) == 1
        finally:
            if top.poll() is None:
                top.kill()
                top.wait()
    assert "acquires " in out_path.read_text()  # the rates, from the second frame on
    err_text = err_path.read_text()
    # before it: the pool's INFO line that it tries to reach a restarted manager
    assert err_text.splitlines()[-1].startswith("shmpool top: ") and "Traceback" not in err_text


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_top_ends_on_ctrl_c(manager: shmpool.ManagerProcess, tmp_path: Path) -> None:
    out_path = tmp_path / "top.out"
    with open(out_path, "wb") as out:
        cmd = shmpool_cmd("top", "--interval", "0.05", "--address", manager.address)
        # SIGINT as a terminal gives it: a shell that runs pytest in the
        # background (no job control) has it ignored, and the child would inherit that
        top = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.PIPE, env=child_env(), preexec_fn=_default_sigint
        )
    try:
        wait_for(lambda: "shmpool top - manager" in out_path.read_text())
        top.send_signal(signal.SIGINT)
        _, err = top.communicate(timeout=MP_TIMEOUT)
        assert top.returncode == 0 and b"Traceback" not in err
    finally:
        if top.poll() is None:
            top.kill()
            top.communicate()


def test_top_interval_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("top", "--interval", "0")
    assert "'0' is not a number of seconds > 0" in capsys.readouterr().err
    assert parse("top").interval == 1.0 and not parse("top").once


def test_top_frame_rates_and_cut() -> None:
    def snapshot(hits: int, granted: int) -> dict[str, Any]:
        return {
            "manager": {"pid": 1, "address": "/m.sock", "uptime": 90061.5},
            "classes": [{"size": 4096, "segments": 1, "total": 8, "free": 6, "leased": 2}],
            "clients": [
                {"id": 1, "pid": 10, "name": "w", "leased": 2, "cache_hits": hits,
                 "manager_acquires": granted},
                {"id": 2, "pid": 11, "name": "idle\x1b[2J", "leased": 0},
            ],
        }  # fmt: skip

    first = snapshot(100, 8)
    frame = format_frame(snapshot(300, 16), (10.0, first), 12.0, interval=1.0)
    assert "up 1d 1:01:01" in frame and "every 1 s" in frame
    assert "acquires 100.0/s from local caches, 4.0/s slots granted by the manager" in frame
    (row,) = [line for line in frame.splitlines() if line.endswith("  w")]
    assert row.split()[-3:-1] == ["100.0", "4.0"]
    assert "\x1b" not in frame and "idle\\x1b[2J" in frame  # a name cannot drive the terminal
    assert "/s from local caches" not in format_frame(first)  # no previous frame: no rates
    assert len(format_frame(first, height=11).splitlines()) == 10  # it fits: all of it
    cut = format_frame(first, width=30, height=10)
    assert all(len(line) <= 30 for line in cut.splitlines())
    assert len(cut.splitlines()) == 9 and cut.endswith("... and 2 more clients")


# ------------------------------------------------------------------ stats


def test_stats_shows_whole_client_names_and_cache_counters(
    manager: shmpool.ManagerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "ingest-worker-with-a-rather-long-descriptive-name-" + "x" * 10  # 60 characters
    with manager.connect(name=name) as pool:
        for _ in range(5):
            with pool.acquire(4096):
                pass
        pool.stats()  # its cache hits reach the manager
        assert cli.main(["stats", "--address", manager.address]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if name in line]
    assert "cache hits" in row and "slots from manager" in row
    assert re.search(r"^local caches: \d+ hits, \d+ slots granted by the manager$", out, re.M)


def test_format_stats_shows_this_process_cache() -> None:
    stats = {
        "clients": [
            {"id": 1, "pid": 5, "name": "a", "leased": 3, "cache_hits": 7, "manager_acquires": 4}
        ],
        "local": {
            "pid": 5,
            "cache_hits": 7,
            "manager_acquires": 4,
            "cached": {"8192": 2, "4096": 1},
        },
    }
    text = format_stats(stats)
    assert (
        "this process (pid 5): 7 cache hits, 4 slots from the manager, cached: 1 x 4KiB, 2 x 8KiB"
        in text
    )
    assert "local caches: 7 hits, 4 slots granted by the manager" in text


def test_format_summary_is_one_line() -> None:
    stats = {
        "committed_bytes": 3 * MiB,
        "memory_limit": 64 * MiB,
        "peak_committed_bytes": 4 * MiB,
        "classes": [{"size": 4096, "total": 10, "free": 7, "leased": 3}],
        "oversize": {"leases": 1, "bytes": 2 * MiB},
        "clients": [{"pid": 1, "cache_hits": 5, "manager_acquires": 2}],
        "manager": {"waiting": 2},
    }
    line = format_summary(stats)
    assert "\n" not in line
    for part in (
        "clients 1",
        "committed 3MiB of 64MiB (peak 4MiB)",
        "slots leased 3/10",
        "oversize 1 (2MiB)",
        "cache hits 5, slots granted 2",
        "2 acquires waiting",
    ):
        assert part in line, line
