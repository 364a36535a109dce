"""The programs in examples/ run, as their docstrings say, and leave nothing behind.

Each runs as ``python examples/NAME.py`` from the repository root (see
tests/programs.py for the checks after it ends). The gunicorn example
(gunicorn.conf.py with gunicorn_app.py) runs under a real gunicorn in
tests/test_gunicorn.py::test_the_example.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from programs import run_program, runtime_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: Every example, and the test that runs it.
RUN_BY = {
    "quickstart.py": "tests/test_examples.py::test_quickstart",
    "multiprocessing_workers.py": "tests/test_examples.py::test_multiprocessing_workers",
    "gunicorn.conf.py": "tests/test_gunicorn.py::test_the_example",
    "gunicorn_app.py": "tests/test_gunicorn.py::test_the_example",
}


def run_example(name: str) -> str:
    """Run ``python examples/NAME`` from the repository root; what it printed."""
    with runtime_dir() as runtime:
        return run_program([f"examples/{name}"], cwd=ROOT, runtime=runtime).stdout


def test_every_example_is_run() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUN_BY), (
        "a new example needs a test that runs it (and an entry in RUN_BY)"
    )
    for test in set(RUN_BY.values()):
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_quickstart() -> None:
    out = run_example("quickstart.py")
    assert out.splitlines()[:2] == ["leased 100000 bytes in a 131072-byte slot", "b'hello'"], out
    assert "manager committed " in out and "for 1 client(s)" in out, out


@pytest.mark.slow
def test_multiprocessing_workers() -> None:
    out = run_example("multiprocessing_workers.py")
    assert "2000 buffers checksummed, all correct: True" in out, out
