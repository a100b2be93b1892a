"""The behaviours loop.py gives every trainer, run table-driven against each of them (train.py and
dpo.py): --stop_at 0 and N, exact resume, SIGTERM (143) and Ctrl-C (130) with a checkpoint, a signal
during the step-0 evaluation, the resume-config merge rules, and the optimizer flags reaching AdamW.
A new trainer joins by adding a row to TRAINERS."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import dpo
import loop
import train
from conftest import SMALL_MODEL, small_config
from minicpm import MiniCPM


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus):
    """What each trainer starts from: train.py a corpus, dpo.py a pretrain checkpoint and 48 pairs."""
    root = tmp_path_factory.mktemp("loop")
    torch.manual_seed(0)
    byte = dict(spec="byte", rank_file=None, eot_id=256, vocab_size=257)
    checkpoint.save(str(root), "pretrain", MiniCPM(small_config(vocab_size=257)), step=0, tokenizer=byte, config={})
    pairs = [dict(prompt=f"def f{i}(x):", chosen=f" return x + {i}", rejected=f" pass  # {i * 7}") for i in range(48)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return dict(root=root, corpus=corpus)


def train_args(inputs, out):
    c = inputs["corpus"]
    return ["--source", c["source"], "--tokenizer", "byte", "--data_dir", c["data_dir"], "--out_dir", str(out),
            *SMALL_MODEL, "--eval_tokens", "512", "--eval_interval", "4", "--log_interval", "1"]


def dpo_args(inputs, out):
    return ["--init_from", str(inputs["root"]), "--data", str(inputs["root"] / "pairs.jsonl"), "--out_dir", str(out),
            "--batch_size", "4", "--max_len", "32", "--eval_interval", "4", "--device", "cpu"]


# trainer name -> (module, its script, the flags of a small run into a folder, its checkpoint kind)
TRAINERS = {"train": (train, "train.py", train_args, "pretrain"), "dpo": (dpo, "dpo.py", dpo_args, "dpo")}
BY_NAME = list(TRAINERS)


def rows(out):
    """metrics.jsonl without tokens/s, the one wall-clock figure in it."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(out / "metrics.jsonl")]


def weights(out):
    return checkpoint.load(str(out))["model"]


@pytest.mark.parametrize("name", BY_NAME)
def test_stop_at_n_then_resume_equals_the_whole_run(name, inputs, tmp_path):
    module, _, args, kind = TRAINERS[name]
    assert module.main([*args(inputs, tmp_path / "whole"), "--max_steps", "8"]) == 0
    assert module.main([*args(inputs, tmp_path / "parts"), "--max_steps", "8", "--stop_at", "3"]) == 0
    assert checkpoint.load(str(tmp_path / "parts"), kind=kind)["step"] == 3
    # the stop is a one-off: the resume runs to max_steps without being told to
    assert module.main(["--resume", str(tmp_path / "parts")]) == 0
    assert rows(tmp_path / "parts") == rows(tmp_path / "whole")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", BY_NAME)
def test_stop_at_0_saves_the_initial_weights_and_resumes_from_them(name, inputs, tmp_path):
    module, _, args, kind = TRAINERS[name]
    assert module.main([*args(inputs, tmp_path / "run"), "--max_steps", "4", "--stop_at", "0"]) == 0
    ckpt = checkpoint.load(str(tmp_path / "run"), kind=kind)
    assert ckpt["step"] == 0 and [r["step"] for r in rows(tmp_path / "run")] == [0]   # the eval at step 0
    assert module.main(["--resume", str(tmp_path / "run")]) == 0
    assert module.main([*args(inputs, tmp_path / "whole"), "--max_steps", "4"]) == 0
    assert rows(tmp_path / "run") == rows(tmp_path / "whole")


@pytest.mark.parametrize("name", BY_NAME)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_exits_128_plus_it_and_resume_finishes(name, sig, inputs, tmp_path):
    module, script, args, kind = TRAINERS[name]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, script, *args(inputs, out), "--max_steps", "100000", "--eval_interval", "0"],
                            cwd=os.path.dirname(train.__file__), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(sig)   # inside the loop now: the step finishes, is saved, and the process exits
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    step = checkpoint.load(str(out), kind=kind)["step"]
    assert step >= 2 and f"stopped by signal at step {step}" in stdout and "Traceback" not in stderr
    assert module.main(["--resume", str(out), "--max_steps", str(step + 2)]) == 0
    assert checkpoint.load(str(out))["step"] == step + 2


