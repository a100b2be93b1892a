"""Tests of wsd.py against values computed by hand from the paper's formulas (§4, Eq. 1;
Appendix B.1): phase values, continuity, monotone decays, branching, the cosine baselines, the
error messages and the figure."""
import math
import subprocess
import sys

import pytest

import wsd as W_
from wsd import DECAY_SHAPES, WARMUP_STEPS, cosine, resolve, schedule, wsd

cosine_loop = W_.SCHEDULES["cosine_loop"]

LR = 0.01
W, START, D = 100, 1000, 200      # warmup, decay_start, decay_steps
RUN = dict(lr_max=LR, warmup=W, decay_start=START, decay_steps=D)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- WSD

def test_warmup_and_stable_values():
    assert wsd(0, **RUN) == 0.0
    assert wsd(50, **RUN) == approx(0.005)          # half of warmup: half of lr_max
    assert wsd(99, **RUN) == approx(0.0099)
    for s in (100, 500, 999):                       # stable: flat at lr_max up to decay_start
        assert wsd(s, **RUN) == approx(LR)
    assert wsd(10**9, lr_max=LR, warmup=W) == approx(LR)   # no decay_start: stable forever


# Each shape at the start, middle and end of the decay, worked out by hand with final_frac 0.02.
HAND = {
    "exp": (1.0, math.sqrt(0.02), 0.02),            # 0.02 ** 0.5
    "linear": (1.0, 0.51, 0.02),                    # 1 - 0.98 * 0.5
    "cosine": (1.0, 0.51, 0.02),                    # 0.02 + 0.98 * (1 + cos(pi/2)) / 2
    "1-sqrt": (1.0, 1 - 0.98 * math.sqrt(0.5), 0.02),
}


