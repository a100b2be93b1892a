"""One command for the GPU figures: run it on a CUDA machine and send back the report it writes.

    python tools/gpu_report.py [--out gpu_report] [--skip kernel,train,tests]

Three parts, each in its own process or try block so that one failure does not lose the others:
  kernel  kernels.py's attention against SDPA's flash backend and eager attention, forward and
          forward+backward, bf16, head dim 64, T = 512..16384, 36 heads (MiniCPM-2B) and 24 query /
          8 KV heads (MiniCPM-1B): tools/kernel_bench.py. Target: at T = 4096 at least 0.9x flash's
          speed forward and 0.8x forward+backward.
  train   train.bench (what `train.py --bench` measures) for minicpm-1.2b and minicpm-2.4b, bf16,
          torch.compile off and on, each in a fresh child process set up as a 1-process torchrun job:
          tokens/s, MFU and peak memory. Target: MFU >= 45% on an H100.
  tests   the test suite's GPU tests (tests/test_kernels.py runs its real-size cases on CUDA), and
          tests/test_aot.py, whose compile check should agree with what the GPU runs.
It writes DIR/report.md (the tables, the targets met or not, the device), DIR/train.json (the
training figures as train.bench returned them) and the raw logs beside them.
"""
import json
import multiprocessing
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

# the repo's flat scripts (train.py, cli.py) are not a package: the repo root on the path, so this
# runs as `python tools/gpu_report.py` from any folder; the children run pytest from the root
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402  (importable once the root is on the path)

PRESETS = ("minicpm-1.2b", "minicpm-2.4b")
PARTS = ("kernel", "train", "tests")


def free_port():
    # each child is its own 1-process job with its own rendezvous: a fixed port could still be held
    # by the previous child's socket in TIME_WAIT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- kernel part

def kernel_part(out_dir, notes):
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
    notes.append(f"Largest relative error of the kernel's forward against flash over all shapes: {err:.1e}.")
    return ["## Attention kernel at T = 4096 (bf16, head dim 64; all lengths in attention.csv / .png)", "",
            *lines, ""]


# ----------------------------------------------------------------------------- training part

def _bench_child(argv, port, log_path, conn):
    """In a fresh (spawned) process: train.bench(argv) as rank 0 of a 1-process torchrun job; sends
    back JSON text, {"result": dict} or {"error": text}. Everything it prints goes to log_path."""
    # torchrun's variables for one process: parallel.setup then builds the same process group a
    # multi-GPU run has (set before train is imported, since nothing must read them earlier)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log = open(log_path, "a", buffering=1)
    # at the file-descriptor level, so output from C++ (NCCL, inductor's compiler) lands in the log too
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        import train
        answer = {"result": train.bench(argv)}
    except cli.UsageError as e:   # the flags were refused: one line says which
        answer = {"error": f"refused: {e}"}
    except BaseException as e:    # out of memory, a compile error, a bug: the log keeps the traceback
        traceback.print_exc()
        answer = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    log.flush()
    # JSON text, not a pickled object: the parent reads back plain numbers and strings only
    conn.send_bytes(json.dumps(answer, default=str).encode())


def bench_in_child(argv, log_path, timeout):
    """train.bench(argv) in its own process -> {"result": dict} or {"error": text}, within timeout seconds."""
    # spawn, not fork: the parent may hold a CUDA context (the kernel part), which a forked child
    # cannot use; a fresh process also starts with a clean CUDA allocator and torch.compile cache,
    # and a run that runs out of memory or crashes cannot take the next one with it
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    # not a daemon: torch.compile starts compile workers of its own, which a daemon process may not
    child = ctx.Process(target=_bench_child, args=(argv, free_port(), str(log_path), send))
    child.start()
    send.close()   # the parent's copy: recv then sees EOF as soon as the child is gone
    answer, hung = None, not recv.poll(timeout)   # poll: an answer, or EOF from a child that died
    if not hung:
        try:
            answer = json.loads(recv.recv_bytes())
        except EOFError:   # it died without answering (killed for memory, a segfault)
            pass
        child.join(30)   # its exit (the process group's teardown) takes seconds at most
    if child.is_alive():   # a hung run must not hang the report, nor hold the GPU for the next one
        child.terminate()
        child.join(10)
        if child.is_alive():   # SIGTERM can be caught (train.py's loop saves first); SIGKILL cannot
            child.kill()
            child.join()
    if answer is None:
        answer = {"error": f"timed out after {timeout} s" if hung else
                  f"the child exited with code {child.exitcode} without a result (see the log)"}
    return answer


# compile off first: its figure stands even if torch.compile fails on this machine's toolchain
def train_runs(args):
    """(preset, compile) for every run of the training benchmark."""
    return [(p, c) for p in args.presets.split(",") for c in args.compile.split(",")]


def train_argv(args, preset, comp, log_dir):
    """The train.py flags of one benchmark run (train.bench adds --bench)."""
    argv = ["--preset", preset, "--compile", comp, "--device", args.device, "--batch_size", str(args.batch_size),
            "--seq_len", str(args.seq_len), "--source", args.source, "--tokenizer", args.tokenizer,
            "--data_dir", args.data_dir, "--out_dir", os.path.join(log_dir, "runs", f"{preset}_compile-{comp}")]
    if args.device != "cpu":   # bf16 autocast, as the MFU targets assume (the CPU keeps fp32)
        argv += ["--dtype", "bfloat16"]
    return argv


