"""One command for the GPU figures: run it on a CUDA machine and send back the report it writes.

    python gpu_report.py [--out gpu_report] [--skip kernel,train,tests]

Three parts, each in its own process or try block so that one failure does not lose the others:
  kernel  kernels.py's attention against SDPA's flash backend and eager attention, forward and
          forward+backward, bf16, head dim 64, T = 512..16384, 36 heads (MiniCPM-2B) and 24 query /
          8 KV heads (MiniCPM-1B): kernel_bench.py. Target: at T = 4096 at least 0.9x flash's speed
          forward and 0.8x forward+backward.
  train   `python train.py --preset P --bench` for minicpm-1.2b and minicpm-2.4b, bf16, torch.compile
          off and on, as a single-process DDP run (the rank variables torchrun would set): tokens/s,
          MFU and peak memory. Target: MFU >= 45% on an H100.
  tests   the test suite's GPU tests (tests/test_kernels.py runs its real-size cases on CUDA), and
          tests/test_aot.py, whose compile check should agree with what the GPU runs.
It writes DIR/report.md (the tables, the targets met or not, the device) and the raw logs beside it.
"""
import argparse
import os
import re
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))   # the children run train.py and pytest from here
PRESETS = ("minicpm-1.2b", "minicpm-2.4b")
# train.py --bench prints "bench P: 12,345 tokens/s, 123.456 TFLOP/s per process = 45.6% of ..."
BENCH_LINE = re.compile(r"bench (\S+): ([\d,]+) tokens/s, ([\d.]+) TFLOP/s per process = ([\d.]+)% of")
# the child runs train.py through runpy and prints the peak memory itself at exit, in one fixed
# format (the same process, so torch.cuda.max_memory_allocated covers the whole run, warm-up included).
CHILD = """import runpy, sys, torch
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
if torch.cuda.is_available():
    print(f"peak_memory_gib {torch.cuda.max_memory_allocated() / 2**30:.2f}")
sys.exit(code)
"""


def free_port():
    # each child is its own 1-process job with its own rendezvous: a fixed port could still be held
    # by the previous child's socket in TIME_WAIT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_part(out_dir, log):
    """kernel_bench.bench's rows, and the T = 4096 ratios against the targets."""
    import kernel_bench   # imported here: the other parts must run even where triton is missing
    rows = kernel_bench.bench(out_dir)
    # the targets are at T = 4096, MiniCPM's training length; the whole sweep is in the CSV
    lines = ["| heads | mode | triton ms | sdpa-flash ms | eager ms | triton / flash speed | target |",
             "|---|---|---|---|---|---|---|"]
    for shape in kernel_bench.BENCH_SHAPES:
        for mode, target in (("fwd", 0.9), ("fwd+bwd", 0.8)):
            ms = {r["impl"]: r["ms"] for r in rows if r["shape"] == shape and r["mode"] == mode and r["seq_len"] == 4096}
            ratio = ms["sdpa-flash"] / ms["triton"]   # > 1: the kernel is faster than flash
            lines.append(f"| {shape} | {mode} | {ms['triton']:.3f} | {ms['sdpa-flash']:.3f} | {ms['eager']:.3f} | "
                         f"{ratio:.2f}x | >= {target}x: {'met' if ratio >= target else 'NOT met'} |")
    err = max(float(r["triton_rel_err"]) for r in rows)
    log.append(f"Largest relative error of the kernel's forward against flash over all shapes: {err:.1e}.")
    return ["## Attention kernel at T = 4096 (bf16, head dim 64; all lengths in attention.csv / .png)", "",
            *lines, ""]


# compile off first: its figure stands even if torch.compile fails on this machine's toolchain
def train_runs(args):
    """(preset, compile) for every run of the training benchmark."""
    return [(p, c) for p in args.presets.split(",") for c in args.compile.split(",")]


