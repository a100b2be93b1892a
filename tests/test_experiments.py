"""Smoke tests of the scripts in experiments/: each runs in --quick mode on a small corpus and its
outputs are checked for the claims the experiment rests on; the fitting code is checked on points
generated from the formula it fits. Then the flags every experiment shares, parsed, and bad input
refused before anything is deleted or written."""
import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import wsd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import batch_size  # noqa: E402
import common  # noqa: E402
import cosine_horizon  # noqa: E402
import long_context  # noqa: E402
import moe_upcycling  # noqa: E402
import mup_transfer  # noqa: E402
import scaling_law  # noqa: E402
import two_stage  # noqa: E402
import wsd_vs_cosine  # noqa: E402

STDLIB_FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py", "string.py",
                "bisect.py", "heapq.py", "fnmatch.py", "glob.py"]


def small_corpus(root):
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    root.mkdir()
    for name in STDLIB_FILES:
        (root / name.replace("/", "_")).write_text(open(os.path.join(stdlib, name), encoding="utf-8").read())
    return str(root)


def run_script(repo_root, tmp_path, script, *extra):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, f"experiments/{script}", "--quick", "--out", str(out),
                           "--source", small_corpus(tmp_path / "corpus"), "--data_dir", str(tmp_path / "data"), *extra],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout


def by_run(path):
    runs = {}
    for r in csv.DictReader(open(path)):
        runs.setdefault(r["run"], {})[int(r["step"])] = r
    return runs


# N by hand: per layer q, o (d x d each), k, v (d x kv_heads * head_dim each), the SwiGLU's three
# d x ffn matrices, two RMSNorm gains of d; then the final norm. d 64, 4 heads of 16, 2 KV heads, ffn 160:
# 2 x 4,096 + 2 x 2,048 + 3 x 10,240 + 128 = 43,136 per layer; x 2 + 64 = 86,336 (wsd_vs_cosine's cpu
# model). d 96, 6 heads of 16, 3 KV heads, ffn 256: 2 x 9,216 + 2 x 4,608 + 3 x 24,576 + 192 = 101,568;
# x 3 + 96 = 304,800.
@pytest.mark.parametrize("shape, N", [(dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160), 86_336),
                                      (dict(n_layer=3, n_embd=96, n_head=6, n_kv_head=3, ffn_dim=256), 304_800)])
def test_non_embedding_params_by_hand(shape, N):
    assert common.non_embedding_params(shape) == N
    assert common.non_embedding_params(shape, vocab_size=50_000) == N   # the embedding is not in N


