"""The kernel tests marked `interpreter` (tests/test_kernels_*.py), run in a child process under the Triton interpreter.

CPU: the kernels run under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is
first imported: `@triton.jit` picks interpreted or compiled when a decorator runs, and triton.language's own
helpers (tl.zeros, tl.max, ...) are decorated when triton is imported. In a pytest run triton is already imported
by conftest (transformers/torch import it), and setting the variable for the whole process would also switch
`kvconvert.kernels` of every other test file onto the slow interpreter path. So the interpreter tests run in-process
only when the process was started with TRITON_INTERPRET=1 (conftest deselects them otherwise); here one child
process started with TRITON_INTERPRET=1 runs those of the current tier (gpu tests deselected) and the test fails
with the child's report. The default tier's runner is test_interpreter_suite; the slow tier's (python -m pytest -q
-m slow) is test_interpreter_suite_slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_cases import INTERPRETER

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
KERNEL_TEST_FILES = sorted(str(p) for p in HERE.parent.glob("test_kernels_*.py") if p != HERE)


def run_interpreter_tests(marks: str) -> None:
    if INTERPRETER:
        pytest.skip("this process is the interpreter run")
    # One torch thread (unless set): the child's tensors are tiny, and two threads spinning at OpenMP's barriers on
    # a loaded 2-core machine made the child three times slower than one thread.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, *KERNEL_TEST_FILES]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"


def test_interpreter_suite():
    """The default tier's interpreter tests, in a child process started with TRITON_INTERPRET=1."""
    run_interpreter_tests("interpreter and not slow and not gpu")


@pytest.mark.slow
def test_interpreter_suite_slow():
    """The slow tier's interpreter tests, in a child process started with TRITON_INTERPRET=1."""
    run_interpreter_tests("interpreter and slow and not gpu")