def train_row(preset, comp, answer, seconds):
    """One markdown row; a failed run (out of memory, a compile error, a timeout) keeps dashes and says why."""
    r = answer.get("result")
    if r is None:
        return f"| {preset} | {comp} | - | - | - | - | {answer['error']} ({seconds:.0f} s) |"
    mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"   # None off CUDA
    return (f"| {preset} | {comp} | {r['tokens_per_s']:,.0f} | {r['tflops_per_process']:.3f} | {100 * r['mfu']:.1f}% "
            f"| {mem} | ok ({seconds:.0f} s) |")


def train_part(args, log_dir):
    """One child process per (preset, compile); the table, and train.json with every dict as returned."""
    lines = ["| preset | compile | tokens/s | TFLOP/s | MFU | peak memory GiB | status |", "|---|---|---|---|---|---|---|"]
    raw, peaks = [], set()
    for preset, comp in train_runs(args):
        log_path = os.path.join(log_dir, f"train_{preset}_compile-{comp}.log")
        argv = train_argv(args, preset, comp, log_dir)
        with open(log_path, "w") as f:   # the call first, so a log that ends early still says what ran
            f.write(f"train.bench({argv})\n")
        t0 = time.time()
        answer = bench_in_child(argv, log_path, args.timeout)
        lines.append(train_row(preset, comp, answer, time.time() - t0))
        raw.append(dict(preset=preset, compile=comp, **answer))
        if "result" in answer:
            peaks.add(f"{answer['result']['peak_tflops']:.3g} TFLOP/s ({answer['result']['peak_what']})")
        with open(os.path.join(log_dir, "train.json"), "w") as f:   # rewritten after each run
            json.dump(raw, f, indent=1)
    return [f"## Training benchmark (train.bench, 1-process torchrun job, batch {args.batch_size} x {args.seq_len} "
            f"tokens, --tokenizer {args.tokenizer}; target MFU >= 45% on an H100)", "", *lines, "",
            f"MFU against the peak of {', '.join(sorted(peaks)) or '-'}.", ""]


# ----------------------------------------------------------------------------- tests part

def junit_counts(path):
    """pytest's --junitxml file -> ({passed, failed, errors, skipped, seconds}, [(outcome, test, message)])."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")   # pytest wraps it in <testsuites>
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts = dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                  errors=n["errors"], skipped=n["skipped"], seconds=float(suite.get("time", 0)))
    # on a GPU, a CUDA test that still skips is a finding: every test not passed is named with its reason
    details = []
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            el = case.find(outcome)
            if el is not None:
                details.append((outcome, f"{case.get('classname')}::{case.get('name')}", el.get("message", "")))
    return counts, details


def tests_part(args, log_dir):
    """pytest on the GPU tests; its counts read from the JUnit XML it writes, the full output into a log."""
    xml_path = os.path.join(log_dir, "tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "", "--junitxml", xml_path, *args.tests.split(",")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # real compiles on the GPU
    if os.path.exists(xml_path):   # an XML left by an earlier report must not pass for this run's
        os.remove(xml_path)
    with open(os.path.join(log_dir, "tests.log"), "w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return ["## GPU tests", "", f"`{' '.join(cmd[1:])}`: timed out after {args.timeout} s (see tests.log)", ""]
    if not os.path.exists(xml_path):   # pytest could not even start (a bad path, an import error)
        return ["## GPU tests", "", f"`{' '.join(cmd[1:])}`: no results, see tests.log", ""]
    c, details = junit_counts(xml_path)
    summary = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped in {c['seconds']:.0f} s"
    return ["## GPU tests", "", f"`{' '.join(cmd[1:])}`: {summary}", "",
            *(f"- {outcome}: `{test}`: {message}" for outcome, test, message in details), ""]


# ----------------------------------------------------------------------------- the report

def parse_flags(argv):
    """The flags, checked; bad input raises cli.UsageError (one line, exit 2) before anything is written."""
    from minicpm import PRESETS as KNOWN
    p = cli.Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="gpu_report", help="folder for report.md, train.json, the CSV/PNG and the logs")
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
    args.skip = set(filter(None, args.skip.split(",")))
    cli.check([(not args.skip <= set(PARTS), f"--skip takes {', '.join(PARTS)}; got {','.join(sorted(args.skip))}"),
               (not set(args.presets.split(",")) <= set(KNOWN), f"--presets {args.presets}: not all in {', '.join(KNOWN)}"),
               (not set(args.compile.split(",")) <= {"false", "true"}, f"--compile {args.compile}: false, true or both"),
               (args.timeout < 1, "--timeout must be at least 1 second"),
               (args.device not in ("cuda", "cpu"), f"--device {args.device}: cuda, or cpu for a plumbing check")])
    # without a GPU there is nothing to measure; --device cpu is for checking this script itself
    if args.device == "cuda" and not torch.cuda.is_available():
        raise cli.UsageError("no CUDA GPU here; run it on a machine with one (or --device cpu to check the plumbing)")
    # the children run from ROOT: relative paths are the caller's, so they are made absolute here
    args.out, args.data_dir = os.path.abspath(args.out), os.path.abspath(args.data_dir)
    return args


def run(argv):
    """Each part in turn, report.md rewritten after each; -> exit code 0."""
    args = parse_flags(argv)
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
        if name in args.skip:
            continue
        try:
            report += part()
        except (Exception, SystemExit) as e:   # one broken part must not lose the others' figures
            report += [f"## {name}: failed", "", f"`{type(e).__name__}: {e}`", ""]
        if torch.cuda.is_available():   # hand the kernel benchmark's cached memory back before the training runs
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "report.md"), "w") as f:   # rewritten after each part
            f.write("\n".join(report + notes) + "\n")
    print("\n".join(report + notes))
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return 0


def main(argv=None):   # -> exit code: 0, or 2 for bad flags / no GPU (one line on stderr)
    return cli.main("gpu_report.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
