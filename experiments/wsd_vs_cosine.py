"""WSD against cosine at tiny scale: the paper's Figure 5 (MiniCPM, Hu et al. 2024, §4).

One WSD run at constant lr (the stable stage) is trained in segments; at each branch point k its
folder is copied and the copy resumed with an exponential decay of D steps (--decay_start k), so
every decay continues the one stable run exactly (§4.3: one stable run, many decay lengths).
Against them: Cosine(T) runs, T equal to each branch's total k + D (Appendix B.1), each its own run.
All runs share the seed, the warmup and the batches (the loader is a pure function of the step).

    python experiments/wsd_vs_cosine.py            # tiny preset, totals 240 and 480 steps, ~5-20 min
    python experiments/wsd_vs_cosine.py --quick    # a 2-layer model, under a minute (the smoke test)
    python experiments/wsd_vs_cosine.py --source my.txt --tokenizer byte --data_dir /tmp/data ...

Writes to --out (default experiments/out): wsd_vs_cosine.png (lr and validation loss against
tokens, branch points marked), wsd_vs_cosine.csv (run, step, tokens, lr, train_loss, val_loss,
val_bpb) and runs/<run>/ (each run's metrics.jsonl and train.py log); prints a summary table.
"""
import argparse
import csv
import pathlib
import shutil
import sys
import time

from common import ROOT, read_metrics, run_train

# tiny preset with short sequences: 0.1-0.45 s a step on our shared 2 cores, ~1300 steps in all
FULL = dict(totals=(240, 480), model=["--preset", "tiny", "--batch_size", "8", "--seq_len", "128"],
            eval_interval=10, eval_batches=4, log_interval=5)
QUICK = dict(totals=(80, 160), model=["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2",
                                      "--ffn_dim", "160", "--block_size", "64", "--batch_size", "8", "--seq_len", "64"],
             eval_interval=12, eval_batches=2, log_interval=1)
DECAY_FRACS = (0.1, 0.025)   # §4: ~10% of the total is enough to match Cosine(T); 2.5% is not


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps: under a minute")
    p.add_argument("--out", default=str(ROOT / "experiments" / "out"), help="folder for the PNG, CSV and runs")
    p.add_argument("--totals", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="total steps of each WSD branch / cosine run (default 240,480; quick 80,160)")
    p.add_argument("--decay_fracs", type=lambda s: tuple(float(x) for x in s.split(",")), default=DECAY_FRACS,
                   help="decay lengths as fractions of the total")
    p.add_argument("--source", default="stdlib", help="corpus, passed to train.py")
    p.add_argument("--tokenizer", default="bpe:4096", help="tokenizer, passed to train.py")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="prepared datasets, passed to train.py")
    p.add_argument("--seed", type=int, default=1337)
    # One thread: on our busy 2-core machine two threads ran 15x slower than one (148 against 2,277
    # tokens/s), each waiting on the other whenever it lost its core.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def run_all(args, setup, runs_dir):
    """Train the stable run (in segments), its decay branches and the cosine runs. -> {run name:
    dict(T=total or None, D=decay or None, k=branch point or None, rows=metrics)}, stable run first."""
    totals = sorted(args.totals)
    warmup = max(1, round(0.05 * totals[0]))   # the same warmup for every run, so only the decay differs
    common = [*setup["model"], "--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
              "--seed", args.seed, "--warmup_steps", warmup, "--eval_interval", setup["eval_interval"],
              "--eval_batches", setup["eval_batches"], "--log_interval", setup["log_interval"],
              "--ckpt_interval", 10**9]   # a checkpoint only where each segment ends
    # branches: (name, total T, decay D, branch point k = T - D), sorted by branch point
    branches = sorted(((f"wsd_T{T}_decay{max(1, round(f * T))}", T, max(1, round(f * T)))
                       for T in totals for f in args.decay_fracs), key=lambda b: b[1] - b[2])
    stable = runs_dir / "stable"
    # The stable run is a WSD run whose decay starts at the longest total, never reached (the
    # schedule's name must stay "wsd" across a resume). Each segment ends at a branch point k by
    # resuming with --max_steps k: the lr stays constant, and the run evaluates and saves at k.
    stable_flags = [*common, "--schedule", "wsd", "--decay_start", totals[-1], "--decay_steps", 1, "--out_dir", stable]
    runs, at = {}, 0

    def stable_to(step):   # train the stable run on to `step`, where it evaluates and saves a checkpoint
        nonlocal at
        if step > at:
            run_train((stable_flags if at == 0 else ["--resume", stable]) + ["--max_steps", step], stable)
            at = step
    for name, T, D in branches:
        k = T - D
        for T_done in [T_ for T_ in totals if at < T_ <= k]:   # its constant-lr loss at each total, too
            stable_to(T_done)
        stable_to(k)
        branch = runs_dir / name
        shutil.copytree(stable, branch, ignore=shutil.ignore_patterns("log.txt"))
        t0 = time.time()
        run_train(["--resume", branch, "--max_steps", T, "--decay_start", k, "--decay_steps", D], branch)
        print(f"  {name}: decay {D} steps from step {k} of the stable run ({time.time() - t0:.0f} s)", flush=True)
        (branch / "ckpt.pt").unlink()   # keep the output small: only the stable run is continued
        runs[name] = dict(T=T, D=D, k=k, rows=[r for r in read_metrics(branch) if r["step"] >= k])   # from k on
    for T in totals:   # the rest of the stable run, at constant lr
        stable_to(T)
    (stable / "ckpt.pt").unlink()
    runs = {"stable": dict(T=None, D=None, k=None, rows=read_metrics(stable)), **runs}
    for T in totals:
        t0 = time.time()
        run_train([*common, "--schedule", "cosine", "--max_steps", T, "--out_dir", runs_dir / f"cosine_T{T}"],
                  runs_dir / f"cosine_T{T}")
        print(f"  cosine_T{T}: Cosine(T={T}) ({time.time() - t0:.0f} s)", flush=True)
        (runs_dir / f"cosine_T{T}" / "ckpt.pt").unlink()
        runs[f"cosine_T{T}"] = dict(T=T, D=None, k=None, rows=read_metrics(runs_dir / f"cosine_T{T}"))
    return runs


