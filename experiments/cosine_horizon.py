"""Cosine's horizon: at a fixed token budget S, Cosine(T = S) against T < S and T > S, each at its own
best learning rate: the paper's Figure 4 (MiniCPM, Hu et al. 2024, arXiv 2404.06395, §4.2), which
motivates WSD: a cosine is best only when its period T is the run's length, known in advance.

For a budget of S steps (the same model, data, warmup and seed in every arm):
  - T = S: Cosine(T) reaches its floor (10% of the peak, Appendix B.1) exactly at the end;
  - T < S, looping: CosineLoop(T) (`--schedule cosine_loop --cosine_period T`): the lr reaches its
    floor early, at T, then rises again along the same cosine (peak at 2T, floor at 3T): T = S/2
    ends back at the peak (the paper's picture), T = S/3 ends at the floor after one restart;
  - T < S, flat: Cosine(T) (`--schedule cosine --cosine_period T`): at its floor from T to S;
  - T > S: Cosine(T) stopped at S, before its decay ends (T = 2S: half-way down).
Each arm is trained at every peak lr of a small grid (first seed), then again at its own best lr
with each further seed of --seeds. The paper's claim: at every S the lowest loss is T = S's.

    python experiments/cosine_horizon.py                  # cpu scale, 11-13 min on 2 cores (measured)
    python experiments/cosine_horizon.py --quick          # a 1-layer model, under a minute (the smoke test)
    python experiments/cosine_horizon.py --scale gpu --device cuda --workers 4   # 2.75M non-embedding, 1 GPU

Writes to --out (default experiments/out): cosine_horizon.png (schedules, loss curves, lr sweep,
each arm against T = S), cosine_horizon.csv (every logged row of every run), cosine_horizon_grid.csv
(each run's final loss) and cosine_horizon_runs/<run>/.
"""
import csv
import shutil
import sys
import time

import common
from common import RunFailed, eval_flags, fail, pyplot, read_metrics, run_parallel
import data  # noqa: E402  (after common, which puts the repo root on the path)

# The model and batch of wsd_vs_cosine.py (86,336 non-embedding parameters, 2,048 tokens a step) so
# the two figures can be read together; S = 880 steps is its longer horizon, 20.9 tokens per parameter.
# Arms (T / S, kind): kind "loop" is CosineLoop(T), "flat" Cosine(T) held at its floor after T,
# "cosine" Cosine(T) with T >= S. lrs: around 0.005, the best Cosine(T) peak there; a short T may want
# another, so each arm picks its own. 0.00125 because a first sweep of 0.0025-0.01 found 0.0025 best for
# CosineLoop(T = S/2) (it ends at its peak, where a lower peak is a lower final lr) and Cosine(T = 2S).
ARMS = ((1 / 3, "loop"), (0.5, "loop"), (0.5, "flat"), (1.0, "cosine"), (2.0, "cosine"))
REF = (1.0, "cosine")   # Cosine(T = S): the arm every other is compared with
SCALES = {
    "cpu": dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160), batch=16, seq=128,
                S=880, arms=ARMS, lrs=(0.00125, 0.0025, 0.005, 0.01), warmup=22, eval_interval=88,
                eval_tokens=65536, log_interval=4),
    "quick": dict(model=dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_dim=64), batch=4, seq=32,
                  S=40, arms=ARMS[1:], lrs=(0.005, 0.01), warmup=4, eval_interval=20, eval_tokens=1024,
                  log_interval=1),
    # one GPU (not measured here): wsd_vs_cosine's gpu model, 16K tokens a step, S = 20N = 3,360 steps
    "gpu": dict(model=dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, ffn_dim=640), batch=64, seq=256,
                S=3360, arms=ARMS, lrs=(0.00125, 0.0025, 0.005, 0.01), warmup=84, eval_interval=336,
                eval_tokens=131072, log_interval=8),
}


def parse_args(argv):
    p = common.parser(__doc__)
    # 2 seeds: the verdict must hold for each; the second reruns only each arm's best lr
    common.add_common_flags(p, seeds_help="; the first sweeps the lr grid, the others rerun each arm's best lr")
    common.add_data_flags(p)   # --source, --tokenizer, --data_dir
    p.add_argument("--device", default="cpu", help="passed to train.py")
    return common.parse(p, argv)


# ----------------------------------------------------------------------------- the runs

def arm(setup, a):
    """-> (name, T, train.py schedule flags, label) of arm a = (T / S, kind)."""
    frac, kind = a
    T = max(setup["warmup"], round(frac * setup["S"]))   # a cosine's period holds its warmup (wsd.cosine)
    # a T >= S run never passes T, so there plain cosine and cosine_loop are the same curve
    schedule = "cosine_loop" if kind == "loop" else "cosine"
    label = {"loop": f"CosineLoop(T = {T})", "flat": f"Cosine(T = {T}), flat after T"}.get(kind, f"Cosine(T = {T})")
    return f"{kind}T{T}", T, ["--schedule", schedule, "--cosine_period", T], label


