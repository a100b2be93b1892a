"""The README's recipe as commands (tools/recipe.py --quick): stable -> decay on a mixture -> SFT -> DPO, each
scored by eval.py. A few steps per stage: it checks that the pipeline runs and records what it should."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow   # four trainings and four evaluations in child processes: ~3-6 minutes on 2 cores
def test_the_recipe_runs_end_to_end_and_scores_each_stage(repo_root, tmp_path):
    done = subprocess.run([sys.executable, "tools/recipe.py", "--work", str(tmp_path / "r"), "--quick"],
                          cwd=repo_root, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "r" / "scores.jsonl").read_text().splitlines()]
    # per stage: the instruct task and the two datasets' bits/byte
    assert [line["task"].split(":")[0] for line in lines] == ["instruct", "data", "data"] * 4
    import torch
    kinds = [torch.load(tmp_path / "r" / s / "ckpt.pt", weights_only=True)["kind"] for s in ("stable", "decay", "sft", "dpo")]
    assert kinds == ["pretrain", "pretrain", "sft", "dpo"]
    table = (tmp_path / "r" / "recipe.md").read_text().splitlines()
    assert table[0].startswith("| stage | wall (s) |") and len(table) == 6
