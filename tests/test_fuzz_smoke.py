"""A short run of every fuzz harness (fuzz/), so CI catches a parser that regressed.

Each harness runs in a child process with its address space capped (an
unbounded allocation fails there as MemoryError instead of swapping the
machine) and a deadline (a hang fails the test): with atheris when it is
installed (coverage-guided, a few thousand inputs), else over its seeds plus
a few thousand mutations from fuzz/harness.py.  The long runs (a million
inputs each) are on demand: fuzz/run_all.sh, figures in fuzz/README.md.
"""

import importlib
import importlib.util
import resource
import subprocess
import sys

import pytest
from fuzz.run import harness_names

from tests.support.procenv import REPO_ROOT, child_env

RUNS = 3000
ADDRESS_SPACE = 3 << 30
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("name", harness_names())
def test_a_short_fuzz_run_of_each_harness_finds_no_escape(name, tmp_path):
    if HAS_ATHERIS:
        args = [f"-atheris_runs={RUNS}", "-timeout=20", "-rss_limit_mb=2048"]
    else:
        args = ["--smoke", str(RUNS)]
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", name, *args], cwd=REPO_ROOT,
                          env=child_env(CYCLEMIRROR_FUZZ_CORPUS=tmp_path),
                          capture_output=True, text=True, timeout=300, preexec_fn=_cap_memory)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    if HAS_ATHERIS:
        assert f"Done {RUNS} " in out, out[-2000:]
    else:
        assert "inputs clean" in out, out[-2000:]


def test_every_harness_has_seeds_and_a_target():
    assert len(harness_names()) >= 11
    for name in harness_names():
        module = importlib.import_module(f"fuzz.fuzz_{name}")
        assert module.seeds() and callable(module.test_one_input), name



