"""What the experiment scripts share: the repo's flat scripts on the import path, and running
train.py in-process (one torch import for all runs) with each run's output kept in its folder."""
import contextlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (importable once the root is on the path)


def run_train(argv, run_dir):
    """train.main in this process, its chatter appended to run_dir/log.txt; exits on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = train.main([str(a) for a in argv])
    if code != 0:
        sys.exit(f"train.py {' '.join(map(str, argv))} failed with exit code {code}; see {run_dir / 'log.txt'}")


def read_metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
