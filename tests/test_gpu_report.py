"""tools/gpu_report.py on a machine without a GPU: it refuses in one line, its training part runs the
real train.bench in a fresh child process (with --device cpu) and reports what that returned, and its
tests part reads pytest's counts from the JUnit XML."""
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_report.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_report  # noqa: E402


def test_refuses_without_a_gpu(tmp_path):
    import torch   # this test file needs no triton: the refusal comes before any kernel import
    if torch.cuda.is_available():
        return   # nothing to refuse on a GPU machine
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "CUDA" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()   # refused before anything was written


def test_bad_flags_are_one_line(tmp_path):
    # checked in-process (no child, no torch start-up): the same function the command line calls
    for bad in (["--skip", "kernal"], ["--presets", "minicpm-3b"], ["--compile", "maybe"], ["--batch_sise", "2"]):
        assert gpu_report.main([*bad, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2, bad
    assert not (tmp_path / "out").exists()


def test_training_part_reports_what_train_bench_returned_on_cpu(tmp_path, corpus):
    # the tiny preset at 2 x 32 tokens on the test corpus: seconds, yet the same child process, flags and
    # table as the GPU runs; run from another folder, with one thread (pytest may share 2 cores)
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--skip", "kernel,tests", "--out", str(out),
                        "--presets", "tiny", "--compile", "false", "--batch_size", "2", "--seq_len", "32",
                        "--source", corpus["source"], "--data_dir", corpus["data_dir"]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    [run] = json.load(open(out / "train.json"))
    assert run["preset"] == "tiny" and run["compile"] == "false" and "error" not in run, run
    r = run["result"]
    # the dict train.bench returned: a real measurement, and self-consistent (MFU = achieved / peak)
    assert r["preset"] == "tiny" and r["dtype"] == "float32" and r["peak_memory_gib"] is None   # no CUDA
    assert r["tokens_per_s"] > 0 and r["tflops_per_process"] > 0 and r["peak_tflops"] > 0
    assert abs(r["mfu"] - r["tflops_per_process"] / r["peak_tflops"]) < 1e-9 * r["mfu"] and 0 < r["mfu"] < 1
    # the report's row shows those numbers, not others
    row = next(line for line in open(out / "report.md").read().splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{r['tokens_per_s']:,.0f}" and float(cells[2].replace(",", "")) > 0, row
    assert float(cells[3]) == round(r["tflops_per_process"], 3) and cells[4] == f"{100 * r['mfu']:.1f}%", row
    assert cells[5] == "-" and cells[6].startswith("ok "), row
    # the child's own output went to its log, not to the report's stdout
    log = open(out / "train_tiny_compile-false.log").read()
    assert "bench tiny:" in log and "bench tiny:" not in p.stdout


def test_a_child_past_its_timeout_is_stopped_and_its_row_says_so(tmp_path):
    # the real benchmark cannot even import torch in 1 s: the child counts as hung and is terminated
    answer = gpu_report.bench_in_child(["--preset", "tiny", "--device", "cpu"], tmp_path / "child.log", timeout=1)
    assert answer == {"error": "timed out after 1 s"}
    assert gpu_report.train_row("tiny", "false", answer, 1.2) == "| tiny | false | - | - | - | - | timed out after 1 s (1 s) |"


def test_tests_part_counts_from_pytests_junit_xml(tmp_path):
    # a real pytest run on a file whose outcomes are known by hand: 2 pass, 1 fails, 1 skips
    (tmp_path / "test_known.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='needs CUDA')\n"
        "def test_d(): pass\n")
    args = type("Args", (), dict(tests=str(tmp_path / "test_known.py"), timeout=120))
    lines = gpu_report.tests_part(args, str(tmp_path))
    summary = next(line for line in lines if "passed" in line)
    assert ": 2 passed, 1 failed, 0 errors, 1 skipped in " in summary, summary
    named = [line for line in lines if line.startswith("- ")]
    # (the test's id may carry a folder prefix: pytest names it from its rootdir, here outside the repo)
    assert len(named) == 2 and "test_known::test_c`" in named[0] and "failure: `" in named[0] and "needs CUDA" in named[1], named
