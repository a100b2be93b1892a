"""tools/moe_bench.py: the MoE layer timed against a dense SwiGLU of equal FLOPs (tiny sizes: seconds),
and its refusal of bad sizes."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))   # tools/ is a folder of scripts, not a package
import cli  # noqa: E402
from moe_bench import bench, from_flags  # noqa: E402


def test_bench_runs(capsys):
    t_moe, t_dense = bench(d=64, ffn=32, n_experts=4, top_k=2, tokens=64, repeats=2, warmup=1)
    assert t_moe > 0 and t_dense > 0
    out = capsys.readouterr().out
    assert "ratio MoE / dense" in out
    # the expert load printed is a distribution over the 4 experts: shares that sum to 1
    load = json.loads(out.split("expert load of the last step: ")[1].splitlines()[0])
    assert len(load) == 4 and abs(sum(load) - 1) < 0.01


def test_bench_refuses_bad_sizes_in_one_line(capsys):
    # through cli.main, as the command line runs it: one line, exit 2, nothing timed
    assert cli.main("moe_bench.py", from_flags, ["--n_experts", "4", "--top_k", "5", "--tokens", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert "--top_k 5" in captured.err and "--tokens" in captured.err
