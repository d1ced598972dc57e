"""tools/setup.sh tells what it is doing: one line before each step (run against a stand-in interpreter)."""
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_setup_prints_a_line_before_every_step(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "setup.sh", tmp_path / "tools" / "setup.sh")
    log = tmp_path / "calls.log"
    for venv in (".venv", ".venv-serve"):  # stand-in interpreters: each records its call, installs nothing
        venv_python = tmp_path / venv / "bin" / "python"
        venv_python.parent.mkdir(parents=True)
        venv_python.write_text(f"#!/bin/sh\necho \"CALL $*\" >> {log}\n")
        venv_python.chmod(0o755)
    out = subprocess.run(["bash", str(tmp_path / "tools" / "setup.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    calls = log.read_text().splitlines()
    assert len(calls) == 6 and all("pip install" in c for c in calls)
    steps = [ln for ln in lines if ln.startswith("setup: ")]
    assert steps == lines  # nothing else on stdout
    # a line per step: each environment, each of the six installs, the closing hint
    assert len(steps) == len(calls) + 3, steps
    assert "reusing the virtual environment" in steps[0] and steps[-1].startswith("setup: done")
    assert "requirements" in steps[2] and "recbole" in steps[3] and "padrec itself" in steps[5]
