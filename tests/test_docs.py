"""The docs run: every ```python block of README.md and docs/*.md, found by sybil.

Each block runs as the program a reader would save to a file and run:
``python block.py``, in a fresh interpreter and a directory of its own (see
tests/programs.py for what it must not leave behind). Not in pytest's
process: most blocks hand buffers to ``spawn`` children, which import the
functions they run from a real ``__main__`` file, and a fresh process is what
the reader has.

A block that starts no manager of its own (no ``shmpool.start(``) runs the
way its text says: against a manager that is already running, found through
``$SHMPOOL_ADDRESS``. A block that starts one gets no address.

Only blocks fenced as ``python`` run; commands, configuration and output are
fenced without a language or as ``console``, ``ini``, ``yaml``, ``text``. A
Python block that cannot run here is preceded by sybil's skip directive,
``<!-- skip: next "the reason" -->``, shown as skipped with that reason.

Run them alone with ``pytest tests/test_docs.py`` (``-k guide.md`` for one file).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from programs import run_program, runtime_dir
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

import shmpool

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def run_block(example: Example) -> None:
    """Sybil's evaluator for a ```python block: run it as a script (see the top of the file)."""
    source = str(example.parsed)
    where = f"{Path(example.path).relative_to(ROOT)}, line {example.line}"
    with runtime_dir() as runtime:
        work = runtime / "work"  # not beside the runtime's shmpool/ directory
        work.mkdir()
        (work / "block.py").write_text(source)
        if "shmpool.start(" in source:
            run_program(["block.py"], cwd=work, runtime=runtime, what=where)
            return
        address = str(runtime / "running.sock")
        with shmpool.start(memory="64MiB", address=address):
            run_program(["block.py"], cwd=work, runtime=runtime, address=address, what=where)


SYBIL = Sybil(parsers=[CodeBlockParser(language="python", evaluator=run_block), SkipParser()])


def find_blocks() -> list[tuple[str, Example]]:
    """Every example sybil finds (blocks and skip directives), in order, with its test id."""
    return [
        (f"{path.relative_to(ROOT)}:{example.line}", example)
        for path in DOCS
        for example in SYBIL.parse(path)
    ]


BLOCKS = find_blocks()


def marks(example: Example) -> list[pytest.MarkDecorator]:
    """``slow`` for a block that starts processes: seconds, like the start-method tests."""
    return [pytest.mark.slow] if "multiprocessing" in str(example.parsed) else []


@pytest.mark.parametrize(
    "example", [pytest.param(example, id=id_, marks=marks(example)) for id_, example in BLOCKS]
)
def test_block(example: Example) -> None:
    example.evaluate()


#: A fence whose language says Python in another spelling would not run.
PYTHON_ALIASES = re.compile(r"^\s*(```|~~~)\s*(py|python3|pycon|ipython|Python)\s*$", re.MULTILINE)


def test_every_python_block_is_fenced_as_python() -> None:
    for path in DOCS:
        found = PYTHON_ALIASES.findall(path.read_text())
        assert not found, f"{path.name}: fence Python blocks as ```python, or they do not run"


def test_the_blocks_are_found() -> None:
    """The README's two blocks, and the guide's, are among what sybil finds."""
    ids = [id_ for id_, _ in BLOCKS]
    assert sum(i.startswith("README.md:") for i in ids) >= 2
    assert sum(i.startswith("docs/guide.md:") for i in ids) >= 10
