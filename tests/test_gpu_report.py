"""gpu_report.py on a machine without a GPU: it refuses in one line, and its training part's plumbing
(a 1-process DDP child running train.py --bench, the parsing of its line) works with --device cpu."""
import os
import subprocess
import sys

from conftest import ROOT


def test_refuses_without_a_gpu(tmp_path):
    import torch   # this test file needs no triton: the refusal comes before any kernel import
    if torch.cuda.is_available():
        return   # nothing to refuse on a GPU machine
    p = subprocess.run([sys.executable, "gpu_report.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "CUDA" in p.stderr


def test_training_part_reads_train_py_bench_line_on_cpu(tmp_path, corpus):
    # the tiny preset at 2 x 32 tokens on the test corpus: seconds, yet the same child, flags and parsing
    # as the GPU runs; one thread, since pytest may run beside other work on a 2-core machine
    p = subprocess.run([sys.executable, "gpu_report.py", "--device", "cpu", "--skip", "kernel,tests", "--out",
                        str(tmp_path), "--presets", "tiny", "--compile", "false", "--batch_size", "2", "--seq_len", "32",
                        "--source", corpus["source"], "--data_dir", corpus["data_dir"]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    report = open(tmp_path / "report.md").read()
    row = next(line for line in report.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # tokens/s and TFLOP/s parsed as numbers, the run exited 0 (train.py's own output is in the log)
    assert float(cells[2].replace(",", "")) > 0 and float(cells[3]) > 0 and cells[6].startswith("0 "), row
    assert os.path.exists(tmp_path / "train_tiny_compile-false.log")
