"""Every tutorial's code runs as written (in a fresh process, as a reader would run it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[2] / "docs" / "tutorials").glob("*.md"))


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    code = python_blocks(path)
    assert code.strip(), f"{path.name} has no python code"
    script = tmp_path / f"{path.stem}.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
