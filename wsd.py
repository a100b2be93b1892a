"""Learning-rate schedules of MiniCPM (Hu et al. 2024, arXiv 2404.06395): Warmup-Stable-Decay
(§4, Eq. 1) and its cosine baselines (Appendix B.1), as pure functions of the step.

    lr(s) = s / W * lr_max          s < W                    warmup
          = lr_max                  W <= s < T               stable
          = f(s - T) * lr_max       T <= s <= T + D          decay, f falls from 1 to final_frac
          = final_frac * lr_max     s > T + D                after the decay

with W = warmup, T = decay_start, D = decay_steps. The lr at a step depends only on the arguments,
so a decay branched from a stable checkpoint at step k is the same call with decay_start=k.
`resolve` turns a script's flags into lr(step) and is the one home of the defaults (train.py and
dpo.py both use it).

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
# The paper does not give MiniCPM's warmup. The default is a fixed number of steps, never a share
# of --max_steps: then the lr at step s never depends on how long the run was planned, and a decay
# branched from a stable checkpoint (§4.3) is bitwise the run planned with it. Real runs set it.
WARMUP_STEPS = 10

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
    if not (0 < final_frac <= 1 if shape == "exp" else 0 <= final_frac <= 1):   # exp never reaches 0
        raise ValueError(f"final_frac must be in {'(0' if shape == 'exp' else '[0'}, 1], got {final_frac}")
    if decay_start is not None and (decay_start < warmup or not (decay_steps or 0) > 0):
        raise ValueError(f"need decay_start >= warmup ({warmup}) and decay_steps > 0; "
                         f"got {decay_start}, {decay_steps}")
    if step < warmup:
        return lr_max * step / warmup
    if decay_start is None or step < decay_start:
        return lr_max
    progress = min(1.0, (step - decay_start) / decay_steps)   # past the decay: stay at final_frac
    return lr_max * DECAY_SHAPES[shape](progress, final_frac)


def cosine(step, *, lr_max, warmup, T, floor=COSINE_FLOOR, loop=False):
    """Cosine(T) (Appendix B.1): lr_max (floor + (1 - floor) (1 + cos(pi s / T)) / 2), flat after T."""
    # from lr_max at step 0 to floor * lr_max at step T. loop=True is CosineLoop(T): past T the cosine
    # simply goes on, back up to lr_max at 2T, down again at 3T (period 2T, no sawtooth restart).
    # Both of B.1's printed formulas, 0.9 eta cos(pi s/T) + 0.1 eta, are a typo that goes negative
    # past T/2 (-0.8 eta at T); the curve the paper plots is the one above, eta (0.1 + 0.45 (1 + cos)).
    # s counts from step 0 (T is the whole planned run); the warmup ramp s / W multiplies the cosine,
    # so the lr is continuous where warmup ends.
    if step < 0 or warmup < 0 or T <= 0 or warmup > T or not 0 <= floor <= 1:
        raise ValueError(f"need step >= 0, 0 <= warmup <= T, T > 0, 0 <= floor <= 1; got {step}, {warmup}, {T}, {floor}")
    ramp = step / warmup if step < warmup else 1.0
    return ramp * lr_max * (floor + (1 - floor) * (1 + math.cos(math.pi * (step / T if loop else min(1.0, step / T)))) / 2)


SCHEDULES = {"wsd": wsd, "cosine": cosine, "cosine_loop": functools.partial(cosine, loop=True),
             "constant": lambda step, *, lr_max, warmup: wsd(step, lr_max=lr_max, warmup=warmup)}  # no decay


def schedule(name, **kwargs):
    """lr(step) for a schedule named in SCHEDULES, its keyword arguments bound."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, expected one of {', '.join(SCHEDULES)}")
    return functools.partial(SCHEDULES[name], **kwargs)


def resolve(name, *, lr, max_steps, warmup=-1, decay_steps=-1, decay_start=-1, shape="exp", final_frac=-1.0,
            half_life=-1.0, period=-1):
    """lr(step) from a script's flags, -1 meaning "the default"; `lr_at.describe` says what was chosen."""
    # defaults: warmup WARMUP_STEPS; a WSD decay over the last PAPER_DECAY_FRACTION of max_steps, to
    # FINAL_LR_FRAC, or by its half-life in steps (§6.2: 5000) when half_life > 0; cosine to COSINE_FLOOR
    # at T = period, or at max_steps when period < 0 (Cosine(T) is best when T is the whole run, §4.2;
    # a shorter T is Figure 4's "lr at its floor early", and only then does cosine_loop loop)
    warmup = WARMUP_STEPS if warmup < 0 else warmup
    warmup = min(warmup, max_steps)   # a run shorter than the default warmup ramps over all of it
    if name == "wsd":
        D = decay_steps if decay_steps >= 0 else max(1, round(PAPER_DECAY_FRACTION * max_steps))
        start = decay_start if decay_start >= 0 else max(warmup, max_steps - D)   # never inside the warmup
        if half_life > 0 and final_frac >= 0:
            raise ValueError("give the decay's end as a final lr fraction or as a half-life, not both")
        # exp decay to 0.5 ** (D / H) over D steps halves the lr every H steps: final_frac ** (x / D)
        final = 0.5 ** (D / half_life) if half_life > 0 else FINAL_LR_FRAC if final_frac < 0 else final_frac
        if half_life > 0 and shape != "exp":
            raise ValueError(f"a half-life describes the exp decay shape, not {shape}")
        lr_at = schedule(name, lr_max=lr, warmup=warmup, decay_start=start, decay_steps=D, shape=shape, final_frac=final)
        what = f", {shape} decay over steps {start}-{start + D} to {final:.3g} of the peak"
    elif name in ("cosine", "cosine_loop"):
        floor, T = COSINE_FLOOR if final_frac < 0 else final_frac, period if period > 0 else max_steps
        lr_at, what = schedule(name, lr_max=lr, warmup=warmup, T=T, floor=floor), f", T {T}, floor {floor:g}"
    else:
        lr_at, what = schedule(name, lr_max=lr, warmup=warmup), ""
    lr_at(max_steps)   # a bad combination fails now, not at the end of the run
    lr_at.describe = f"{name}, peak lr {lr:g}, warmup {warmup}{what}"
    return lr_at


def plot(out_path, total=10_000, warmup=500, lr_max=0.01):
    """Left: WSD with each decay shape over the last 10% (§4). Right: two decays branched from one
    stable run, Cosine(T) and Cosine-loop(T/4) (Appendix B.1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, decay = range(total + 1), int(PAPER_DECAY_FRACTION * total)   # decay: the last 10% (§4)
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
    draw(right, "cosine_loop", steps, f"CosineLoop(T={total // 4})", T=total // 4)
    left.set_title(f"WSD: warmup {warmup}, decay over the last {decay} steps")
    right.set_title("decays branched from a stable run vs cosine baselines")
    for ax in (left, right):
        ax.set(xlabel="step", ylabel="learning rate")
        ax.legend(fontsize=8)
    fig.tight_layout()   # written by the one atomic writer (imported here: wsd.py stays import-light)
    __import__("checkpoint").atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=120))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="wsd.png", help="where to write the PNG")
    plot(parser.parse_args().out)
