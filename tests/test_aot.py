"""Tests for `python tools/aot.py`: kernels.py compiled for A100 (sm_80) and H100 (sm_90)
on a machine without a GPU, and the resource check that would catch a spilling or oversized tile.

Everything runs in subprocesses without TRITON_INTERPRET: this test process has the interpreter on
(conftest.py), which replaces the compiler for every kernel imported here. Each run gets a fresh
Triton cache, so the compiles are real, not read back from an earlier run.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The per-block shared memory limits, by hand from the CUDA C++ Programming Guide's table of
# compute capabilities (163 KB on 8.0, 227 KB on 9.0), not from tools/aot.py.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def run(args, tmp_path, env_extra=None):
    # a fresh process without the interpreter, and a cache of its own in the test's folder
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow   # ~30 s on 2 cores: 108 compiles
def test_every_kernel_compiles_without_spills_for_sm80_and_sm90(tmp_path):
    out = run(["tools/aot.py", "--out", str(tmp_path)], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "aot.csv")))
    # every kernel for every target, dtype and head dim: the delta kernel once, the tuned ones >= 3 tiles
    seen = {(r["kernel"], r["target"], r["dtype"], r["head_dim"]) for r in rows}
    assert len(seen) == 4 * 2 * 2 * 2
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for key in seen:
            if key[0] == kernel:
                assert sum((r["kernel"], r["target"], r["dtype"], r["head_dim"]) == key for r in rows) >= 3
    for r in rows:   # re-check the verdict from the raw numbers, against the limits written above
        assert int(r["stack"]) == 0 and int(r["local"]) == 0, r
        assert 0 < int(r["regs"]) <= 255, r
        assert int(r["smem_bytes"]) <= SMEM_LIMIT[r["target"]], r
        if r["kernel"] != "bwd_delta":   # every matmul on tensor cores: Ampere's mma.sync on sm_80
            assert r["mma"] == "mma.sync" if r["target"] == "sm_80" else r["mma"] in ("wgmma", "mma.sync"), r
    # Hopper's wgmma needs 64 rows per warpgroup, so tiles with 32-row matmuls fall back to mma.sync on
    # sm_90; each kernel and head dim must still offer the autotuner at least one wgmma tile there.
    for kernel, target, dtype, hd in seen:
        if target == "sm_90" and kernel != "bwd_delta":
            assert any(r["mma"] == "wgmma" for r in rows if (r["kernel"], r["target"], r["dtype"], r["head_dim"])
                       == (kernel, target, dtype, hd)), (kernel, dtype, hd)


def test_one_target_compiles_and_prints_the_table(tmp_path):
    out = run(["tools/aot.py", "--targets", "sm_90", "--dtypes", "bf16", "--head_dims", "64",
               "--out", str(tmp_path)], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    header = out.stdout.splitlines()[0].split("\t")
    assert header[:4] == ["kernel", "target", "dtype", "head_dim"] and "regs" in header and "stack" in header
    rows = list(csv.DictReader(open(tmp_path / "aot.csv")))
    assert {r["target"] for r in rows} == {"sm_90"} and {r["head_dim"] for r in rows} == {"64"}
    # MiniCPM's head dim 64 forward: 5 tiles, the same count as listed in kernels.py's 64 row
    assert sum(r["kernel"] == "fwd" for r in rows) == 5


def test_the_check_catches_a_spilling_tile(tmp_path):
    # A tile kernels.py no longer lists because it failed: dK/dV, head dim 128, 128 x 64, 4 warps, 4 stages.
    # On sm_90 it needs ~290 KB of shared memory and spills registers (measured: 2.5 KB of stack).
    code = ("import json, sys; sys.path.insert(0, 'tools'); import aot; print(json.dumps(aot.compile_one(('bwd_dkdv', 'sm_90', 'bf16', 128, "
            "(128, 64, 4, 4)))))")
    out = run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["regs"] == 255 and row["stack"] > 0 and row["smem_bytes"] > SMEM_LIMIT["sm_90"]
    assert "spills" in row["problem"] and "smem" in row["problem"]


def test_refusals_are_one_line(tmp_path):
    out = run(["tools/aot.py"], tmp_path, {"TRITON_INTERPRET": "1"})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "TRITON_INTERPRET" in out.stderr
    # a target without a shared-memory limit in aot.TARGETS is refused, not compiled unchecked; every bad
    # flag is named in one line, before any compile and before anything is written. Run from another
    # folder: the script puts the repo root on the path itself.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot.py"), "--targets", "sm_75", "--dtypes",
                          "fp8", "--head_dims", "96", "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert all(flag in out.stderr for flag in ("--targets sm_75", "--dtypes fp8", "--head_dims 96")), out.stderr
    assert not (tmp_path / "out").exists()
