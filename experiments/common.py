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

# the repo's flat scripts (train.py, data.py, minicpm.py) are not a package: put the repo root on the path
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (importable once the root is on the path)


class RunFailed(RuntimeError):
    """A train.py run of an experiment exited non-zero (its log.txt says why)."""


def run_train(argv, run_dir):
    """train.main in this process, its chatter appended to run_dir/log.txt; RunFailed on failure."""
    # in-process, not a subprocess: a worker imports torch once and runs many short runs after it.
    # "a": a trunk resumed in segments appends to one log, so a failure shows its whole history
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = train.main([str(a) for a in argv])   # argv like the command line: numbers and paths as strings
    if code != 0:
        raise RunFailed(f"train.py {' '.join(map(str, argv))} failed with exit code {code}; see {run_dir / 'log.txt'}")
    return run_dir


# each worker's initializer: one torch thread per process, so two processes share 2 cores without
# oversubscribing them (see the module docstring)
def _one_thread():
    import torch
    torch.set_num_threads(1)


def _run_job(job):
    """A job is a list of (argv, run_dir) steps run in order in one worker (a trunk and its branches)."""
    for argv, run_dir in job:   # in order: a branch resumes the checkpoint its trunk segment just wrote
        run_train(argv, run_dir)
    return [str(run_dir) for _, run_dir in job]


def _try_job(job):
    """_run_job, but a failed run gives None instead of stopping the pool (an lr sweep's diverged runs)."""
    try:
        return _run_job(job)
    except RunFailed:
        return None


def run_parallel(jobs, workers=None, allow_failures=False):
    """Run independent jobs in `workers` processes (default: the CPU count), one torch thread each."""
    # each job is a list of (argv, run_dir) steps that run in order; returns when all are done. The
    # first failure stops the pool and raises RunFailed, unless allow_failures: then a failed job's
    # result is None (its log.txt says why) and the others go on (an lr sweep expects some to diverge)
    jobs = [list(job) for job in jobs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))   # never more processes than jobs
    run = _try_job if allow_failures else _run_job
    if workers == 1:   # no pool: simpler tracebacks, and the caller's thread setting is kept
        return [run(job) for job in jobs]
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        # chunksize 1: jobs go out one at a time, so a free worker takes the next (callers sort longest first)
        return pool.map(run, jobs, chunksize=1)


def scale_setup(scales, args, **overrides):
    """The sizes of --scale (or --quick), with the step and seed flags the user gave on top."""
    # a flag left at None keeps the scale's value: only what was asked for changes
    setup = dict(scales["quick" if args.quick else args.scale])
    setup.update({key: value for key, value in overrides.items() if value is not None})
    return setup


def add_data_flags(p):
    """The flags every experiment shares: where outputs go and the data its runs train on."""
    # bytes by default: a 257-token vocabulary keeps the embedding from dominating models this small
    # (a 50K-token embedding at width 64 would be 3.2M parameters, beside ~0.1M non-embedding ones)
    p.add_argument("--out", default=str(ROOT / "experiments" / "out"), help="folder for the PNGs, CSVs and runs")
    p.add_argument("--source", default="stdlib", help="corpus, passed to train.py")
    p.add_argument("--tokenizer", default="byte", help="tokenizer, passed to train.py (keep the vocabulary small)")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="prepared datasets, passed to train.py")
    return p


# one dict per line of the run's metrics.jsonl, in the order train.py wrote them (train and eval rows)
def read_metrics(run_dir):
    return [json.loads(line) for line in open(pathlib.Path(run_dir) / "metrics.jsonl")]


def pyplot():
    """matplotlib.pyplot on the Agg backend: the experiments write files and never open a window."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fail(message):
    """Experiments print one line and exit 1 when a run fails (the run's log has the details)."""
    # sys.exit with a string prints it on stderr and exits 1: no traceback for a run that failed
    sys.exit(f"{pathlib.Path(sys.argv[0]).name}: {message}")