@pytest.mark.parametrize("shape", sorted(HAND))
def test_decay_values(shape):
    start, middle, end = HAND[shape]
    assert wsd(START, **RUN, shape=shape) == approx(LR * start)
    assert wsd(START + D // 2, **RUN, shape=shape) == approx(LR * middle)
    assert wsd(START + D, **RUN, shape=shape) == approx(LR * end)
    for s in (START + D + 1, START + 10 * D):       # after the decay: stay at final_frac
        assert wsd(s, **RUN, shape=shape) == approx(LR * end)


def test_cosine_decay_quarter_and_final_frac():
    # a quarter of the way down: 0.02 + 0.98 * (1 + cos(pi/4)) / 2 = 0.02 + 0.49 * (1 + 0.70710678)
    quarter = 0.02 + 0.49 * (1 + 0.5 ** 0.5)
    assert wsd(START + D // 4, **RUN, shape="cosine") == approx(LR * quarter)
    assert wsd(START + D, **RUN, shape="linear", final_frac=0.1) == approx(LR * 0.1)
    assert wsd(START + D // 2, **RUN, shape="exp", final_frac=0.25) == approx(LR * 0.5)


def test_exp_matches_paper_half_life():
    # §4: 0.5 ** (x / 5000). Over 5000 * log2(50) steps our exp shape halves every 5000 steps.
    run = dict(lr_max=1.0, warmup=0, decay_start=0, decay_steps=5000 * math.log2(50))
    assert wsd(5000, **run) == approx(0.5)
    assert wsd(10000, **run) == approx(0.25)


@pytest.mark.parametrize("shape", sorted(DECAY_SHAPES))
def test_continuity_at_phase_boundaries(shape):
    lr = [wsd(s, **RUN, shape=shape) for s in range(START + D + 3)]
    warmup_step = LR / W                             # one warmup step's change
    assert abs(lr[W] - lr[W - 1]) <= warmup_step + 1e-15
    # entering the decay: no bigger than the largest single step inside the decay
    largest_decay_step = max(abs(lr[s + 1] - lr[s]) for s in range(START, START + D))
    assert abs(lr[START] - lr[START - 1]) <= largest_decay_step
    assert lr[START] == approx(LR)                   # the decay starts from lr_max, no jump
    assert abs(lr[START + D + 1] - lr[START + D]) <= largest_decay_step


@pytest.mark.parametrize("shape", sorted(DECAY_SHAPES))
def test_decay_is_monotone(shape):
    lr = [wsd(s, **RUN, shape=shape) for s in range(START, START + D + 20)]
    assert all(b <= a for a, b in zip(lr, lr[1:]))
    assert all(b < a for a, b in zip(lr[:D], lr[1:D + 1]))   # strictly, inside the decay


@pytest.mark.parametrize("branch", [W, 400, 1000])
def test_branch_equals_planned_run(branch):
    # a stable run, then a decay branched from its checkpoint at `branch` ...
    stable = [wsd(s, lr_max=LR, warmup=W) for s in range(branch)]
    decay = [LR * 0.02 ** (x / D) for x in range(D + 1)]          # hand-written exp decay
    branched = stable + decay
    # ... equals, step for step, a run planned with that decay_start from the start
    planned = [wsd(s, lr_max=LR, warmup=W, decay_start=branch, decay_steps=D)
               for s in range(branch + D + 1)]
    assert planned == pytest.approx(branched, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- cosine baselines

T = 1000


def cosine_frac(p):
    """Appendix B.1 by hand: 0.1 + 0.9 * (1 + cos(pi p)) / 2."""
    return 0.1 + 0.45 * (1 + math.cos(math.pi * p))


def test_cosine_values():
    run = dict(lr_max=LR, warmup=0, T=T)
    assert cosine(0, **run) == approx(LR)
    assert cosine(T // 2, **run) == approx(LR * 0.55)              # 0.1 + 0.9 * (1 + 0) / 2
    assert cosine(T // 4, **run) == approx(LR * (0.1 + 0.45 * (1 + 0.5 ** 0.5)))
    assert cosine(T, **run) == approx(LR * 0.1)
    assert cosine(3 * T, **run) == approx(LR * 0.1)                # flat after T


def test_cosine_warmup_counts_from_step_zero():
    # the ramp s / W multiplies the cosine, whose clock starts at step 0
    run = dict(lr_max=LR, warmup=W, T=T)
    assert cosine(0, **run) == 0.0
    assert cosine(50, **run) == approx(0.5 * LR * cosine_frac(0.05))
    assert cosine(T // 2, **run) == approx(LR * 0.55)
    assert abs(cosine(W, **run) - cosine(W - 1, **run)) <= LR / W


def test_cosine_final_frac_zero():
    # cosine to zero: 0.5 * (1 + cos(pi * s / T)), by hand at a quarter, half and the end
    run = dict(lr_max=LR, warmup=0, T=1000, floor=0.0)
    assert cosine(250, **run) == approx(LR * 0.5 * (1 + 0.5 ** 0.5))
    assert cosine(500, **run) == approx(LR * 0.5)
    assert abs(cosine(1000, **run)) < 1e-15 and abs(cosine(2000, **run)) < 1e-15
    with pytest.raises(ValueError):
        cosine(1, lr_max=LR, warmup=0, T=10, floor=-0.1)


def test_cosine_loop_follows_appendix_b1_past_T():
    # Appendix B.1, as intended: eta (0.1 + 0.45 (1 + cos(pi s / T))) for every s, a smooth curve of
    # period 2T (the printed 0.9 eta cos(pi s/T) + 0.1 eta is a typo: -0.8 eta at s = T).
    run = dict(lr_max=LR, warmup=0, T=T)
    hand = {0: 1.0, T // 2: 0.55, T: 0.1, 3 * T // 2: 0.55, 2 * T: 1.0, 5 * T // 2: 0.55, 3 * T: 0.1,
            T + T // 4: 0.1 + 0.45 * (1 - 0.5 ** 0.5)}
    for s, frac in hand.items():
        assert cosine_loop(s, **run) == approx(LR * frac), s
    lr = [cosine_loop(s, **run) for s in range(3 * T)]
    assert max(abs(b - a) for a, b in zip(lr, lr[1:])) < 2e-3 * LR      # no restart jump anywhere
    assert min(lr) == approx(LR * 0.1) and cosine(T + 1, **run) == approx(LR * 0.1)   # Cosine(T): flat
    # warmup only once, at the start
    assert cosine_loop(50, lr_max=LR, warmup=W, T=T) == approx(0.5 * LR * cosine_frac(0.05))


def test_cosine_floor_zero():
    assert cosine(T, lr_max=LR, warmup=0, T=T, floor=0.0) == 0.0
    assert cosine(T // 2, lr_max=LR, warmup=0, T=T, floor=0.0) == approx(LR * 0.5)


def test_half_life_gives_half_the_peak_half_life_steps_into_the_decay():
    # §6.2: lr = 0.5 ** (x / 5000) x steps into the decay
    lr_at = resolve("wsd", lr=LR, max_steps=40_000, warmup=0, decay_start=20_000, decay_steps=20_000,
                    half_life=5000)
    assert lr_at(20_000) == approx(LR)
    assert lr_at(25_000) == approx(0.5 * LR)
    assert lr_at(30_000) == approx(0.25 * LR)
    with pytest.raises(ValueError, match="half-life"):
        resolve("wsd", lr=LR, max_steps=100, half_life=10, final_frac=0.1)


def test_resolve_defaults_do_not_depend_on_max_steps_before_the_decay():
    # the default warmup is a fixed number of steps: a run planned for 1000 steps and one planned for
    # 10000 have the same lr at every step before the shorter one's decay (§4.3 branching)
    short, long = resolve("wsd", lr=LR, max_steps=1000), resolve("wsd", lr=LR, max_steps=10_000)
    assert [short(s) for s in range(900)] == [long(s) for s in range(900)]
    assert short(WARMUP_STEPS // 2) == approx(LR * (WARMUP_STEPS // 2) / WARMUP_STEPS)
    assert short(900) == approx(LR) and short(1000) == approx(LR * W_.FINAL_LR_FRAC)   # last 10%
    assert resolve("cosine", lr=LR, max_steps=T)(T) == approx(LR * 0.1)
    assert resolve("cosine", lr=LR, max_steps=T, final_frac=0.0)(T) == 0.0


def test_schedule_by_name():
    assert schedule("constant", lr_max=LR, warmup=W)(5000) == approx(LR)
    assert schedule("wsd", **RUN)(START + D // 2) == approx(LR * math.sqrt(0.02))
    assert schedule("cosine", lr_max=LR, warmup=0, T=T)(T) == approx(LR * 0.1)
    assert schedule("cosine_loop", lr_max=LR, warmup=0, T=T)(2 * T) == approx(LR)


# ----------------------------------------------------------------------------- errors and figure

@pytest.mark.parametrize("call", [
    lambda: wsd(-1, **RUN),
    lambda: wsd(5, lr_max=LR, warmup=-1),
    lambda: wsd(5, **RUN, shape="step"),
    lambda: wsd(5, lr_max=LR, warmup=W, decay_start=W - 1, decay_steps=D),
    lambda: wsd(5, lr_max=LR, warmup=W, decay_start=START, decay_steps=0),
    lambda: wsd(5, lr_max=LR, warmup=W, decay_start=START),
    lambda: wsd(5, **RUN, final_frac=0.0),
    lambda: cosine(-1, lr_max=LR, warmup=0, T=T),
    lambda: cosine(5, lr_max=LR, warmup=0, T=0),
    lambda: cosine_loop(-1, lr_max=LR, warmup=0, T=T),
    lambda: cosine(5, lr_max=LR, warmup=0, T=T, floor=-0.1),
    lambda: resolve("wsd", lr=LR, max_steps=100, shape="linear", half_life=10),
    lambda: schedule("onecycle", lr_max=LR),
])
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_figure_is_written(repo_root, tmp_path):
    out = tmp_path / "schedules.png"
    subprocess.run([sys.executable, "wsd.py", "--out", str(out)], cwd=repo_root, check=True,
                   timeout=60, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
