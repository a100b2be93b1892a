"""The gradient noise scale (train.py --noise_scale): the batch size beyond which a bigger batch stops paying.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training": with G the true gradient and
Σ the per-example covariance, a batch of B examples has E|G_B|^2 = |G|^2 + tr(Σ)/B. Two batch sizes
B_small < B_big, whose gradients every step computes anyway, give both unknowns (their Appendix A.1):

    |G|^2  ≈ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Σ)  ≈ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    B_simple = tr(Σ) / |G|^2      (their simple noise scale: ~ the critical batch size, §2)

Each estimate is unbiased but noisy (one step's |G|^2 can come out negative), and the ratio of two
noisy numbers is biased: Appendix A.1 smooths numerator and denominator separately, with an
exponential moving average each, and divides the averages. So do we (EMA_DECAY below).

Batches are counted in tokens (sequences x seq_len): then tr(Σ) is per token and B_simple comes out
in tokens, the unit of --batch_size x --seq_len x --grad_accum x processes and of MiniCPM's batch-size
law (Figures 1-2, §3.2).

What "small" and "big" are (loop.step reads both, no extra forward or backward):
    one process, --grad_accum G >= 2   small: micro-batch 0 (its .grad right after its backward)
                                       big:   the G micro-batches accumulated
    DDP, N processes                   small: rank 0's micro-batch 0 before the all-reduce (no_sync
                                              when G >= 2; with G = 1 a communication hook reads the
                                              bucket before DDP averages it: parallel.local_grad_hook)
                                       big:   the all-reduced gradient of all N x G micro-batches
    FSDP, N processes, G >= 2          small: micro-batch 0 reduce-scattered over the N ranks (FSDP
                                              averages after every micro-batch: no rank ever holds its
                                              own whole gradient), so N micro-batches
                                       big:   all N x G
Only rank 0 logs: its estimate uses its own small batch, so a DDP run of 2 processes logs exactly what one
process with --grad_accum 2 logs on the same data (tests/test_noise.py). The other ranks' small batches
would be N - 1 more samples per step; the EMA averages over ~20 steps instead, with no communication. Each micro-batch's backward
sees the loss divided by G (loop.step), so micro-batch 0's .grad is its own gradient / G: scaled back here.
"""
import math
import os

import torch
from torch.distributed.tensor import DTensor

# Per optimizer step: a memory of ~1 / (1 - 0.95) = 20 steps. Long enough that the ratio is not one
# step's noise, short enough to follow B_simple as it grows while the loss falls (their §3).
EMA_DECAY = 0.95


def refusals(cfg):
    """--noise_scale without two batch sizes in a step, as (condition, message) for cli.check."""
    # checked before anything is written: WORLD_SIZE is torchrun's, set before the process starts. FSDP
    # has no per-rank gradient (see above), so there only micro-batches can give the small batch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    alone = getattr(cfg, "noise_scale", False) and cfg.grad_accum < 2 and (world < 2 or getattr(cfg, "fsdp", False))
    return [(alone, "--noise_scale needs two batch sizes per step: give --grad_accum 2 or more (or, without --fsdp, "
             "run several processes under torchrun)")]


def estimates(small_sq, big_sq, b_small, b_big):
    """-> (|G|^2, tr(Σ)) from the squared norms of a b_small- and a b_big-token batch's mean gradient."""
    # E|G_B|^2 = |G|^2 + tr(Σ)/B at B = b_small and b_big: two linear equations, solved exactly
    gnorm2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trsigma = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return gnorm2, trsigma


def squared_norm(grads):
    """sum |g|^2 over a list of gradients, a 0-dim float tensor (FSDP's sharded ones made whole)."""
    # get_total_norm is what clip_grad_norm_ uses: one fused kernel over the list, DTensors included
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2


