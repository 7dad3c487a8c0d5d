"""The README's Python examples run as written (from the repository root), so the docs cannot drift from the code.

Skipped: the excerpt of DPO's generated kernel body (not a program on its own). The TRL example runs when TRL is
installed (the ``[trl]`` extra; the test extras include it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
RUNNABLE = [b for b in BLOCKS if "tl.load(" not in b]


def test_the_readme_has_examples():
    assert len(RUNNABLE) >= 3 and len(BLOCKS) > len(RUNNABLE)


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index, monkeypatch, tmp_path):
    if "from trl import" in RUNNABLE[index]:
        pytest.importorskip("trl")
        monkeypatch.chdir(tmp_path)  # it writes its output folder
    else:
        monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {}
    exec(compile(RUNNABLE[index], f"README.md python block {index}", "exec"), namespace)
    loss = namespace.get("loss")
    assert loss is not None and loss.dim() == 0 and bool(loss.isfinite())
