"""train.py --noise_scale (noise.py): McCandlish et al. 2018's estimators against closed forms, and the
loop's small and big gradients against independently measured ones (one process, DDP)."""
import os
import subprocess
import sys

import pytest
import torch

import noise
import train
from conftest import SMALL_MODEL, metrics


def flags(corpus, out_dir, *extra):
    return ["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"],
            "--out_dir", str(out_dir), *SMALL_MODEL, "--eval_interval", "0", "--log_interval", "1",
            "--dtype", "float32", *map(str, extra)]


def test_estimates_solve_the_two_equations_by_hand():
    # E|G_B|^2 = |G|^2 + tr(Σ)/B with |G|^2 = 1, tr(Σ) = 4: B = 1 gives 5, B = 4 gives 1 + 1 = 2
    gnorm2, trsigma = noise.estimates(torch.tensor(5.0), torch.tensor(2.0), 1, 4)
    assert gnorm2.item() == pytest.approx(1.0) and trsigma.item() == pytest.approx(4.0)
    # one update of the bias-corrected EMA is that step's own estimate; B_simple = 4 / 1
    ema = noise.NoiseScale()
    ema.update(torch.tensor(5.0), torch.tensor(2.0), 1, 4)
    assert ema.row() == pytest.approx(dict(noise_gnorm2=1.0, noise_trsigma=4.0, noise_scale_tokens=4.0))
    # an overflowed fp16 step (inf norm) carries no weight: the average is unchanged
    ema.update(torch.tensor(float("inf")), torch.tensor(2.0), 1, 4)
    assert ema.row()["noise_scale_tokens"] == pytest.approx(4.0)


def test_estimates_of_a_linear_model_match_the_closed_form():
    # Least squares on a constant input: per-example loss 0.5 |w - x_i|^2, x_i ~ N(mu, s^2 I) in d dims,
    # so the per-example gradient is w - x_i: G = w - mu and Σ = s^2 I in closed form
    # (|G|^2 = d (w - mu)^2 = 8 x 0.25 = 2, tr(Σ) = d s^2 = 32, B_simple = 16 examples)
    torch.manual_seed(0)
    d, mu, s, steps, b_small, b_big = 8, 0.5, 2.0, 4000, 4, 16
    x = mu + s * torch.randn(steps, b_big, d, dtype=torch.float64)      # [steps, b_big, d]: each step's batch
    w = torch.zeros(steps, d, dtype=torch.float64, requires_grad=True)  # one copy of w per step: per-step grads
    def grad_sq(batch):   # squared norm of the batch-mean gradient, by autograd: [steps]
        (g,) = torch.autograd.grad((0.5 * ((w[:, None] - batch) ** 2).sum(-1).mean(1)).sum(), w)
        return (g ** 2).sum(-1)
    small, big = grad_sq(x[:, :b_small]), grad_sq(x)   # micro-batch 0's, and the accumulated one
    gnorm2, trsigma = noise.estimates(small, big, b_small, b_big)     # [steps] each
    for estimate, truth in ((gnorm2, d * mu ** 2), (trsigma, d * s ** 2)):
        # unbiased: the mean over steps lies within 4 standard errors of the truth
        assert abs(estimate.mean().item() - truth) < 4 * estimate.std().item() / steps ** 0.5
    # the EMAs, weighted d^(steps - 1 - k) over the steps: their standard errors follow from the weights
    ema = noise.NoiseScale(decay=0.995)
    for k in range(steps):
        ema.update(small[k], big[k], b_small, b_big)
    weights = 0.995 ** torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    shrink = (weights ** 2).sum().sqrt() / weights.sum()   # std of a weighted mean / std of one value
    row = ema.row()
    assert abs(row["noise_gnorm2"] - d * mu ** 2) < 4 * shrink * gnorm2.std()
    assert abs(row["noise_trsigma"] - d * s ** 2) < 4 * shrink * trsigma.std()
    assert row["noise_scale_tokens"] == pytest.approx(s ** 2 / mu ** 2, rel=0.3)   # 16, from the ratio


def implied_norms(row, b_small, b_big):
    """Back from a first-step row (the EMA is that step's estimate) to |G_small|^2 and |G_big|^2."""
    # E|G_B|^2 = |G|^2 + tr(Σ)/B, the model the estimators invert, applied forwards
    return [row["noise_gnorm2"] + row["noise_trsigma"] / b for b in (b_small, b_big)]


