"""`make bench` end to end: `python -m benchmarks.run --quick` runs every bench, writes its JSON and the table.

A bench whose quick mode a unit test already calls (`run.bench_<name>(quick=True)` in tests/unit) is left out of
the subprocess run here, so each bench runs once per test session; every other bench, a new one included, runs here.
"""

import json
import math
import subprocess
import sys

from benchmarks import run
from tests.cli.conftest import ROOT, cli_env


def _benches_run_by_unit_tests() -> set[str]:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests" / "unit").glob("test_*.py"))
    return {name for name in run.BENCHES if f"run.bench_{name}(quick=True)" in sources}


def test_every_bench_runs_in_quick_mode(tmp_path):
    unit = _benches_run_by_unit_tests()
    here = [name for name in run.BENCHES if name not in unit]
    assert here, "every bench has a unit test: nothing left for the CLI run"
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*")}
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--results", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--only", ",".join(here)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for name in here:
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["quick"] is True and res["device"]["torch_threads"] == 1, name
        figures = [v for k, v in res.items() if k not in run.CONFIG_KEYS and type(v) in (int, float)]
        assert figures and all(math.isfinite(v) for v in figures), (name, res)
        assert f"| {name} (quick) |" in proc.stdout, name  # the printed table has its rows
    assert (tmp_path / "summary.md").read_text().strip() in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*")} == committed  # --results
