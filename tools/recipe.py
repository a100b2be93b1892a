"""The MiniCPM recipe end to end on one CPU, with the scores after each stage (README, "The recipe").

    python tools/recipe.py --work out/recipe            # ~15 minutes on 2 cores
    python tools/recipe.py --work /tmp/r --quick        # seconds: the pipeline only (tests/test_recipe.py)

Runs the README's commands, each a plain script call, in order:
  1. stable   train.py, WSD with the decay past the end: the stable phase only (§4.3's trunk)
  2. decay    train.py --init_from stable --decay_only, the decay on a mixture of pre-training text and the
              instruction set's conversations (§5 two-stage pre-training, Table 1's "HQ + SFT" decay)
  3. sft      train.py --init_from decay --sft --data instruct: loss on the replies only, lr = the decay's
              last lr (§6.3)
  4. dpo      dpo.py --init_from sft on the embedded preference pairs (§6.4)
After each stage eval.py scores the checkpoint: exact match on instruct.py's held-out items per family,
and the validation bits/byte of the pre-training text and of the conversations' replies. Writes
WORK/scores.jsonl (eval.py's lines) and WORK/recipe.md (the table, with each stage's wall time).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (stage, script, flags): the README's commands. {w} is the work folder; steps are (default, --quick)
STAGES = [
    ("stable", "train.py", "--out_dir {w}/stable --max_steps {stable} --decay_start {stable} --eval_interval 0"),
    ("decay", "train.py", "--init_from {w}/stable --decay_only --decay_steps {decay} --out_dir {w}/decay "
                          "--data stdlib:0.7,instruct:0.3 --eval_interval 0"),
    ("sft", "train.py", "--init_from {w}/decay --sft --data instruct --max_steps {sft} --out_dir {w}/sft --eval_interval 0"),
    ("dpo", "dpo.py", "--init_from {w}/sft --out_dir {w}/dpo --max_steps {dpo}"),
]
STEPS = dict(stable=(600, 4), decay=(150, 2), sft=(300, 3), dpo=(60, 2))


def run(argv, log):
    """One command, its output appended to the log; a failure stops the recipe with the command shown."""
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"recipe.py: {' '.join(argv)} failed (exit {done.returncode}): see {log}")
    return time.perf_counter() - t


def scores(work, stage, log, quick):
    """eval.py on the stage's checkpoint -> {column: value}, from the JSON lines it appends."""
    out = work / "scores.jsonl"
    before = out.read_text().count("\n") if out.exists() else 0
    datasets = "data/stdlib-bpe4096,data/instruct-bpe4096-chat"
    run(["eval.py", "--ckpt", str(work / stage), "--task", "instruct", "--max_new_tokens", "48", "--seq_len", "256",
         "--data", datasets, "--out", str(out), *(["--limit", "8"] if quick else [])], work / "log.txt")
    lines = [json.loads(line) for line in out.read_text().splitlines()[before:]]
    row = {}
    for line in lines:
        m = line["metrics"]
        if line["task"] == "instruct":
            row.update({f"exact {k}": v for k, v in m["families"].items()})
        else:   # bits/byte of a dataset's validation split (the replies only, for conversations)
            row["bpb " + pathlib.Path(line["task"][5:]).name.split("-")[0]] = m["val_bpb"]
    return row


def table(rows):
    """Markdown: one row per stage, its wall time and scores."""
    keys = sorted({k for _, _, r in rows for k in r})
    head = "| stage | wall (s) | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for stage, seconds, r in rows:
        lines.append(f"| {stage} | {seconds:.0f} | " + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/recipe", help="folder for the four runs, scores.jsonl and recipe.md")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: the pipeline, not the scores")
    args = p.parse_args(argv)
    work = pathlib.Path(args.work).resolve()
    if work.exists() and any(work.iterdir()):   # never mix two recipes' runs and scores
        sys.exit(f"recipe.py: --work {work} is not empty: give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    steps = {k: v[1] if args.quick else v[0] for k, v in STEPS.items()}
    rows = []
    for stage, script, flags in STAGES:
        seconds = run([script, *flags.format(w=work, **steps).split()], work / "log.txt")
        rows.append((stage, seconds, scores(work, stage, work / "log.txt", args.quick)))
        print(f"{stage}: {seconds:.0f} s, {rows[-1][2]}", flush=True)
    (work / "recipe.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
