"""benchmarks/gpu_check.sh --dry-run end to end on the CPU: every stage runs (the CUDA tests skip, the
sanitizer is not run), each writes its log, the benchmarks write their JSON rows, and the summary says
what passed, what failed and what did not run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, **extra)
    if list((ROOT / "tdconv").glob("_C*.so")):  # an in-place build: the scripts' own python must see it
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_gpu_check_dry_run(require_ext, tmp_path):
    env = _env(PYTHON=sys.executable)
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr
    for stage in ("imports", "kernels", "cuda", "decompose", "layers", "models"):
        assert (out / f"{stage}.log").exists()
        assert any(line.startswith(stage) and "passed" in line for line in summary.splitlines()), (stage, summary)
    assert "failed:  none" in summary and "sanitizer" in summary.split("not run:")[1]
    assert (out / "cuda-tests.xml").exists() and (out / "kernels-tests.xml").exists()
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"environment", "decompose", "layer", "model"} <= kinds
    variants = {r["variant"] for r in rows if r["kind"] == "decompose"}
    assert {"eager", "small_solve", "graphs", "graphs+small_solve"} <= variants
    assert not [r for r in rows if "error" in r and r.get("variant") != "tensorly"], rows
    assert {r["mode"] for r in rows if r["kind"] == "model"} == {"eager", "compile"}


def test_gpu_check_refuses_unknown_options(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--fast"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          env=dict(os.environ, DRY_SCALE="0"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DRY_SCALE must be a positive integer" in proc.stderr


def test_gpu_check_summary_survives_a_failed_import(tmp_path):
    # A python that cannot import torch: the later stages are marked "not run", the summary is written,
    # and the script fails.
    env = dict(os.environ, PYTHON="false")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode != 0
    assert "failed:  imports" in summary
    for stage in ("build", "kernels", "cuda", "decompose", "layers", "models"):
        assert stage in summary.split("not run:")[1], summary


def test_gpu_bench_stops_starting_rows_at_its_deadline(require_ext, tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "layers", "--device", "cpu",
                           "--tiny", "--deadline", "0", "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds == ["environment", "deadline"]