def run_flags(args, setup, a, lr, seed, out_dir):
    m, (_, _, schedule, _) = setup["model"], arm(setup, a)
    # every arm shares model, data, seed (the same init and batches), warmup and eval set: a difference
    # in final loss is the schedule's
    return ["--n_layer", m["n_layer"], "--n_embd", m["n_embd"], "--n_head", m["n_head"], "--n_kv_head",
            m["n_kv_head"], "--ffn_dim", m["ffn_dim"], "--block_size", setup["seq"], "--batch_size", setup["batch"],
            "--seq_len", setup["seq"], "--source", args.source, "--tokenizer", args.tokenizer,
            "--data_dir", args.data_dir, "--device", args.device, "--lr", lr, "--seed", seed,
            "--warmup_steps", setup["warmup"], "--max_steps", setup["S"], *schedule,
            "--eval_interval", setup["eval_interval"], *eval_flags(setup["eval_tokens"]),
            "--log_interval", setup["log_interval"], "--ckpt_interval", 10**9, "--out_dir", out_dir]


def run_phase(args, setup, runs_dir, plan):
    """plan: [(arm, lr, seed)] -> {run name: info with 'rows'}, all run in parallel."""
    jobs, runs = [], {}
    for a, lr, seed in plan:
        name = f"{arm(setup, a)[0]}_lr{lr:g}_s{seed}"
        jobs.append([(run_flags(args, setup, a, lr, seed, runs_dir / name), runs_dir / name)])
        runs[name] = dict(arm=a, T=arm(setup, a)[1], lr=lr, seed=seed)
    run_parallel(jobs, workers=common.workers(args))   # all S steps long: any order
    for name, info in runs.items():
        info["rows"] = read_metrics(runs_dir / name)
        (runs_dir / name / "ckpt.pt").unlink(missing_ok=True)   # keep the output small
    return runs


def train_all(args, setup, runs_dir, seeds):
    """Phase 1: every arm at every lr, first seed; phase 2: each arm's best lr, every other seed."""
    t0 = time.time()
    try:
        runs = run_phase(args, setup, runs_dir, [(a, lr, seeds[0]) for a in setup["arms"] for lr in setup["lrs"]])
        best = {a: min(setup["lrs"], key=lambda lr: final(runs, a, lr, seeds[0])) for a in setup["arms"]}
        for a, lr in best.items():   # a best lr on the grid's edge may not be the best lr at all
            if len(setup["lrs"]) >= 3 and lr in (min(setup["lrs"]), max(setup["lrs"])):
                print(f"  warning: the best lr of {arm(setup, a)[3]} ({lr:g}) is on the edge of the grid", flush=True)
        if seeds[1:]:
            runs.update(run_phase(args, setup, runs_dir, [(a, best[a], s) for s in seeds[1:] for a in setup["arms"]]))
    except RunFailed as e:
        fail(str(e))
    return runs, best, time.time() - t0


# ----------------------------------------------------------------------------- results

def final(runs, a, lr, seed):
    """The final validation loss (nats/token; bytes here) of one arm, lr and seed."""
    run = next(r for r in runs.values() if (r["arm"], r["lr"], r["seed"]) == (a, lr, seed))
    return [r["val_loss"] for r in run["rows"] if "val_loss" in r][-1]