def test_the_loop_reads_micro_batch_0_and_the_accumulated_gradient(corpus, tmp_path):
    # the big gradient is the step's (train.py logs its norm as grad_norm); the small one is micro-batch 0's
    # alone, which a --grad_accum 1 run of the same batch_size computes as its whole step (micro-batch
    # 0 of step 0 reads the same windows whatever the accumulation: data.get_batch's keys)
    assert train.main(flags(corpus, tmp_path / "noise", "--max_steps", 1, "--grad_accum", 2, "--noise_scale")) == 0
    assert train.main(flags(corpus, tmp_path / "micro", "--max_steps", 1)) == 0
    row, micro = metrics(tmp_path / "noise")[-1], metrics(tmp_path / "micro")[-1]
    tokens = 4 * 32   # batch_size x seq_len of SMALL_MODEL: one micro-batch
    small, big = implied_norms(row, tokens, 2 * tokens)
    assert big == pytest.approx(row["grad_norm"] ** 2, rel=1e-4)
    assert small == pytest.approx(micro["grad_norm"] ** 2, rel=1e-4)
    assert row["noise_scale_tokens"] == pytest.approx(row["noise_trsigma"] / row["noise_gnorm2"])


def test_noise_scale_is_logged_along_a_run(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path, "--max_steps", 6, "--grad_accum", 2, "--noise_scale",
                            "--log_interval", 3)) == 0
    rows = [r for r in metrics(tmp_path) if "train_loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["noise_trsigma"] > 0 for r in rows)   # a per-token covariance: positive on real text


def test_one_batch_size_is_refused_before_anything_is_written(corpus, tmp_path):
    out = subprocess.run([sys.executable, "train.py", *flags(corpus, tmp_path / "run", "--noise_scale")],
                         cwd=os.path.dirname(train.__file__), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("train.py: --noise_scale needs two batch sizes")
    assert not (tmp_path / "run").exists()


def test_a_resume_is_checked_against_its_saved_grad_accum(corpus, tmp_path):
    # the flag may be switched on at a resume (a measurement, not the run); two batch sizes are then
    # the saved run's --grad_accum's to give, not the command line's default of 1
    assert train.main(flags(corpus, tmp_path / "two", "--max_steps", 4, "--stop_at", 2, "--grad_accum", 2)) == 0
    assert train.main(["--resume", str(tmp_path / "two"), "--noise_scale"]) == 0
    assert [("noise_trsigma" in r) for r in metrics(tmp_path / "two")] == [False, False, True, True]
    assert train.main(flags(corpus, tmp_path / "one", "--max_steps", 4, "--stop_at", 2)) == 0
    out = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "one"), "--noise_scale"],
                         cwd=os.path.dirname(train.__file__), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--noise_scale needs two batch sizes" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ddp_accum", [1, 2])
def test_ddp_per_rank_against_all_reduced_equals_micro_batches(corpus, tmp_path, ddp_accum):
    # 2 processes: small = rank 0's micro-batch 0 before DDP's all-reduce (its comm hook when it is the
    # only micro-batch, no_sync otherwise), big = the all-reduced step. One process accumulating 2x as
    # many micro-batches reads the same windows in the same roles (data.get_batch's keys), so it must
    # log the same numbers: an independent path (no hook, no all-reduce)
    single, ddp = run_both(corpus, tmp_path, "--grad_accum", str(ddp_accum))
    keys = ["noise_gnorm2", "noise_trsigma", "noise_scale_tokens", "train_loss"]
    single, two = ([r[k] for r in rows for k in keys] for rows in (single, ddp))
    assert len(single) == len(two) == 3 * len(keys)
    assert single == pytest.approx(two, rel=1e-4)


@pytest.mark.slow
def test_fsdp_big_batch_is_the_whole_step(corpus, tmp_path):
    # FSDP averages micro-batch 0 over the ranks (small: 2 micro-batches); the big gradient must be
    # the step's, the one a single process accumulating all 4 micro-batches computes
    single, fsdp = run_both(corpus, tmp_path, "--grad_accum", "2", "--fsdp")
    tokens = 4 * 32
    # the first row: the EMA holds that one step's estimate, which implied_norms inverts
    assert implied_norms(fsdp[0], 2 * tokens, 4 * tokens)[1] == pytest.approx(single[0]["grad_norm"] ** 2, rel=1e-4)
    assert all(r["noise_trsigma"] > 0 for r in fsdp)


def run_both(corpus, tmp_path, *ranked):
    """(one process with 2x the micro-batches, 2 processes under torchrun with `ranked`) -> their rows."""
    common = flags(corpus, tmp_path / "x", "--max_steps", 3, "--warmup_steps", 1, "--noise_scale")
    common = common[:common.index("--out_dir")] + common[common.index("--out_dir") + 2:]
    accum = int(ranked[ranked.index("--grad_accum") + 1])
    assert train.main([*common, "--out_dir", str(tmp_path / "single"), "--grad_accum", str(2 * accum)]) == 0
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *common, *ranked, "--out_dir", str(tmp_path / "ranks")],
                         cwd=os.path.dirname(train.__file__), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return metrics(tmp_path / "single"), metrics(tmp_path / "ranks")
