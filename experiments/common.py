"""What the experiment scripts share: the repo's flat scripts on the import path, running train.py
in-process (one torch import per worker) with each run's output kept in its folder, the flags every
experiment takes with one meaning (--quick --scale --out --seed --seeds --workers, and the data
flags), the checks of --out and the data made before anything is deleted, and the model's own N.

Experiments are grids of independent runs (learning rates, seeds, schedules). `run_parallel` runs
them in worker processes, one torch thread each: on a 2-core machine two single-threaded runs
finish sooner than two runs one after the other with two threads each, because small matmuls do
not split well across threads and one thread that loses its core stalls the other.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile

# the repo's flat scripts (train.py, data.py, minicpm.py) are not a package: put the repo root on the path
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (importable once the root is on the path)
import cli  # noqa: E402
import data  # noqa: E402
from cli import UsageError  # noqa: E402  (bad input: one line on stderr, exit 2; see main below)


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


# ----------------------------------------------------------------------------- the shared flags

def parser(doc):
    """An argparse parser whose bad values are one line (cli.Parser), --help the script's docstring."""
    # cli's parser raises UsageError instead of printing the ~30-line usage; main() prints it
    return cli.parser(doc)


def add_common_flags(p, seeds=2, seeds_help=""):
    """The flags every experiment shares, with one meaning in all of them."""
    # seeds: the script's default count (the single-seed designs keep 1, so their default runs are
    # unchanged); seeds_help: the roles the script gives its seeds, if any
    p.add_argument("--quick", action="store_true", help="tiny sizes: the smoke test the test suite runs")
    p.add_argument("--scale", default="cpu", choices=("cpu", "gpu"), help="sizes: cpu (2 cores) or gpu (one GPU)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "out"), help="folder for the PNGs, CSVs and runs")
    p.add_argument("--seed", type=int, default=1337, help="the first seed")
    p.add_argument("--seeds", type=seed_count, default=seeds,
                   help=f"how many seeds: --seed, --seed + 1, ... (default {seeds}){seeds_help}")
    p.add_argument("--workers", type=int, default=0, help="parallel processes, one torch thread each "
                   "(default 0: one per CPU core; 1 at --scale gpu, where the runs take the GPU in turn)")
    return p


def add_data_flags(p):
    """The corpus the runs train on, passed to train.py (long_context.py makes its own)."""
    # bytes by default: a 257-token vocabulary keeps the embedding from dominating models this small
    # (a 50K-token embedding at width 64 would be 3.2M parameters, beside ~0.1M non-embedding ones)
    p.add_argument("--source", default="stdlib", help="corpus, passed to train.py")
    p.add_argument("--tokenizer", default="byte", help="tokenizer, passed to train.py (keep the vocabulary small)")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="prepared datasets, passed to train.py")
    return p


def seed_count(text):
    """--seeds' type: a count. A list (the old --seeds 1337,1338 of some scripts) gets a hint."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: --seeds N runs N seeds from --seed on "
                                         "(e.g. --seed 1337 --seeds 2 for 1337 and 1338)") from None


def parse(p, argv):
    """The parsed flags, the shared ones checked: UsageError (one line) for a bad value."""
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: give at least 1 (the number of seeds, from --seed on)")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: give 0 (one per CPU core) or a positive count")
    return args


def seed_list(args):
    """--seed, --seed + 1, ...: --seeds of them."""
    return [args.seed + i for i in range(args.seeds)]


def workers(args):
    """--workers, or for 0 one per CPU core; 1 at --scale gpu (parallel runs would only share the GPU)."""
    return args.workers or (1 if args.scale == "gpu" and not args.quick else os.cpu_count() or 1)


def scale_setup(scales, args, **overrides):
    """The sizes of --scale (or --quick), with the step flags the user gave on top."""
    # a flag left at None keeps the scale's value: only what was asked for changes
    setup = dict(scales["quick" if args.quick else args.scale])
    setup.update({key: value for key, value in overrides.items() if value is not None})
    return setup


def main(script, run, argv):
    """run(argv) -> exit code; bad input (a UsageError, data.py's DataError too) one line, exit 2."""
    # only bad input is caught: a failed run has its own message (fail(), exit 1), a bug its traceback
    try:
        return run(sys.argv[1:] if argv is None else argv) or 0
    except UsageError as e:
        print(f"{script}: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- checks before any write

def check_out(path, flag="--out"):
    """A folder we can write in, or UsageError: checked before anything is deleted or written."""
    # an experiment deletes its old runs folder first, so a bad --out must be caught before that.
    # Writability is probed by making and removing an empty folder in the nearest existing one:
    # permission bits cannot tell (root passes them all, and /proc says rwx to no avail)
    p = pathlib.Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file: give a folder (it is made if missing)")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so the folder cannot be made: give another folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot make a folder in {parent} ({e.strerror}): give a writable folder") from None
    return p


def check_data(args):
    """--source, --tokenizer and --data_dir, resolved the way data.prepare does, preparing nothing."""
    # the same calls data.prepare starts with (the tokenizer spec, the dataset's name, listing the
    # source's files), so a bad flag is caught before the experiment deletes its old runs
    check_out(args.data_dir, "--data_dir")
    if not data.parse_tokenizer(args.tokenizer):
        data.load_tokenizer(args.tokenizer)   # a named encoding that cannot load fails here
    dataset = pathlib.Path(args.data_dir) / data.default_name(args.source, args.tokenizer)
    if (dataset / "meta.json").exists():
        meta = data.load_meta(dataset)   # prepared: prepare would reuse it, unless it holds another corpus
        if (meta["source"], meta["tokenizer"]) != (args.source, args.tokenizer):
            raise UsageError(f"--data_dir {args.data_dir}: {dataset} holds {meta['source']} with "
                             f"{meta['tokenizer']}, not --source {args.source}: give another --data_dir")
    elif args.source != "shakespeare":   # shakespeare: data.prepare downloads it once, nothing to list before
        try:
            data.list_files(args.source, args.data_dir, lambda *a: None)
        except UsageError as e:   # data.py's DataError says what is wrong with the source; name the flag
            raise UsageError(f"--source: {e}") from None


# ----------------------------------------------------------------------------- shared pieces of the runs

def eval_flags(tokens):
    """train.py's fixed validation set: `tokens` tokens in windows spread evenly over val.bin."""
    # data.eval_windows places the windows by position alone, not by the seed: every evaluation of
    # every run and seed sees the same windows, so a difference between two runs is the runs' own
    return ["--eval_tokens", tokens]


def meta_model(**config):
    """minicpm.MiniCPM of this config on the meta device: its shapes and counts, no memory, no init."""
    import torch
    from minicpm import MiniCPM, MiniCPMConfig
    with torch.device("meta"):
        return MiniCPM(MiniCPMConfig(**config))


def non_embedding_params(config, vocab_size=257):
    """N of the paper's scaling laws (§4.5): the model's own count, without the embedding."""
    # config: a model shape (n_layer, n_embd, ...) or a checkpoint's whole model_config. N leaves the
    # embedding out, so the vocabulary does not change it; 257 (bytes + EOT) only fills the field
    return meta_model(**{"vocab_size": vocab_size, **config}).num_params(non_embedding=True)


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
