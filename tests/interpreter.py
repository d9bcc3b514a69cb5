"""Running a test file's Triton tests under TRITON_INTERPRET=1 (Triton kernels on the CPU).

The variable must be set before Triton is imported, so the interpreted tests run in a child
pytest process; in the parent they skip, and one driver test runs the child and checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by the file's interpreter driver test")


def run_interpreted_tests(test_file: str, triton_module: object) -> None:
    """Run `test_file`'s tests named *interpreted* in a child process with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the interpreter run")
    if triton_module is None:
        pytest.skip("Triton is not installed")
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-k", "interpreted", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(cmd, env=env, cwd=Path(test_file).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]
