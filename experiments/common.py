"""What the experiment scripts share: the repo's flat scripts on the import path, and running
train.py in-process (one torch import per worker) with each run's output kept in its folder.

Experiments are grids of independent runs (learning rates, seeds, schedules). `run_parallel` runs
them in worker processes, one torch thread each: on a 2-core machine two single-threaded runs
finish sooner than two runs one after the other with two threads each, because small matmuls do
not split well across threads and one thread that loses its core stalls the other.
"""
import contextlib
import json
import multiprocessing
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (importable once the root is on the path)


class RunFailed(RuntimeError):
    """A train.py run of an experiment exited non-zero (its log.txt says why)."""


def run_train(argv, run_dir):
    """train.main in this process, its chatter appended to run_dir/log.txt; RunFailed on failure."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = train.main([str(a) for a in argv])
    if code != 0:
        raise RunFailed(f"train.py {' '.join(map(str, argv))} failed with exit code {code}; see {run_dir / 'log.txt'}")
    return run_dir


def _one_thread():
    import torch
    torch.set_num_threads(1)


def _run_job(job):
    """A job is a list of (argv, run_dir) steps run in order in one worker (a trunk and its branches)."""
    for argv, run_dir in job:
        run_train(argv, run_dir)
    return [str(run_dir) for _, run_dir in job]


def _try_job(job):
    """_run_job, but a failed run gives None instead of stopping the pool (an lr sweep's diverged runs)."""
    try:
        return _run_job(job)
    except RunFailed:
        return None


def run_parallel(jobs, workers=None, allow_failures=False):
    """Run independent jobs in `workers` processes (default: the CPU count), one torch thread each.
    Each job is a list of (argv, run_dir) steps that run in order. Returns when all are done; the
    first failure stops the pool and raises RunFailed, unless allow_failures: then a failed job's
    result is None (its log.txt says why) and the others go on."""
    jobs = [list(job) for job in jobs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    run = _try_job if allow_failures else _run_job
    if workers == 1:   # no pool: simpler tracebacks, and the caller's thread setting is kept
        return [run(job) for job in jobs]
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        return pool.map(run, jobs, chunksize=1)


def add_data_flags(p):
    """The flags every experiment shares: where outputs go and the data its runs train on. Bytes by
    default: a 257-token vocabulary keeps the embedding from dominating models this small."""
    p.add_argument("--out", default=str(ROOT / "experiments" / "out"), help="folder for the PNGs, CSVs and runs")
    p.add_argument("--source", default="stdlib", help="corpus, passed to train.py")
    p.add_argument("--tokenizer", default="byte", help="tokenizer, passed to train.py (keep the vocabulary small)")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="prepared datasets, passed to train.py")
    return p


def read_metrics(run_dir):
    return [json.loads(line) for line in open(pathlib.Path(run_dir) / "metrics.jsonl")]


def fail(message):
    """Experiments print one line and exit 1 when a run fails (the run's log has the details)."""
    sys.exit(f"{pathlib.Path(sys.argv[0]).name}: {message}")
