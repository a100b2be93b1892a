"""Smoke tests of the scripts in experiments/: each runs in --quick mode on a small corpus and its
outputs are checked for the claims the experiment rests on."""
import csv
import os
import subprocess
import sys

import pytest

import train
import wsd

STDLIB_FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py", "string.py",
                "bisect.py", "heapq.py", "fnmatch.py", "glob.py"]


def small_corpus(root):
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    root.mkdir()
    for name in STDLIB_FILES:
        (root / name.replace("/", "_")).write_text(open(os.path.join(stdlib, name), encoding="utf-8").read())
    return str(root)


def test_wsd_vs_cosine_quick(repo_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "experiments/wsd_vs_cosine.py", "--quick", "--out", str(out),
                           "--source", small_corpus(tmp_path / "corpus"), "--tokenizer", "byte",
                           "--data_dir", str(tmp_path / "data")],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert open(out / "wsd_vs_cosine.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "wsd_vs_cosine.csv")))
    runs = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    # quick: totals 80 and 160 steps, decays of 10% and 2.5% of each
    branches = {"wsd_T80_decay8": (80, 8), "wsd_T80_decay2": (80, 2), "wsd_T160_decay16": (160, 16),
                "wsd_T160_decay4": (160, 4)}
    assert set(runs) == {"stable", "cosine_T80", "cosine_T160", *branches}
    by_step = lambda name: {int(r["step"]): r for r in runs[name]}
    stable = by_step("stable")
    lr_max = train.TrainConfig.lr
    for name, (T, D) in branches.items():
        k, branch = T - D, by_step(name)
        assert min(branch) == k and max(branch) == T
        # the branch continued from the stable checkpoint at k: its row at k is the stable run's, and its
        # first step, taken at lr_max (the decay starts at 1), gives the stable run's loss bitwise
        assert branch[k]["val_loss"] and branch[k] == {**stable[k], "run": name}
        assert branch[k + 1]["train_loss"] == stable[k + 1]["train_loss"]
        # the lr of the last step (logged after it, at step T) is the decay's last: lr(T - 1), near 2%
        expected = wsd.wsd(T - 1, lr_max=lr_max, warmup=0, decay_start=k, decay_steps=D)
        assert float(branch[T]["lr"]) == expected == pytest.approx(lr_max * wsd.FINAL_LR_FRAC ** ((D - 1) / D))
        assert branch[T]["val_loss"]
    for T in (80, 160):
        cosine = by_step(f"cosine_T{T}")
        assert max(cosine) == T and float(cosine[T]["lr"]) == wsd.cosine(T - 1, lr_max=lr_max, warmup=0, T=T)
        assert cosine[T]["val_loss"] and cosine[0]["val_loss"] == stable[0]["val_loss"]   # same init, same val set
    assert stable[80]["val_loss"] and max(stable) == 160
    assert "| 160 |" in proc.stdout and "Cosine(T)" in proc.stdout   # the summary table