def test_wsd_vs_cosine_quick(repo_root, tmp_path):
    out, stdout = run_script(repo_root, tmp_path, "wsd_vs_cosine.py")
    for png in ("wsd_vs_cosine.png", "wsd_anytime.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    header = next(csv.reader(open(out / "wsd_vs_cosine.csv")))
    assert header == ["run", "family", "shape", "lr_peak", "seed", "T", "D", "k",
                      "step", "tokens", "lr", "train_loss", "val_loss", "val_bpb"]
    runs = by_run(out / "wsd_vs_cosine.csv")
    grid = list(csv.DictReader(open(out / "wsd_vs_cosine_grid.csv")))
    setup, W = wsd_vs_cosine.SCALES["quick"], wsd_vs_cosine.SCALES["quick"]["warmup"]
    (T1, T2), lrs = setup["totals"], setup["lrs"]
    # the full grid with the first seed: every lr has a trunk, its 12 Figure-5 branches and 4 cosines
    for lr in lrs:
        trunk = runs[f"wsd_lr{lr:g}_s1337"]
        assert max(trunk) == T2 and trunk[T1]["val_loss"] and trunk[T2]["val_loss"]
        for T in (T1, T2):
            for frac in wsd_vs_cosine.DECAY_FRACS:
                for shape in wsd_vs_cosine.SHAPES:
                    D = max(1, round(frac * T))
                    assert f"wsd_lr{lr:g}_s1337_T{T}_{shape}{D}" in runs
            for fam in ("cos10", "cos0"):
                assert f"{fam}_lr{lr:g}_s1337_T{T}" in runs
    assert len([g for g in grid if g["seed"] == "1337" and g["family"] == "wsd" and g["lr_peak"] == str(lrs[0])]) == 12 + 4
    # the second seed only at one lr per family
    for fam in ("wsd", "cos10", "cos0"):
        assert len({g["lr_peak"] for g in grid if g["seed"] == "1338" and g["family"] == fam}) == 1
    for name, rows in runs.items():
        first = rows[min(rows)]
        lr_max, seed = float(first["lr_peak"]), int(first["seed"])
        if first["family"] == "wsd":
            T, D, k, shape = int(first["T"]), int(first["D"]), int(first["k"]), first["shape"]
            trunk = runs[f"wsd_lr{lr_max:g}_s{seed}"]
            # resumed from the trunk's checkpoint at k: the trunk evaluated there, and the branch's first
            # step (lr_max: the decay starts at 1) gives the trunk's training loss bitwise, when the trunk went on
            assert min(rows) == k + 1 and max(rows) == T and trunk[k]["val_loss"]
            if k + 1 in trunk:
                assert rows[k + 1]["train_loss"] == trunk[k + 1]["train_loss"] and rows[k + 1]["lr"] == trunk[k + 1]["lr"]
            for s, r in rows.items():   # the lr logged at step s is the one step s - 1 trained with
                assert float(r["lr"]) == wsd.wsd(s - 1, lr_max=lr_max, warmup=W, decay_start=k, decay_steps=D,
                                                  shape=shape, final_frac=wsd_vs_cosine.FINAL_FRAC)
            assert rows[T]["val_loss"]
        elif first["family"] == "cos10":
            T = int(first["T"])
            assert max(rows) == T and rows[T]["val_loss"]
            assert all(float(r["lr"]) == wsd.cosine(s - 1, lr_max=lr_max, warmup=W, T=T) for s, r in rows.items() if s)
        elif first["family"] == "cos0":
            T = int(first["T"])
            # Cosine(T) with floor 0 (--final_lr_frac 0), and by hand: 0.5 (1 + cos(pi s / T)) after warmup
            assert all(float(r["lr"]) == wsd.cosine(s - 1, lr_max=lr_max, warmup=W, T=T, floor=0.0) for s, r in rows.items() if s)
            s = T // 2 + 1
            assert float(rows[s]["lr"]) == pytest.approx(lr_max * 0.5 * (1 + math.cos(math.pi * (s - 1) / T)), rel=1e-12)
            assert float(rows[T]["lr"]) < 0.01 * lr_max
        if 0 in rows:   # same init (the seed), same validation windows: the same loss at step 0
            assert rows[0]["val_loss"] == runs[f"wsd_lr{lrs[0]:g}_s{seed}"][0]["val_loss"]
    assert "best lr: WSD" in stdout and "| WSD exp 10% (lr" in stdout and "any-time envelope, seed 1338" in stdout


def test_cosine_horizon_quick(repo_root, tmp_path):
    # Figure 4: every arm trains exactly S steps; T < S loops (CosineLoop), T > S stops mid-decay
    out, stdout = run_script(repo_root, tmp_path, "cosine_horizon.py")
    assert open(out / "cosine_horizon.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    setup = cosine_horizon.SCALES["quick"]
    S, W = setup["S"], setup["warmup"]
    grid = list(csv.DictReader(open(out / "cosine_horizon_grid.csv")))
    arms = sorted((round(f * S), kind) for f, kind in setup["arms"])   # (T, kind): loop 20, flat 20, 40, 80
    # the whole lr grid for the first seed; one lr per arm (its best) for the second
    assert sorted((int(g["T"]), g["kind"], float(g["lr_peak"])) for g in grid if g["seed"] == "1337") == \
        sorted((T, kind, lr) for T, kind in arms for lr in setup["lrs"])
    assert sorted((int(g["T"]), g["kind"]) for g in grid if g["seed"] == "1338") == arms
    runs = by_run(out / "cosine_horizon.csv")
    for g in grid:
        rows, T, lr_max, loops = runs[g["run"]], int(g["T"]), float(g["lr_peak"]), g["kind"] == "loop"
        assert max(rows) == S and rows[S]["val_loss"] and int(g["tokens"]) == S * setup["batch"] * setup["seq"]
        assert g["schedule"] == ("cosine_loop" if loops else "cosine")
        # the lr of step s - 1, against the cosine by hand: floor 0.1 + 0.45 (1 + cos(pi s / T)) of the peak,
        # after the warmup; past T the loop keeps following the cosine, the others stay at the floor
        for s, r in rows.items():
            if s > W:
                x = s - 1 if loops else min(s - 1, T)
                assert float(r["lr"]) == pytest.approx(lr_max * (0.1 + 0.45 * (1 + math.cos(math.pi * x / T))), rel=1e-9)
    # CosineLoop(T = S/2): at its floor (10%) at step T, back near the peak at the end of the budget
    loop, lr_max = runs[f"loopT20_lr{setup['lrs'][0]:g}_s1337"], setup["lrs"][0]
    assert float(loop[21]["lr"]) == pytest.approx(0.1 * lr_max) and float(loop[S]["lr"]) > 0.9 * lr_max
    assert float(runs[f"flatT20_lr{setup['lrs'][0]:g}_s1337"][S]["lr"]) == pytest.approx(0.1 * lr_max)
    assert "| Cosine(T = 40) = 1 S |" in stdout and "| CosineLoop(T = 20) = 0.5 S |" in stdout


def test_envelope_fit_recovers_a_power_law():
    C = np.geomspace(1e9, 2e11, 7)
    L = 0.9 * (C / C[0]) ** -0.42 + 1.3   # Appendix B.2's form, known parameters
    fit = wsd_vs_cosine.fit_envelope(list(zip(C, L)))
    assert fit["alpha"] == pytest.approx(0.42, rel=1e-5) and fit["L0"] == pytest.approx(1.3, rel=1e-5)
    assert fit["beta"] == pytest.approx(0.9, rel=1e-5)


TRUE = dict(C_N=30.0, alpha=0.35, C_D=80.0, beta=0.3, L0=1.2)


def synthetic_points(noise=0.0, seed=0):
    N = np.repeat([25e3, 86e3, 139e3, 203e3], 4)
    D = N * np.tile([10, 20, 40, 60], 4)
    L = TRUE["C_N"] * N ** -TRUE["alpha"] + TRUE["C_D"] * D ** -TRUE["beta"] + TRUE["L0"]   # Eq. 2 by hand
    return N, D, L + np.random.default_rng(seed).normal(0, noise, L.shape)


def test_scaling_law_fit_recovers_known_parameters():
    fit = scaling_law.fit_scaling_law(*synthetic_points())
    for k, v in TRUE.items():
        assert fit[k] == pytest.approx(v, rel=1e-4), k
    # with noise of 0.003 bits/byte the exponents stay close, and the bootstrap band is a real band
    N, D, L = synthetic_points(noise=0.003)
    noisy = scaling_law.fit_scaling_law(N, D, L)
    assert abs(noisy["alpha"] - 0.35) < 0.05 and abs(noisy["beta"] - 0.3) < 0.05
    band, n_ok = scaling_law.bootstrap(N, D, L, noisy, C=1e13, n=40)
    assert n_ok >= 30 and band["alpha"][0] < noisy["alpha"] < band["alpha"][1]


def test_compute_optimal_matches_brute_force():
    # Eq. 3 against minimising Eq. 2 along a line of constant compute C = 6 N D on a fine grid
    for C in (1e12, 1e15, 1e18):
        opt = scaling_law.compute_optimal(TRUE, C)
        n = np.geomspace(1e1, 1e12, 400001)
        L = TRUE["C_N"] * n ** -TRUE["alpha"] + TRUE["C_D"] * (C / 6 / n) ** -TRUE["beta"] + TRUE["L0"]
        n_best = n[L.argmin()]
        assert opt["N_opt"] == pytest.approx(n_best, rel=1e-3)
        assert opt["D_over_N"] == pytest.approx(C / 6 / n_best / n_best, rel=2e-3)
        assert opt["eta"] == pytest.approx((0.3 - 0.35) / 0.65)
        assert opt["N_opt"] / opt["D_opt"] == pytest.approx(opt["K2"] * (C / 6) ** opt["eta"])


def test_scaling_law_from_run_folders(repo_root, tmp_path):
    # --from: folders shaped like train.py's (metrics.jsonl, ckpt.pt with the model_config); their
    # losses come from Eq. 2, so the fit must give back the exponents
    shapes = [dict(n_layer=1, n_embd=48, n_head=4, n_kv_head=2, ffn_dim=128),
              dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=160),
              dict(n_layer=2, n_embd=96, n_head=4, n_kv_head=2, ffn_dim=256)]
    folders = []
    for i, shape in enumerate(shapes):
        N = common.non_embedding_params(shape)
        for m in (10, 20, 40, 60):
            D = m * N
            L = TRUE["C_N"] * N ** -TRUE["alpha"] + TRUE["C_D"] * D ** -TRUE["beta"] + TRUE["L0"]
            folder = tmp_path / f"run{i}_{m}"
            folder.mkdir()
            (folder / "metrics.jsonl").write_text(json.dumps(dict(step=1, tokens=D // 2, lr=0.01, train_loss=9.0)) + "\n"
                                                  + json.dumps(dict(step=2, tokens=D, val_loss=L * math.log(2), val_bpb=L)) + "\n")
            # a checkpoint of train.py's format (no weights needed: N comes from the config)
            torch.save(dict(model={}, model_config=dict(shape, vocab_size=257, block_size=128), step=2), folder / "ckpt.pt")
            folders.append(str(folder))
    proc = subprocess.run([sys.executable, "experiments/scaling_law.py", "--out", str(tmp_path / "out"), "--from", *folders],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alpha = 0.350" in proc.stdout and "beta = 0.300" in proc.stdout
    bad = subprocess.run([sys.executable, "experiments/scaling_law.py", "--from", str(tmp_path)],
                         cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--from" in bad.stderr


def test_scaling_law_quick(repo_root, tmp_path):
    out, stdout = run_script(repo_root, tmp_path, "scaling_law.py")
    assert open(out / "scaling_law.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    points = list(csv.DictReader(open(out / "scaling_law.csv")))
    assert list(points[0]) == ["run", "N", "D", "D_over_N", "val_loss", "bpb", "stable_bpb"]
    setup = scaling_law.SCALES["quick"]
    Ns = sorted({int(p["N"]) for p in points})
    assert len(Ns) == 3 and Ns[-1] >= 4 * Ns[0] and len(points) == 3 * len(setup["multiples"])
    tps = setup["batch"] * setup["seq"]
    # the decays lower the loss below the stable run's at their branch points, on average (at --quick
    # sizes a decay of a few steps is within the evaluation noise of one point)
    assert sum(float(p["bpb"]) - float(p["stable_bpb"]) for p in points) < 0
    for p in points:
        N, D = int(p["N"]), int(p["D"])
        assert D % tps == 0 and min(abs(D / N - m) for m in setup["multiples"]) <= tps / N   # D = m N, whole steps
        rows = [json.loads(line) for line in open(out / "scaling_law_runs" / p["run"] / "metrics.jsonl")]
        T = rows[-1]["step"]
        k = T - max(1, round(scaling_law.DECAY_FRAC * T))
        assert float(rows[-1]["val_bpb"]) == float(p["bpb"])
        assert rows[-1]["lr"] == wsd.wsd(T - 1, lr_max=setup["lr"], warmup=setup["warmup"], decay_start=k,
                                         decay_steps=T - k, final_frac=scaling_law.FINAL_FRAC)
    assert "alpha =" in stdout and "compute-optimal D/N" in stdout


class CreatesMarker:
    """A pickle payload: unpickled in full (torch.load weights_only=False), it creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))   # unpickling calls open(path, "w"): code run by loading


def test_scaling_law_from_never_unpickles_code(repo_root, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps(dict(step=2, tokens=100, val_loss=2.0, val_bpb=2.9)) + "\n")
    marker = tmp_path / "pwned"
    torch.save(dict(model={}, model_config=CreatesMarker(str(marker)), step=2), folder / "ckpt.pt")
    # the control: a full unpickle does run the payload, so the file below is a live one
    torch.load(folder / "ckpt.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    proc = subprocess.run([sys.executable, "experiments/scaling_law.py", "--out", str(tmp_path / "out"),
                           "--from", str(folder)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--from" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_two_stage_quick(repo_root, tmp_path):
    # §5 / Table 1: arms branched from one trunk per seed, each decay and SFT scored
    out, stdout = run_script(repo_root, tmp_path, "two_stage.py")
    check_two_stage(out, stdout)


def check_two_stage(out, stdout):
    assert open(out / "two_stage.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    setup, runs_dir = two_stage.SCALES["quick"], out / "runs" / "two_stage"
    S, D, (w,) = setup["S"], setup["decay"], setup["weights"]
    rows = {r["run"]: r for r in csv.DictReader(open(out / "two_stage.csv"))}
    # per seed: 2 decays (A-1, A-2 at w), then per SFT lr A-1 (S), A-2 (S) and B-2 (2S, from A-1's decay)
    want = {(seed, arm, stage, wt, n, lr) for seed in (1337, 1338) for arm, stage, wt, n, lr in
            [("A-1", "decay", 0.0, 0, ""), ("A-2", "decay", w, 0, "")] + [
            (arm, "sft", wt, n, lr) for lr in setup["sft_lrs"] for arm, wt, n in (("A-1", 0.0, S), ("A-2", w, S), ("B-2", 0.0, 2 * S))]}
    got = [(int(r["seed"]), r["arm"], r["stage"], float(r["w"]), int(r["sft_steps"]), r["sft_lr"]) for r in rows.values()]
    assert sorted(got) == sorted(want)
    metrics = lambda run: [json.loads(line) for line in open(runs_dir / run / "metrics.jsonl")]
    for seed in (1337, 1338):
        trunk = metrics(f"trunk_s{seed}")
        assert max(r["step"] for r in trunk) == setup["trunk"]
        for decay in (f"decay_pt_s{seed}", f"decay_mix{w:g}_s{seed}"):
            m = metrics(decay)
            # branched from the trunk's end: the same weights and windows give its last validation loss
            assert m[0]["step"] == 0 and m[0]["val_loss"] == trunk[-1]["val_loss"]
            # the decay's lr by hand: exponential from 0.01 down to 2% of it (wsd's FINAL_LR_FRAC) at step D
            lrs = [r["lr"] for r in m if "lr" in r]
            assert m[-1]["step"] == D and lrs[-1] > 0.01 * 0.02 and lrs[-1] < 0.01
            # eval.py's bits/byte (the CSV) equals train.py's on the same windows: two code paths, one number
            assert float(rows[decay]["bpb text"]) == pytest.approx(m[-1]["val_bpb"], rel=1e-4)
        # only the A-2 decay saw the instruction set: its validation is split per component
        assert "val_bpb/instruct" in metrics(f"decay_mix{w:g}_s{seed}")[0] and "val_bpb/instruct" not in metrics(f"decay_pt_s{seed}")[0]
        # SFT peak lr: 'final' is the decay's last lr, 0.01 x 0.02 = 2e-4 by hand (§6.3); else the given one
        for lr, peak in (("final", 2e-4), ("0.003", 0.003)):
            m = metrics(f"sft_pt_{S}_lr{lr}_s{seed}")
            assert [r["lr"] for r in m if "lr" in r][0] == pytest.approx(peak, rel=1e-9)
            assert max(r["step"] for r in metrics(f"sft_pt_{2 * S}_lr{lr}_s{seed}")) == 2 * S   # B-2: 2S steps
            # the SFT starts from its decay: the replies' bits/byte at its step 0 are the decay's, scored by eval.py
            assert m[0]["val_bpb"] == pytest.approx(float(rows[f"decay_pt_s{seed}"]["bpb replies"]), rel=1e-4)
    for r in rows.values():
        assert all(0 <= float(r[f"exact {f}"]) <= 1 for f in two_stage.FAMILIES)
    # two claims per SFT lr, on two measures: exact match (skill) and the replies' bits/byte
    assert stdout.count("decay-stage mixing beats") == 4 and stdout.count("] doubling SFT does not close") == 4
    assert stdout.count("[bpb replies, SFT lr") == 4 and "cost to the pre-training text" in stdout and "paper (Table 1)" in stdout
    # the verdicts never read a tie at 0% or 100% as a result; bits/byte never ties at a floor, so always decides
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert all("reproduced" in line or "cannot tell: every arm at" in line for line in lines)
    assert not any("cannot tell" in line for line in lines if line.startswith("[bpb"))


def test_two_stage_verdicts_by_hand():
    # two seeds, one w, one lr; skill: A-2 above A-1 in both seeds, B-2 above A-2 in seed 2 only;
    # replies' bits/byte: lower is better, A-2 below A-1 and B-2 in both seeds
    def row(arm, w, steps, seed, skill, bpb):
        return dict(arm=arm, stage="sft", w=w, sft_steps=steps, sft_lr="final", seed=seed, **{"exact skill": skill,
                    "bpb replies": bpb})
    rows = [row("A-1", 0.0, 10, 1, 0.10, 2.0), row("A-1", 0.0, 10, 2, 0.20, 2.1),
            row("A-2", 0.5, 10, 1, 0.30, 1.5), row("A-2", 0.5, 10, 2, 0.40, 1.6),
            row("B-2", 0.0, 20, 1, 0.25, 1.8), row("B-2", 0.0, 20, 2, 0.45, 1.9)]
    skill = two_stage.verdicts(rows, [0.5], ["final"], 10)
    assert skill[0].split(";")[0].endswith(": reproduced") and skill[1].split(";")[0].endswith(": not reproduced")
    assert "A-1 0.150 (0.100..0.200)" in skill[0]
    bpb = two_stage.verdicts(rows, [0.5], ["final"], 10, "bpb replies")
    assert all(line.split(";")[0].endswith(": reproduced") for line in bpb)
    # every arm at the floor (<= 2%, 5 of 250 items): no verdict is read off noise
    floor = [dict(r, **{"exact skill": 0.004 * i}) for i, r in enumerate(rows)]
    assert all("cannot tell: every arm at or below 2%" in line for line in two_stage.verdicts(floor, [0.5], ["final"], 10))


# ----------------------------------------------------------------------------- the shared flags

# every experiment, the folder its runs go to under --out, and its default seed count (1: the designs
# that train one seed, so their default runs stay the published ones)
EXPERIMENTS = [(wsd_vs_cosine, "wsd_vs_cosine_runs", 2), (scaling_law, "scaling_law_runs", 1),
               (mup_transfer, "mup_transfer_runs", 2), (batch_size, "batch_size_runs", 3),
               (moe_upcycling, "runs/moe_upcycling", 2), (long_context, "runs/long_context", 2),
               (cosine_horizon, "cosine_horizon_runs", 2), (two_stage, "runs/two_stage", 2)]
DATA_SCRIPTS = [e for e in EXPERIMENTS if e[0] is not long_context]   # long_context makes its own corpus


@pytest.mark.parametrize("module, runs, n_seeds", EXPERIMENTS, ids=lambda e: getattr(e, "__name__", None))
def test_every_experiment_parses_the_shared_flags_alike(module, runs, n_seeds, tmp_path):
    args = module.parse_args(["--quick", "--scale", "gpu", "--out", str(tmp_path), "--seed", "7", "--seeds", "3",
                              "--workers", "5"])
    assert (args.quick, args.scale, args.out, args.seed, args.seeds, args.workers) == (True, "gpu", str(tmp_path), 7, 3, 5)
    assert common.seed_list(args) == [7, 8, 9] and common.workers(args) == 5
    default = module.parse_args([])
    assert (default.quick, default.scale, default.seed, default.seeds, default.workers) == (False, "cpu", 1337, n_seeds, 0)
    assert pathlib.Path(default.out) == pathlib.Path(__file__).resolve().parents[1] / "experiments" / "out"
    # --workers 0: one process per CPU core, but one at --scale gpu (the runs take the GPU in turn)
    assert common.workers(default) == os.cpu_count()
    assert common.workers(module.parse_args(["--scale", "gpu"])) == 1
    assert common.workers(module.parse_args(["--scale", "gpu", "--quick"])) == os.cpu_count()
    if module is two_stage:   # its tokenizer is its scale's: bpe:4096, bytes for --quick (exact match needs tokens)
        assert (default.source, default.tokenizer) == ("stdlib", None)
        assert [s["tokenizer"] for s in two_stage.SCALES.values()] == ["bpe:4096", "bpe:4096", "byte"]
    elif module is not long_context:
        assert (default.source, default.tokenizer) == ("stdlib", "byte")


def seeds_in(jobs):
    return sorted({int(argv[argv.index("--seed") + 1]) for job in jobs for argv, _ in job if "--seed" in argv})


def test_seeds_count_from_seed_in_the_runs_built(tmp_path):
    # --seed 7 --seeds 3: the trunks of 7, 8 and 9 (moe_upcycling, long_context build their jobs purely)
    args = moe_upcycling.parse_args(["--quick", "--seed", "7", "--seeds", "3"])
    trunks, conts, _, _ = moe_upcycling.plan(args, moe_upcycling.SCALES["quick"], tmp_path, 0.7)
    assert seeds_in(trunks) == [7, 8, 9] and len(trunks) == 3
    args = long_context.parse_args(["--quick", "--seed", "7", "--seeds", "3"])
    trunks, cts, arms = long_context.plan(args, long_context.SCALES["quick"], tmp_path, "s.jsonl", "l.jsonl")
    assert seeds_in(trunks) == seeds_in(cts) == [7, 8, 9] and {s for _, s in arms} == {7, 8, 9}


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds 0"), (["--seeds", "1337,1338"], "not a count"),
                                           (["--workers", "-1"], "--workers -1"), (["--scale", "tpu"], "--scale")])
@pytest.mark.parametrize("module", [e[0] for e in EXPERIMENTS], ids=lambda m: m.__name__)
def test_bad_shared_flags_are_one_line(module, argv, message, capsys):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(module.__name__ + ".py: ")


# ----------------------------------------------------------------------------- refused before any delete

def snapshot(folder):
    """{relative path: bytes} of every file under folder, and its folders: to compare byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def old_runs(out, runs):
    """An --out holding a previous call's runs (a file in a run folder), as a user's would."""
    run = out / runs / "old_run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2.5}\n')
    return snapshot(out)


@pytest.mark.parametrize("module, runs, _", DATA_SCRIPTS, ids=lambda e: getattr(e, "__name__", None))
@pytest.mark.parametrize("flag, value", [("--source", "/nonexistent/corpus"), ("--tokenizer", "bpe:12"),
                                         ("--data_dir", "FILE")])
def test_bad_data_flags_delete_nothing(module, runs, _, flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    before = old_runs(out, runs)
    (tmp_path / "file").write_text("not a folder")
    value = str(tmp_path / "file") if value == "FILE" else value
    assert module.main(["--quick", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(module.__name__ + ".py: ")
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["file", "out"]


@pytest.mark.parametrize("module, runs, _", EXPERIMENTS, ids=lambda e: getattr(e, "__name__", None))
@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_bad_out_is_one_line_and_writes_nothing(module, runs, _, where, tmp_path, capsys):
    if where == "/proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")   # Linux's: a folder nobody can make anything in
    (tmp_path / "file").write_text("not a folder")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out", "/proc": pathlib.Path("/proc")}[where]
    before = snapshot(tmp_path)
    assert module.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, message", [(["--weights", "0.3,x"], "--weights"), (["--weights", "1.5"], "--weights"),
                                           (["--sft_lrs", "final,-1"], "--sft_lrs"), (["--sft_steps", "0"], "--sft_steps")])
def test_two_stage_bad_arms_are_one_line_and_delete_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    before = old_runs(out, "runs/two_stage")
    assert two_stage.main(["--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("two_stage.py: ")
    assert snapshot(out) == before