@pytest.mark.parametrize("name", BY_NAME)
def test_a_signal_during_the_first_evaluation_still_leaves_a_resumable_run(name, inputs, tmp_path, monkeypatch):
    # the handler is installed before the run folder is first written: Ctrl-C during the step-0
    # evaluation ends with a step-0 checkpoint (exit 130), and the folder then accepts --resume
    module, _, args, kind = TRAINERS[name]
    run_class = {"train": train.Pretrain, "dpo": dpo.DPO}[name]
    evaluate = run_class.evaluate

    def interrupted(self):
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGINT)   # caught by cli.StopSignals: only a flag is set
        return evaluate(self)
    monkeypatch.setattr(run_class, "evaluate", interrupted)
    assert module.main([*args(inputs, tmp_path), "--max_steps", "4"]) == 130
    assert checkpoint.load(str(tmp_path), kind=kind)["step"] == 0
    monkeypatch.undo()
    assert module.main(["--resume", str(tmp_path)]) == 0


@pytest.mark.parametrize("name", BY_NAME)
def test_resume_merges_the_saved_flags_by_the_same_rules(name, inputs, tmp_path, capsys):
    module, _, args, _ = TRAINERS[name]
    assert module.main([*args(inputs, tmp_path), "--max_steps", "6", "--stop_at", "2", "--lr", "0.002"]) == 0
    capsys.readouterr()
    # a flag that would make another run is refused, naming the flag and both values
    assert module.main(["--resume", str(tmp_path), "--lr", "0.5", "--beta1", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr: checkpoint has 0.002, given 0.5" in err and "--beta1: checkpoint has 0.9, given 0.5" in err
    assert len(err.splitlines()) == 1
    # what a resume may change: how it is watched, and its length; the rest comes from the checkpoint
    assert module.main(["--resume", str(tmp_path), "--eval_interval", "1", "--max_steps", "7"]) == 0
    saved = checkpoint.load(str(tmp_path))
    assert saved["step"] == 7 and saved["config"]["lr"] == 0.002 and saved["config"]["stop_at"] == -1
    assert saved["config"]["eval_interval"] == 1
    assert {r["step"] for r in rows(tmp_path) if any(k.startswith(("val_", "eval_")) for k in r)} >= {3, 4, 5, 6, 7}


@pytest.mark.parametrize("name", BY_NAME)
def test_optimizer_flags_reach_adamw_and_the_clip(name, inputs, tmp_path):
    module, _, args, _ = TRAINERS[name]
    flags = ["--beta1", "0.8", "--beta2", "0.9", "--adam_eps", "1e-6", "--weight_decay", "0.05", "--eval_interval", "0"]
    assert module.main([*args(inputs, tmp_path / "a"), "--max_steps", "1", *flags]) == 0
    for group in checkpoint.load(str(tmp_path / "a"))["optimizer"]["param_groups"]:   # torch's own record
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        assert group["weight_decay"] == (0.0 if group["name"] == "vectors" else 0.05)
    # --grad_clip: a clip far below Adam's epsilon shrinks the first update (m / (sqrt(v) + eps)) to
    # almost nothing, while an unclipped first step moves every weight by about the lr
    for clip, out in (("1e-12", "tiny"), ("0", "off")):
        assert module.main([*args(inputs, tmp_path / out), "--max_steps", "1", "--grad_clip", clip, "--eval_interval", "0",
                            "--weight_decay", "0", "--warmup_steps", "0"]) == 0
    init = {"train": None, "dpo": checkpoint.load(str(inputs["root"]))["model"]}[name]
    moved = {}
    for out in ("tiny", "off"):
        w = weights(tmp_path / out)["model.layers.0.mlp.up_proj.weight"]
        ref = init["model.layers.0.mlp.up_proj.weight"] if init else _initial_up_proj(tmp_path / out)
        moved[out] = (w - ref).abs().max().item()
    assert moved["tiny"] < 1e-3 * moved["off"] and moved["off"] > 0


def _initial_up_proj(out):
    """train.py's initial weights for the run in out: the same seed and config, built again."""
    cfg = checkpoint.load(str(out))
    torch.manual_seed(cfg["config"]["seed"])
    from minicpm import MiniCPMConfig
    return MiniCPM(MiniCPMConfig(**cfg["model_config"])).state_dict()["model.layers.0.mlp.up_proj.weight"]


def test_every_trainer_has_the_shared_flags_with_one_meaning():
    # the shared fields are loop.LoopConfig's: a trainer may change a default, never drop or retype a flag
    shared = {f.name: f.type for f in loop.dataclasses.fields(loop.LoopConfig)}
    for module, config in ((train, train.TrainConfig), (dpo, dpo.DPOConfig)):
        own = {f.name: f.type for f in loop.dataclasses.fields(config)}
        assert {k: own.get(k) for k in shared} == shared, module.__name__
