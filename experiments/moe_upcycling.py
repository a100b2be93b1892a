"""Sparse upcycling at tiny scale: MiniCPM-MoE's recipe (MiniCPM, Hu et al. 2024, §7.3; SPEC §5).

MiniCPM-MoE was not trained from scratch: the dense 2.4B was "sparse-upcycled" (every expert a copy
of the dense MLP, the router N(0, 0.1); moe.upcycle) and training went on as an MoE. Here a dense
tiny model is trained through WSD's stable phase (warmup, then constant lr) to a checkpoint, and
that checkpoint is continued twice, under identical conditions:
  (a) dense:     train.py --init_from   stable   (the same dense model)
  (b) upcycled:  train.py --upcycle_from stable --n_experts 8 --top_k 2
Both are new runs from the same weights, with a fresh optimizer, the same schedule (a short
re-warmup, stable, and WSD's decay over the last 10%), the same seed and so the same batches in
the same order, and the same number of steps and tokens. Because upcycling preserves the dense
function, (b) starts at exactly the loss of (a); whether it then ends lower is the experiment.

Both continuations read on from where the stable run stopped in the data (train.py offsets the
data position of a run started from another's weights), and the validation set, keyed by the seed,
stays the same, which is what lets the curves join.

    python experiments/moe_upcycling.py            # tiny preset, 8 experts top-2, ~5-10 min on 2 idle cores
    python experiments/moe_upcycling.py --quick    # a 2-layer model, 4 experts: the smoke test
    python experiments/moe_upcycling.py --quick --source my.txt --tokenizer byte --data_dir /tmp/data

Writes to --out (default experiments/out): moe_upcycling.png (validation loss against tokens: the
stable dense phase, then both continuations), moe_upcycling.csv (run, step, tokens, val_loss,
val_bpb, aux_loss; tokens count from the start of the stable phase; aux_loss is empty where
train.py logs none) and runs/moe_upcycling/<run>/ (each run's checkpoint, metrics.jsonl, log).
"""
import argparse
import csv
import pathlib
import sys
import time

from common import ROOT, read_metrics, run_train

FULL = dict(stable=400, cont=400, experts=8, top_k=2, eval_interval=25, eval_batches=8, log_interval=5,
            model=["--preset", "tiny", "--batch_size", "8", "--seq_len", "128"])
QUICK = dict(stable=30, cont=20, experts=4, top_k=2, eval_interval=10, eval_batches=2, log_interval=1,
             model=["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--ffn_dim", "160",
                    "--block_size", "64", "--batch_size", "4", "--seq_len", "32"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2-layer model and few steps (the smoke test)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "out"), help="folder for the PNG, CSV and runs")
    p.add_argument("--stable_steps", type=int, help="steps of the dense stable phase (default 400; quick 30)")
    p.add_argument("--cont_steps", type=int, help="steps of each continuation (default 400; quick 20)")
    p.add_argument("--n_experts", type=int, help="experts of the upcycled model (default 8; quick 4)")
    p.add_argument("--top_k", type=int, help="experts per token (default 2)")
    p.add_argument("--source", default="stdlib", help="corpus, passed to train.py")
    p.add_argument("--tokenizer", default="bpe:4096", help="tokenizer, passed to train.py")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="prepared datasets, passed to train.py")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def run_all(args, setup, runs_dir):
    """-> {run name: metrics rows}: the stable phase, then the dense and the upcycled continuation."""
    S, C = setup["stable"], setup["cont"]
    common = [*setup["model"], "--source", args.source, "--tokenizer", args.tokenizer, "--data_dir", args.data_dir,
              "--seed", args.seed, "--eval_interval", setup["eval_interval"], "--eval_batches", setup["eval_batches"],
              "--log_interval", setup["log_interval"], "--ckpt_interval", 10**9]   # one checkpoint, at the end
    # WSD's stable phase: warmup, then the constant peak lr (no decay, as a checkpoint mid-pre-training)
    stable = runs_dir / "stable"
    run_train([*common, "--out_dir", stable, "--schedule", "constant", "--max_steps", S,
               "--warmup_steps", max(1, round(0.05 * S))], stable)
    # both continuations: the same WSD schedule (fresh AdamW, so a short re-warmup; decay over the last 10%)
    cont = [*common, "--schedule", "wsd", "--max_steps", C, "--warmup_steps", max(1, round(0.05 * C))]
    dense, moe = runs_dir / "dense", runs_dir / "upcycled"
    run_train([*cont, "--out_dir", dense, "--init_from", stable], dense)
    run_train([*cont, "--out_dir", moe, "--upcycle_from", stable, "--n_experts", setup["experts"],
               "--top_k", setup["top_k"]], moe)
    return {"stable": read_metrics(stable), "dense": read_metrics(dense), "upcycled": read_metrics(moe)}