def write_csvs(runs, out, setup):
    keys = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb"]
    with open(out / "cosine_horizon.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "S", "T", "lr_peak", "seed", *keys])
        for name, run in runs.items():   # floats written with repr: they read back bitwise
            w.writerows([name, setup["S"], run["T"], run["lr"], run["seed"], *(repr(r[k]) if k in r else "" for k in keys)]
                        for r in run["rows"])
    with open(out / "cosine_horizon_grid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "S", "T", "T_over_S", "kind", "schedule", "lr_peak", "seed", "tokens", "val_loss", "val_bpb"])
        for name, run in runs.items():
            last = [r for r in run["rows"] if "val_loss" in r][-1]
            schedule = arm(setup, run["arm"])[2][1]
            w.writerow([name, setup["S"], run["T"], run["arm"][0], run["arm"][1], schedule, run["lr"], run["seed"], last["tokens"],
                        repr(last["val_loss"]), repr(last["val_bpb"])])


def verdict_table(runs, best, setup, seeds):
    """Markdown: each arm at its best lr, its final loss and its difference from T = S, per seed."""
    # same-seed differences: the same init and batches, so the seed's own luck cancels; never averaged
    lines = [f"| arm (S = {setup['S']} steps) | lr | loss, seeds {' / '.join(map(str, seeds))} | minus T = S |",
             "|---|---|---|---|"]
    for a in setup["arms"]:
        loss = [final(runs, a, best[a], s) for s in seeds]
        diff = [x - final(runs, REF, best[REF], s) for x, s in zip(loss, seeds)]
        lines.append(f"| {arm(setup, a)[3]} = {a[0]:.3g} S | {best[a]:g} | {' / '.join(f'{x:.4f}' for x in loss)} | "
                     f"{' / '.join(f'{d:+.4f}' for d in diff)} |")
    return "\n".join(lines)


def plot(runs, best, setup, seeds, path):
    plt = pyplot()
    fig, (lr_ax, ax, sw_ax, d_ax) = plt.subplots(1, 4, figsize=(24, 5.5))
    s1 = seeds[0]
    for i, a in enumerate(setup["arms"]):
        color, label = f"C{i}", f"{arm(setup, a)[3]}, lr {best[a]:g}"
        run = next(r for r in runs.values() if (r["arm"], r["lr"], r["seed"]) == (a, best[a], s1))
        lr_rows = [r for r in run["rows"] if "lr" in r]   # the step-0 evaluation has no lr
        lr_ax.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color=color, label=label)
        val = [(r["tokens"], r["val_loss"]) for r in run["rows"] if "val_loss" in r and r["step"] > 0]
        ax.plot(*zip(*val), "o-", ms=3, color=color, label=label)
        sw_ax.plot(setup["lrs"], [final(runs, a, lr, s1) for lr in setup["lrs"]], "o-", color=color, label=arm(setup, a)[3])
        for j, s in enumerate(seeds):   # each arm minus T = S, same seed: one marker per seed
            # loop and flat share T = S/2: set a little apart so neither hides the other
            d_ax.plot(a[0] * {"loop": 0.95, "flat": 1.05}.get(a[1], 1.0), final(runs, a, best[a], s) - final(runs, REF, best[REF], s), "osD^v"[j % 5], color=color,
                      label=f"{arm(setup, a)[3]}, seed {s}")
    lr_ax.set(xlabel="step", ylabel="learning rate", title=f"schedules at each arm's best lr (S = {setup['S']} steps)")
    ax.set(xlabel="tokens", ylabel="validation loss (nats/byte)", title=f"loss along the budget, seed {s1} (cf. Figure 4)")
    ends = [final(runs, a, best[a], s1) for a in setup["arms"]]
    ax.set_ylim(min(ends) - 0.05, max(ends) + 0.4)
    sw_ax.set_xscale("log")
    sw_ax.set(xlabel="peak lr", ylabel="final validation loss", title=f"lr sweep, seed {s1}")
    d_ax.axhline(0, color="k", lw=0.8)
    d_ax.set_xscale("log", base=2)
    d_ax.set(xlabel="T / S", ylabel="loss minus Cosine(T = S) (> 0: worse)", title="each arm at its best lr, every seed")
    for axis in (lr_ax, ax, sw_ax, d_ax):
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv):
    args = parse_args(argv)
    setup, seeds = SCALES["quick" if args.quick else args.scale], common.seed_list(args)
    n_params = common.non_embedding_params(setup["model"])
    tokens = setup["S"] * setup["batch"] * setup["seq"]
    out = common.check_out(args.out)   # bad flags stop here, before the old runs are deleted
    common.check_data(args)
    runs_dir = out / "cosine_horizon_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)   # every run gets a fresh folder
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {n_params:,} non-embedding parameters; budget S = {setup['S']} steps = {tokens:,} tokens = "
          f"{tokens / n_params:.1f} N; arms: " + ", ".join(arm(setup, a)[3] for a in setup["arms"]), flush=True)
    # prepared once here: in the pool's workers two runs would prepare the same folder at once
    data.prepare(args.source, args.tokenizer, args.data_dir, quiet=True)
    runs, best, wall = train_all(args, setup, runs_dir, seeds)
    write_csvs(runs, out, setup)
    plot(runs, best, setup, seeds, out / "cosine_horizon.png")
    print(f"\n{len(runs)} runs in {wall:.0f} s on {common.workers(args)} workers")
    print(f"\nfinal validation loss (nats/byte) at each arm's best lr:\n{verdict_table(runs, best, setup, seeds)}")
    sweep = [f"| {arm(setup, a)[3]} | " + " | ".join(f"{final(runs, a, lr, seeds[0]):.4f}" for lr in setup["lrs"])
             + " |" for a in setup["arms"]]
    print(f"\nlr sweep, seed {seeds[0]}:\n| arm | " + " | ".join(f"lr {lr:g}" for lr in setup["lrs"]) + " |\n|---|"
          + "---|" * len(setup["lrs"]) + "\n" + "\n".join(sweep))
    print(f"\nwrote {out / 'cosine_horizon.png'}, {out / 'cosine_horizon.csv'}, {out / 'cosine_horizon_grid.csv'}; "
          f"runs in {runs_dir}")
    return 0


def main(argv=None):
    return common.main("cosine_horizon.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
