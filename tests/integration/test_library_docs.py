"""The examples of docs/library.md run as written: each ```python block
preceded by a ``<!-- run: NAME -->`` line is run in a fresh interpreter (its
own hub or loop, real loopback sockets) and must exit 0 within a bound."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "library.md"
_BLOCK = re.compile(r"<!-- run: (\S+) -->\n```python\n(.*?)\n```", re.S)

EXAMPLES = dict(_BLOCK.findall(DOC.read_text()))
NEEDS = {"asgi": "starlette"}


def test_the_doc_has_its_examples():
    assert set(EXAMPLES) >= {"gevent", "asyncio", "asgi", "threads"}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_written(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    out = subprocess.run([sys.executable, "-c", EXAMPLES[name]], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, f"docs/library.md example {name!r} failed:\n{out.stderr}"
    assert out.stdout.strip(), "every example prints what it got"