def table(runs):
    """CSV rows of every validation point, tokens counted from the start of the stable phase."""
    offset = {"stable": 0, "dense": runs["stable"][-1]["tokens"], "upcycled": runs["stable"][-1]["tokens"]}
    return [dict(run=name, step=r["step"], tokens=offset[name] + r["tokens"], val_loss=r["val_loss"],
                 val_bpb=r["val_bpb"], aux_loss=r.get("aux_loss", ""))
            for name, rows in runs.items() for r in rows if "val_loss" in r]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "step", "tokens", "val_loss", "val_bpb", "aux_loss"])
        w.writeheader()
        w.writerows(rows)


def plot(rows, setup, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"stable": ("k", "dense, stable phase (constant lr)"), "dense": ("C0", "(a) dense continuation"),
              "upcycled": ("C3", f"(b) upcycled: {setup['experts']} experts, top-{setup['top_k']}")}
    for name, (color, label) in styles.items():
        pts = [(r["tokens"], r["val_loss"]) for r in rows if r["run"] == name]
        ax.plot(*zip(*pts), "o-", ms=3, color=color, label=label)
    branch = max(r["tokens"] for r in rows if r["run"] == "stable")
    ax.axvline(branch, color="gray", ls=":", lw=1)
    tail = [r["val_loss"] for r in rows if r["tokens"] >= branch]   # zoom on the continuations
    ax.set_ylim(min(tail) - 0.1 * (max(tail) - min(tail) + 0.05), max(tail) + 0.5 * (max(tail) - min(tail) + 0.05))
    ax.set(xlabel="tokens", ylabel="validation loss (nats/token)",
           title="Sparse upcycling (MiniCPM §7.3): continuing a dense checkpoint dense or as an MoE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    setup = dict(QUICK if args.quick else FULL)
    for key, value in (("stable", args.stable_steps), ("cont", args.cont_steps), ("experts", args.n_experts),
                       ("top_k", args.top_k)):
        if value is not None:
            setup[key] = value
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = run_all(args, setup, out / "runs" / "moe_upcycling")
    rows = table(runs)
    write_csv(rows, out / "moe_upcycling.csv")
    plot(rows, setup, out / "moe_upcycling.png")
    last = {name: [r for r in rows if r["run"] == name][-1] for name in runs}
    first_moe = next(r for r in rows if r["run"] == "upcycled")
    print(f"stable dense phase: {setup['stable']} steps, val loss {last['stable']['val_loss']:.4f}; "
          f"upcycled model at its step 0: {first_moe['val_loss']:.4f} (upcycling keeps the function)")
    for name in ("dense", "upcycled"):
        print(f"{name:9s} after {setup['cont']} more steps: val loss {last[name]['val_loss']:.4f} nats/token, "
              f"{last[name]['val_bpb']:.4f} bits/byte")
    diff = last["upcycled"]["val_loss"] - last["dense"]["val_loss"]
    print(f"upcycled - dense: {diff:+.4f} nats/token ({'upcycled' if diff < 0 else 'dense'} lower); "
          f"{time.time() - t0:.0f} s; wrote {out / 'moe_upcycling.png'} and {out / 'moe_upcycling.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
