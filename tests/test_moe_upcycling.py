"""Tests of sparse upcycling through train.py (--upcycle_from) and of experiments/moe_upcycling.py.
A 2-layer model on a small corpus (a few standard-library modules), byte tokenizer."""
import csv
import os
import sys

import pytest

import checkpoint
import train
from conftest import SMALL_MODEL, metrics


def data_flags(corpus):
    return ["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"]]


def test_upcycled_run_starts_at_the_dense_checkpoints_validation_loss(corpus, tmp_path):
    common = [*data_flags(corpus), *SMALL_MODEL, "--eval_tokens", "256"]
    assert train.main([*common, "--out_dir", str(tmp_path / "dense"), "--max_steps", "4",
                       "--schedule", "constant", "--warmup_steps", "1", "--eval_interval", "4"]) == 0
    assert train.main([*common, "--out_dir", str(tmp_path / "moe"), "--upcycle_from", str(tmp_path / "dense"),
                       "--n_experts", "4", "--top_k", "2", "--max_steps", "1", "--eval_interval", "1"]) == 0
    dense_vals = [r["val_loss"] for r in metrics(tmp_path / "dense") if "val_loss" in r]
    moe_rows = metrics(tmp_path / "moe")
    assert len(dense_vals) == 2 and dense_vals[1] < dense_vals[0] - 0.05     # the dense run did learn
    assert moe_rows[0]["step"] == 0 and moe_rows[0]["tokens"] == 0
    # the MoE at its step 0 computes the dense model's function: the same validation loss
    assert moe_rows[0]["val_loss"] == pytest.approx(dense_vals[-1], abs=1e-5)
    ckpt = checkpoint.load(str(tmp_path / "moe"))
    assert ckpt["model_config"]["n_experts"] == 4 and ckpt["model_config"]["top_k"] == 2 and ckpt["step"] == 1
    assert "model.layers.0.mlp.experts.3.w1.weight" in ckpt["model"]


@pytest.mark.parametrize("fresh", [False, True])
def test_upcycle_from_carries_the_dense_adam_state_unless_told_not_to(corpus, tmp_path, fresh):
    """The dense run takes 4 steps; the upcycled run 1 more. Carried over, every expert (and the
    rest of the model) has Adam step 4 + 1 = 5 and only the 2 routers step 1; with
    --upcycle_fresh_adam every parameter has step 1."""
    common = [*data_flags(corpus), *SMALL_MODEL, "--eval_interval", "0"]
    assert train.main([*common, "--out_dir", str(tmp_path / "dense"), "--max_steps", "4",
                       "--schedule", "constant", "--warmup_steps", "1"]) == 0
    assert train.main([*common, "--out_dir", str(tmp_path / "moe"), "--upcycle_from", str(tmp_path / "dense"),
                       "--n_experts", "4", "--top_k", "2", "--max_steps", "1", "--warmup_steps", "0",
                       "--upcycle_fresh_adam", str(fresh).lower()]) == 0
    ckpt = checkpoint.load(str(tmp_path / "moe"))
    steps = sorted(float(s["step"]) for s in ckpt["optimizer"]["state"].values())
    n_params = len([k for k in ckpt["model"] if k != "lm_head.weight"])       # tied to the embedding
    assert len(steps) == n_params
    assert steps == ([1.0] * n_params if fresh else [1.0] * 2 + [5.0] * (n_params - 2))


# FLOPs per token of the quick model, by hand: d 32, 2 layers, 2 heads of 16, 1 KV head, ffn 80,
# vocabulary 257 (256 bytes + end of text), sequences of 32. Per layer q, o 32x32, k, v 32x16 = 3,072,
# MLP 3 x 32 x 80 = 7,680; head 257 x 32 = 8,224; attention 12 x 2 x 32 x 32 = 24,576.
QUICK_DENSE_FLOPS = 6 * (2 * (3072 + 7680) + 8224) + 24576                      # 202,944
QUICK_MOE_FLOPS = QUICK_DENSE_FLOPS + 6 * 2 * (7680 + 4 * 32)                   # + a 2nd expert, router


def test_quick_experiment_writes_png_and_csv_with_every_arm(corpus, tmp_path, repo_root):
    sys.path.insert(0, os.path.join(repo_root, "experiments"))
    import moe_upcycling
    out = tmp_path / "out"
    assert moe_upcycling.main(["--quick", *data_flags(corpus), "--out", str(out),
                               "--trunk_steps", "10", "--cont_steps", "6"]) == 0
    assert open(out / "moe_upcycling.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "moe_upcycling.csv")))
    assert set(rows[0]) == {"run", "seed", "step", "tokens", "flops", "lr", "val_loss", "val_bpb", "aux_loss"}
    runs = {(r["run"], int(r["seed"])) for r in rows}
    assert runs == {(name, seed) for name in ("trunk", "dense", "upcycled", "upcycled_eqflops")
                    for seed in (1337, 1338)} | {("upcycled_fresh_adam", s) for s in (1337, 1338)}
    by = lambda name, seed=1337: [r for r in rows if r["run"] == name and int(r["seed"]) == seed]
    for seed in (1337, 1338):
        trunk, dense, moe = by("trunk", seed), by("dense", seed), by("upcycled", seed)
        assert [int(r["step"]) for r in trunk] == [0, 6, 10]
        # 10 trunk steps of 4 x 32 tokens, then 6 more: the dense run resumed, the MoE a new run
        assert int(dense[-1]["step"]) == int(moe[-1]["step"]) == 16
        assert int(dense[-1]["tokens"]) == int(moe[-1]["tokens"]) == 16 * 128
        # the MoE starts at the trunk's function
        assert int(moe[0]["step"]) == 10
        assert float(moe[0]["val_loss"]) == pytest.approx(float(trunk[-1]["val_loss"]), abs=1e-5)
        # FLOPs: the hand counts above, the MoE's after the branch only
        assert int(dense[-1]["flops"]) == 16 * 128 * QUICK_DENSE_FLOPS
        assert int(moe[-1]["flops"]) == 10 * 128 * QUICK_DENSE_FLOPS + 6 * 128 * QUICK_MOE_FLOPS
        # the equal-FLOPs MoE: decay 2 steps (10% of 16), ending where its FLOPs reach the dense run's
        # 16 x 128 x 202,944: after 10 + 4 steps (4 x 128 x 296,640 = 6 x 128 x 202,944 x 0.97)
        eq = by("upcycled_eqflops", seed)
        assert int(eq[-1]["step"]) == 14
        # each run's last step is halfway through the same exponential decay to 2%: 0.01 x 0.02^0.5
        for run in (dense, moe, eq):
            assert float(run[-1]["lr"]) == pytest.approx(0.01 * 0.02 ** 0.5)
    # ... and the arms part: the experts and the router trained differently from the dense MLP
    assert abs(float(by("upcycled")[-1]["val_loss"]) - float(by("dense")[-1]["val_loss"])) > 1e-4
