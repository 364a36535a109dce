"""Issue 10: a user's fork from a process with a connected pool prints no threads warning.

Python 3.12+ warns in ``os.fork()`` ("This process ... is multi-threaded, use
of fork() may lead to deadlocks in the child") when the process has more
than one OS thread once the at-fork callbacks have run. The pool's janitor
is stopped before the fork and started again only after ``os.fork()`` has
returned, so a plain program shows no warning, and its idle parent still
answers recalls.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import MP_TIMEOUT

from shmpool import buffer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

needs_warning_python = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="Python before 3.12 never warns about fork with threads"
)

PROGRAM = textwrap.dedent(
    """
    import multiprocessing, os, threading, warnings
    import shmpool

    warnings.simplefilter("always")

    def janitors():
        return [t for t in threading.enumerate() if t.name.startswith("shmpool-janitor")]

    def child():
        pass

    if __name__ == "__main__":
        with shmpool.start(memory="16MiB") as mgr, mgr.connect() as pool:
            leases = [pool.acquire(4096) for _ in range(64)]  # refills start the janitor
            for lease in leases:
                lease.release()
            assert len(janitors()) == 1, janitors()
            for _ in range(3):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
                assert len(janitors()) == 1, janitors()  # back at once, after the fork
            ctx = multiprocessing.get_context("fork")
            for _ in range(2):
                proc = ctx.Process(target=child)
                proc.start()
                proc.join()
                assert proc.exitcode == 0
            with pool.acquire(4096) as lease:
                lease.view[:2] = b"ok"
        print("done")
    """
)


@needs_warning_python
@pytest.mark.skipif(
    vars(buffer)["_speedups"] is None, reason="the quiet restart needs the C extension"
)
def test_fork_from_a_process_with_a_pool_prints_no_threads_warning(tmp_path) -> None:
    script = tmp_path / "forker.py"
    script.write_text(PROGRAM)
    result = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=MP_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert "multi-threaded" not in result.stderr, result.stderr