def write_csv(runs, path):
    keys = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *keys])
        for name, run in runs.items():   # floats written with repr: they read back bitwise
            w.writerows([name, *(repr(r[k]) if k in r else "" for k in keys)] for r in run["rows"])


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (lr_ax, ax) = plt.subplots(1, 2, figsize=(13, 5))
    color = {T: f"C{i}" for i, T in enumerate(sorted({r["T"] for r in runs.values() if r["T"]}))}
    val = {n: [(r["tokens"], r["val_loss"]) for r in run["rows"] if "val_loss" in r] for n, run in runs.items()}
    for name, run in runs.items():
        T, D, k, rows = run["T"], run["D"], run["k"], run["rows"]
        style = (dict(color="k", lw=2, label="WSD stable stage (constant lr)") if T is None else
                 dict(color=color[T], ls=":", label=f"Cosine(T={T})") if k is None else
                 dict(color=color[T], ls="-" if D >= 0.05 * T else "--", label=f"WSD, decay {D} of {T} steps"))
        lr_ax.plot([r["tokens"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], **style)
        points = val[name]
        if k is not None:   # start a branch's curve at the stable run's last evaluation at or before k
            points = [p for p in val["stable"] if p[0] <= rows[0]["tokens"]][-1:] + points
            ax.axvline(rows[0]["tokens"], color=style["color"], lw=0.5, alpha=0.5)   # the branch point
        ax.plot(*zip(*points), marker="." if k is not None else None, **style)
    stable = val["stable"]   # zoom on where the runs differ: below the stable loss at a fifth of the run
    ax.set_ylim(min(v for pts in val.values() for _, v in pts) - 0.05, stable[max(1, len(stable) // 5)][1])
    ax.set(xlabel="tokens", ylabel="validation loss (nats/token)",
           title="WSD decays branched from one stable run vs Cosine(T) (cf. Figure 5)")
    lr_ax.set(xlabel="tokens", ylabel="learning rate", title="schedules (thin lines on the right: branch points)")
    lr_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(runs):
    """Markdown table: final val loss at each total for the stable run (no decay), each decay, Cosine(T)."""
    def final(rows, step=None):
        vals = [r["val_loss"] for r in rows if "val_loss" in r and step in (None, r["step"])]
        return f"{vals[-1]:.4f}" if vals else "n/a"
    totals = sorted(r["T"] for r in runs.values() if r["T"] and r["k"] is None)
    fracs = sorted({round(r["D"] / r["T"], 4) for r in runs.values() if r["k"] is not None}, reverse=True)
    head = ["total steps", "tokens", "no decay (stable)", *(f"WSD, decay {100 * f:g}%" for f in fracs), "Cosine(T)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in totals:
        branches = sorted((r for r in runs.values() if r["T"] == T and r["k"] is not None), key=lambda r: -r["D"])
        cells = [T, f"{runs[f'cosine_T{T}']['rows'][-1]['tokens']:,}", final(runs["stable"]["rows"], T),
                 *(final(r["rows"]) for r in branches), final(runs[f"cosine_T{T}"]["rows"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup = QUICK if args.quick else FULL
    args.totals = args.totals or setup["totals"]
    import torch
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    runs_dir = out / "wsd_vs_cosine_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)   # branches are copies: start from a clean folder
    t0 = time.time()
    runs = run_all(args, setup, runs_dir)
    write_csv(runs, out / "wsd_vs_cosine.csv")
    plot(runs, out / "wsd_vs_cosine.png")
    print(f"\nfinal validation loss (nats/token), {time.time() - t0:.0f} s in all:\n{summary(runs)}")
    print(f"\nwrote {out / 'wsd_vs_cosine.png'}, {out / 'wsd_vs_cosine.csv'}, runs in {runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