def train_part(args, log_dir):
    """One subprocess per (preset, compile): train.py --bench as a 1-process DDP job."""
    lines = ["| preset | compile | tokens/s | TFLOP/s | MFU | peak memory GiB | exit |", "|---|---|---|---|---|---|---|"]
    # one process per run: a run that runs out of memory or hangs cannot take the next one with it,
    # and torch.compile's caches and the CUDA allocator start clean for each figure
    for preset, comp in train_runs(args):
        # torchrun's variables for one process: parallel.py then builds a real (1-rank) DDP job
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, "-c", CHILD, "--preset", preset, "--bench", "--compile", comp, "--device", args.device,
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--source", args.source,
               "--tokenizer", args.tokenizer, "--data_dir", args.data_dir, "--out_dir", os.path.join(log_dir, "runs")]
        if args.device != "cpu":   # bf16 autocast, as the MFU targets assume (the CPU keeps fp32)
            cmd += ["--dtype", "bfloat16"]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
            text, code = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:   # a hung run must not hang the report
            text, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {args.timeout} s", "timeout"
        with open(os.path.join(log_dir, f"train_{preset}_compile-{comp}.log"), "w") as f:
            f.write(" ".join(cmd[:2] + ["CHILD"] + cmd[3:]) + "\n" + str(text))
        # a run that failed (out of memory, a compile error) leaves dashes and its exit code in the row
        m = BENCH_LINE.search(str(text))
        mem = re.search(r"peak_memory_gib ([\d.]+)", str(text))
        cells = [m.group(2), m.group(3), f"{m.group(4)}%"] if m else ["-", "-", "-"]
        lines.append(f"| {preset} | {comp} | " + " | ".join(cells) + f" | {mem.group(1) if mem else '-'} | "
                     f"{code} ({time.time() - t0:.0f} s) |")
    return [f"## Training benchmark (train.py --bench, 1-process DDP, batch {args.batch_size} x {args.seq_len} "
            f"tokens, --tokenizer {args.tokenizer}; target MFU >= 45% on an H100)", "", *lines, ""]


def tests_part(args, log_dir):
    """pytest on the GPU tests; the summary line goes into the report, the full output into a log."""
    # -rs lists the skipped tests with their reasons: on a GPU, a CUDA test that still skips is a finding
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", *args.tests.split(",")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # real compiles on the GPU
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = f"{e.stdout or ''}\ntimed out after {args.timeout} s"
    with open(os.path.join(log_dir, "tests.log"), "w") as f:
        f.write(str(text))
    # pytest's last line ("12 passed, 3 skipped in 40.1s") is the report's line; details stay in the log
    summary = [line for line in str(text).splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return ["## GPU tests", "", f"`{' '.join(cmd[1:])}`: {summary[-1] if summary else 'no summary, see tests.log'}", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_report", help="folder for report.md, the CSV/PNG and the logs")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: kernel, train, tests")
    p.add_argument("--presets", default=",".join(PRESETS), help="train: comma-separated presets")
    p.add_argument("--compile", default="false,true", help="train: --compile values to run")
    p.add_argument("--batch_size", type=int, default=1, help="train: sequences per step (1 fits the 2.4B in 80 GB)")
    p.add_argument("--seq_len", type=int, default=4096, help="train: tokens per sequence (MiniCPM's 4096)")
    p.add_argument("--source", default="stdlib", help="train: corpus (stdlib: on every machine, no network)")
    p.add_argument("--tokenizer", default="byte", help="train: byte needs no download and prepares in seconds")
    p.add_argument("--data_dir", default="data", help="train: where the prepared corpus lives")
    p.add_argument("--tests", default="tests/test_kernels.py,tests/test_aot.py", help="tests: pytest paths")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before one run counts as hung")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks this script's plumbing (train part)")
    args = p.parse_args(argv)
    # refusals come before anything is written, each as one line (exit 2)
    args.out, args.data_dir = os.path.abspath(args.out), os.path.abspath(args.data_dir)   # children run in ROOT
    skip = set(filter(None, args.skip.split(",")))
    if not skip <= {"kernel", "train", "tests"}:
        p.error(f"--skip takes kernel, train, tests; got {args.skip}")
    # without a GPU there is nothing to measure; --device cpu is for checking this script itself
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_report.py: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        return 2
    # the report names the device and versions: figures without them cannot be compared with others
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (plumbing check only)"
    report = [f"# GPU report: {gpu}", "",
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    notes = []   # remarks a part adds below the tables (the kernel's largest error)
    # the kernel first: its figures come quickest; each part writes report.md as soon as it is done
    parts = {"kernel": lambda: kernel_part(args.out, notes), "train": lambda: train_part(args, args.out),
             "tests": lambda: tests_part(args, args.out)}
    for name, part in parts.items():
        if name in skip:
            continue
        try:
            report += part()
        except (Exception, SystemExit) as e:   # one broken part must not lose the others' figures
            report += [f"## {name}: failed", "", f"`{type(e).__name__}: {e}`", ""]
        if torch.cuda.is_available():   # hand the kernel benchmark's cached memory back before a training run
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "report.md"), "w") as f:   # rewritten after each part
            f.write("\n".join(report + notes) + "\n")
    print("\n".join(report + notes))
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