class NoiseScale:
    """The two estimates, each a bias-corrected EMA over steps, kept on the device (no sync per step)."""

    def __init__(self, decay=EMA_DECAY):
        self.decay = decay
        # sums of weight x value and of weight: their ratio is the EMA corrected for its zero start
        # (as Adam's moments are), so the first logged value is the first step's own, not ~0
        self.sums = self.weight = None

    def update(self, small_sq, big_sq, b_small, b_big):
        """Add one step's squared norms (0-dim tensors) of its b_small- and b_big-token gradients."""
        values = torch.stack(estimates(small_sq.float(), big_sq.float(), b_small, b_big))   # [2]
        # an fp16 step whose gradients overflowed (the scaler skips it) must not poison the average:
        # weight 0 instead of an `if`, which would sync with the GPU every step
        ok = torch.isfinite(values).all().float()
        values = torch.where(ok > 0, values, torch.zeros_like(values))
        if self.sums is None:
            self.sums, self.weight = torch.zeros_like(values), torch.zeros_like(ok)
        self.sums = self.decay * self.sums + (1 - self.decay) * ok * values
        self.weight = self.decay * self.weight + (1 - self.decay) * ok

    def row(self):
        """-> {noise_gnorm2, noise_trsigma, noise_scale_tokens} for metrics.jsonl (one sync, at log steps)."""
        if self.sums is None or not self.weight.item() > 0:
            return {}   # no finite step yet: nothing to say
        gnorm2, trsigma = (self.sums / self.weight).tolist()
        # |G|^2 <= 0 happens early or with too few steps averaged: the noise swamps the signal, and a
        # negative or infinite batch size would mislead; logged as null, the two estimates still shown
        scale = trsigma / gnorm2 if gnorm2 > 0 and math.isfinite(trsigma) else None
        return dict(noise_gnorm2=gnorm2, noise_trsigma=trsigma, noise_scale_tokens=scale)


class Tracker:
    """loop.step's side of it: reads the small gradient after micro-batch 0, the big one after the step."""

    def __init__(self, run):
        import parallel   # here, not at the top: noise.py's maths import nothing of the trainer's
        self.run, self.G, self.world = run, run.cfg.grad_accum, run.dist.world
        self.sharded = parallel.is_sharded(run.raw)   # FSDP: micro-batch 0 is already averaged over ranks
        self.ema, self.small_sq, self.b_small = NoiseScale(), None, 0
        # DDP with one micro-batch: it is also the all-reduced one, so its local gradient is read by
        # a communication hook as DDP's bucket leaves for the all-reduce (sums |bucket|^2 into hooked)
        self.hooked = None
        if self.G == 1 and self.world > 1 and not self.sharded:
            self.hooked = parallel.local_grad_hook(run.model)

    def after_first(self, n_tokens):
        """Right after micro-batch 0's backward: its own squared gradient norm, and its size in tokens."""
        scale = self.run.scaler.get_scale() if self.run.scaler.is_enabled() else 1.0   # fp16's loss scaling
        if self.hooked is not None:   # the hook saw this rank's gradient before DDP averaged it
            sq = self.hooked.clone()
            self.hooked.zero_()   # the next step's buckets start from zero
        else:   # the accumulated .grad is micro-batch 0's gradient / G (loop.step divides each loss by G)
            sq = squared_norm([p.grad for p in self.run.raw.parameters() if p.grad is not None]) * self.G ** 2
        self.small_sq = sq / scale ** 2
        # FSDP averaged micro-batch 0 over the N ranks: N micro-batches' worth of tokens
        self.b_small = n_tokens * (self.world if self.sharded else 1)

    def after_step(self, grad_norm, n_tokens):
        """After the last micro-batch: grad_norm is the whole step's (unscaled, before clipping: loop.step)."""
        # n_tokens: this rank's tokens over its G micro-batches; the step's batch is all ranks' together
        self.ema.update(self.small_sq, grad_norm.detach() ** 2, self.b_small, n_tokens * self.world)

    def row(self):
        return self.ema.row()
