"""A run's metrics.jsonl (one JSON object per line) and the PNG drawn from it, for train.py and dpo.py.

Each row has a "step" and whatever was measured at it. A resumed run keeps the rows up to the step
it resumes from and appends after them, so the file always tells one consistent history.
"""
import json
import os
import sys

from atomic import atomic_write, atomic_write_text
from cli import UsageError


def read(path, drop_torn_tail=False):
    """The rows of a metrics.jsonl; a corrupt line is one error naming the file and the line."""
    # drop_torn_tail: a last line cut short (a full disk, a kill mid-append) is dropped with a note;
    # the resume that reads it repeats that step anyway. A bad line elsewhere is damage: refused.
    rows, lines = [], open(path).read().split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines   # the newline after the last row
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:   # e.g. a line cut short by a full disk: say where, not a JSON traceback
            if drop_torn_tail and lineno == len(lines):
                print(f"note: {path}:{lineno} was cut short (a full disk or a kill mid-write); dropped", file=sys.stderr)
                break
            raise UsageError(f"{path}:{lineno} is not a JSON line: fix or delete that line") from None
    return rows


class MetricsLog:
    """Appends rows to out_dir/metrics.jsonl; enabled=False (other ranks, benchmarks): no-ops."""

    def __init__(self, out_dir, enabled=True):
        self.path, self.enabled = os.path.join(out_dir, "metrics.jsonl"), enabled

    def start(self, resumed_step=None, source=None):
        # the history begins empty for a new run, with the old rows up to `step` for a resumed one:
        # rows past the checkpoint were logged by steps the resume repeats, and would appear twice
        if not self.enabled:
            return
        kept, source = [], source or self.path   # a resume into another folder starts from the old history
        if resumed_step is not None and os.path.exists(source):
            kept = [r for r in read(source, drop_torn_tail=True) if r["step"] <= resumed_step]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)   # never left half-cut

    def __call__(self, row):
        if self.enabled:
            # opened per row, not kept open: each row is on disk at once, for a reader plotting a live run
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self):
        return read(self.path)


def plot(rows, png_path, panels, x="step", title=""):
    """One subplot per panel: panels = [(y label, [(key, label), ...]), ...]."""
    import matplotlib   # imported here: a run without plots (tests, --bench) never pays for it
    matplotlib.use("Agg")   # no display needed: runs on servers and in tests
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for key, label in series:
            pts = [(r[x], r[key]) for r in rows if key in r and x in r]   # rows log only what they measured
            # a series with few points (evaluations) gets markers, so a 3-point curve is not mistaken for a line
            if pts:
                ax.plot(*zip(*pts), "o-" if len(pts) < 0.2 * len(rows) else "-", ms=3, label=label,
                        alpha=1.0 if len(pts) < 0.2 * len(rows) else 0.7)
        ax.set(xlabel=x, ylabel=ylabel)
        ax.grid(alpha=0.3)
        # the legend below the axes, outside them: it never hides a curve
        if ax.get_legend_handles_labels()[0]:   # a run stopped at step 0 has nothing to label yet
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    # written whole, then renamed (the one atomic writer): a viewer never sees half a PNG
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
