"""Learning-rate schedules of MiniCPM (Hu et al. 2024, arXiv 2404.06395): Warmup-Stable-Decay
(§4, Eq. 1) and its cosine baselines (Appendix B.1), as pure functions of the step.

    lr(s) = s / W * lr_max          s < W                    warmup
          = lr_max                  W <= s < T               stable
          = f(s - T) * lr_max       T <= s <= T + D          decay, f falls from 1 to final_frac
          = final_frac * lr_max     s > T + D                after the decay

with W = warmup, T = decay_start, D = decay_steps. The lr at a step depends only on the arguments,
so a decay branched from a stable checkpoint at step k is the same call with decay_start=k.

    python wsd.py [--out wsd.png]   # every schedule on one figure
"""
import argparse
import functools
import math

# §4: the released models decay exponentially with a 5000-step half-life over about 10% of
# training, which ends near 2% of lr_max: 0.5 ** (28219 / 5000) = 0.02.
PAPER_HALF_LIFE_STEPS = 5000
PAPER_DECAY_FRACTION = 0.1      # share of all training steps spent in the decay
FINAL_LR_FRAC = 0.02            # lr at the end of the decay, as a fraction of lr_max
# The paper's decay length for that half-life: our exp shape over it is exactly 0.5 ** (x / 5000).
PAPER_DECAY_STEPS = PAPER_HALF_LIFE_STEPS * math.log2(1 / FINAL_LR_FRAC)   # 28219
COSINE_FLOOR = 0.1              # Appendix B.1: Cosine(T) ends at 0.1 lr_max at step T

# f(p, final_frac) at decay progress p = (s - T) / D in [0, 1]: 1 at p = 0, final_frac at p = 1.
DECAY_SHAPES = {
    "exp": lambda p, final: final ** p,
    "linear": lambda p, final: 1 - (1 - final) * p,
    "cosine": lambda p, final: final + (1 - final) * (1 + math.cos(math.pi * p)) / 2,
    "1-sqrt": lambda p, final: 1 - (1 - final) * math.sqrt(p),   # steep first, then slow
}


def wsd(step, *, lr_max, warmup, decay_start=None, decay_steps=None, shape="exp",
        final_frac=FINAL_LR_FRAC):
    """WSD lr at `step` (§4, Eq. 1). decay_start=None: a stable run that never decays."""
    if step < 0 or warmup < 0:
        raise ValueError(f"step ({step}) and warmup ({warmup}) must be >= 0")
    if shape not in DECAY_SHAPES:
        raise ValueError(f"unknown decay shape {shape!r}, expected one of {tuple(DECAY_SHAPES)}")
    if not 0 < final_frac <= 1:
        raise ValueError(f"final_frac must be in (0, 1], got {final_frac}")
    if decay_start is not None and (decay_start < warmup or not (decay_steps or 0) > 0):
        raise ValueError(f"need decay_start >= warmup ({warmup}) and decay_steps > 0; "
                         f"got {decay_start}, {decay_steps}")
    if step < warmup:
        return lr_max * step / warmup
    if decay_start is None or step < decay_start:
        return lr_max
    progress = min(1.0, (step - decay_start) / decay_steps)   # past the decay: stay at final_frac
    return lr_max * DECAY_SHAPES[shape](progress, final_frac)


def cosine(step, *, lr_max, warmup, T, final_frac=COSINE_FLOOR):
    """Cosine(T) baseline (Appendix B.1): from lr_max at step 0 to final_frac * lr_max at step T
    (the paper's 0.1 by default; 0 is the "cosine to zero" of later work), flat after. s counts
    from step 0 (not from the end of warmup), so T is the whole planned run; the warmup ramp s / W
    multiplies the cosine, so the lr is continuous where warmup ends."""
    if step < 0 or warmup < 0 or T <= 0 or warmup > T:
        raise ValueError(f"need step >= 0 and 0 <= warmup <= T, T > 0; got {step}, {warmup}, {T}")
    if not 0 <= final_frac <= 1:
        raise ValueError(f"final_frac must be in [0, 1], got {final_frac}")
    ramp = step / warmup if step < warmup else 1.0
    # the same half cosine as WSD's cosine decay shape, here down to final_frac over all of T
    return ramp * lr_max * DECAY_SHAPES["cosine"](min(1.0, step / T), final_frac)


def cosine_loop(step, *, lr_max, warmup, T):
    """Cosine(T) restarted at lr_max every T steps (Appendix B.1); warmup once, at the start."""
    if step < 0 or warmup < 0 or T <= 0:
        raise ValueError(f"need step >= 0, warmup >= 0, T > 0; got {step}, {warmup}, {T}")
    ramp = step / warmup if step < warmup else 1.0
    return ramp * cosine(step % T, lr_max=lr_max, warmup=0, T=T)


SCHEDULES = {"wsd": wsd, "cosine": cosine, "cosine_loop": cosine_loop,   # constant: WSD, no decay
             "constant": lambda step, *, lr_max, warmup: wsd(step, lr_max=lr_max, warmup=warmup)}


def schedule(name, **kwargs):
    """lr(step) for a schedule named in SCHEDULES, its keyword arguments bound (for train.py)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, expected one of {tuple(SCHEDULES)}")
    return functools.partial(SCHEDULES[name], **kwargs)


def plot(out_path, total=10_000, warmup=500, lr_max=0.01):
    """Left: WSD with each decay shape over the last 10% (§4). Right: two decays branched from one
    stable run, Cosine(T) and Cosine-loop(T/4) (Appendix B.1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, decay = range(total + 1), int(PAPER_DECAY_FRACTION * total)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), sharey=True)

    def draw(ax, name, steps, label, style="-", **kwargs):
        lr = schedule(name, lr_max=lr_max, warmup=warmup, **kwargs)
        ax.plot(steps, [lr(s) for s in steps], style, label=label)
    for shape in DECAY_SHAPES:
        draw(left, "wsd", steps, f"WSD, {shape} decay", decay_start=total - decay,
             decay_steps=decay, shape=shape)
    draw(right, "constant", steps, "WSD stable run", "k")
    for k in (total // 2, 3 * total // 4):   # decays branched from the one stable run
        draw(right, "wsd", range(k, k + decay + 1), f"WSD exp decay from step {k}", "--",
             decay_start=k, decay_steps=decay)
    draw(right, "cosine", steps, f"cosine(T={total})", T=total)
    draw(right, "cosine_loop", steps, f"cosine_loop(T={total // 4})", T=total // 4)
    left.set_title(f"WSD: warmup {warmup}, decay over the last {decay} steps")
    right.set_title("decays branched from a stable run vs cosine baselines")
    for ax in (left, right):
        ax.set(xlabel="step", ylabel="learning rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="wsd.png", help="where to write the PNG")
    plot(parser.parse_args().out)
