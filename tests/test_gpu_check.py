"""benchmarks/gpu_check.sh --dry-run end to end on the CPU: every stage runs (the CUDA tests skip, the
sanitizer is not run), each writes its log, the benchmarks write their JSON rows, and the summary says
what passed, what failed and what did not run."""
import json
import os
import re
import signal
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


def _check(out, *args, env=None, timeout):
    """Runs gpu_check.sh in a session of its own, so that a test timeout kills its stages too."""
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


DRY_SCALE = 6  # the dry run's limits: DRY_SCALE x the GPU's, 415 s in all


@pytest.mark.slow
def test_gpu_check_dry_run(require_ext, tmp_path):
    env = _env(PYTHON=sys.executable, DRY_SCALE=str(DRY_SCALE))
    out = tmp_path / "gpu"
    proc = _check(out, "--dry-run", env=env, timeout=415 * DRY_SCALE + 60)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr
    for stage in ("imports", "kernels", "cuda", "decompose", "layers", "models"):
        assert (out / f"{stage}.log").exists()
        assert any(line.startswith(stage) and "passed" in line for line in summary.splitlines()), (stage, summary)
    assert "failed:  none" in summary and "sanitizer" in summary.split("not run:")[1]
    assert (out / "cuda-tests.xml").exists() and (out / "kernels-tests.xml").exists()
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"environment", "decompose", "decompose_group", "layer", "model"} <= kinds
    variants = {r["variant"] for r in rows if r["kind"] == "decompose"}
    assert {"eager", "small_solve", "graphs", "graphs+small_solve"} <= variants
    assert not [r for r in rows if "error" in r and r.get("variant") != "tensorly"], rows
    assert {r["mode"] for r in rows if r["kind"] == "model"} == {"eager", "compile"}


def test_gpu_check_refuses_unknown_options(tmp_path):
    proc = _check(tmp_path, "--fast", timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    for bad in ("0", "00", "08", "-1", "x", "1000"):
        proc = _check(tmp_path, "--dry-run", env=dict(os.environ, DRY_SCALE=bad), timeout=60)
        assert proc.returncode == 2 and "DRY_SCALE must be an integer from 1 to 999" in proc.stderr, bad
    proc = _check(tmp_path, "--dry-run", env=dict(os.environ, GPU_CHECK_DEADLINE="0"), timeout=60)
    assert proc.returncode == 2 and "GPU_CHECK_DEADLINE must be a number of seconds" in proc.stderr


def _slow_python(tmp_path, seconds):
    """A stand-in python that takes `seconds` for whatever it is asked, then succeeds."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec sleep {seconds}\n")
    fake.chmod(0o755)
    return str(fake)


def test_gpu_check_kills_a_stage_at_its_limit_and_keeps_the_deadline(tmp_path):
    # Deadline 10 s: the imports stage gets the 7 s left of it (10 - 3) instead of its 25 s.
    # A stage that takes 30 s is killed there, fails the check, and stops every later stage.
    env = dict(os.environ, GPU_CHECK_DEADLINE="10", DRY_SCALE="1", PYTHON=_slow_python(tmp_path, 30))
    proc = _check(tmp_path / "a", "--dry-run", env=env, timeout=120)
    summary = (tmp_path / "a" / "summary.txt").read_text()
    assert proc.returncode != 0
    assert any(line.startswith("imports") and re.search(r"killed at [67]s", line) for line in summary.splitlines()), \
        summary
    assert "failed:  imports" in summary
    # Stages that take 4 s each: imports passes; by the time the next stage would start, less than the
    # 5 s a stage needs is left of the deadline, so it and the rest are "not run".
    env["PYTHON"] = _slow_python(tmp_path, 4)
    proc = _check(tmp_path / "b", "--dry-run", env=env, timeout=120)
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert any(line.startswith("imports") and "passed" in line for line in summary.splitlines()), summary
    assert "the 10s deadline was reached" in summary
    for stage in ("kernels", "cuda", "decompose", "layers", "models"):
        assert stage in summary.split("not run:")[1], summary


def test_gpu_check_summary_survives_a_failed_import(tmp_path):
    # A python that cannot import torch: the later stages are marked "not run", the summary is written,
    # and the script fails.
    env = dict(os.environ, PYTHON="false")
    proc = _check(tmp_path, "--dry-run", env=env, timeout=120)
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
