"""Tests of train.py: learning, outputs, exact resume, atomic checkpoints, DDP against gradient
accumulation, the schedule it follows, and clear errors. Small model, small corpus, byte tokenizer."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from atomic import atomic_save
from conftest import SMALL_MODEL, metrics


def flags(corpus, out_dir, *extra):
    return ["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"],
            "--out_dir", str(out_dir), *SMALL_MODEL, "--eval_tokens", "512", *map(str, extra)]


def run_cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=os.path.dirname(train.__file__),
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_loss_falls_and_outputs_are_written(corpus, tmp_path):
    args = flags(corpus, tmp_path, "--max_steps", 20, "--eval_interval", 10, "--log_interval", 1)
    args[args.index("byte")] = "bpe:300"         # a learned tokenizer: its rank file goes with the checkpoint
    assert train.main(args) == 0
    rows = metrics(tmp_path)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 20 and len(vals) == 3            # val at steps 0, 10, 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert vals[-1] < vals[0] - 0.5
    meta = json.load(open(tmp_path / "data_meta.json"))
    tokens_per_byte = meta["val"]["tokens"] / meta["val"]["bytes"]
    for r in rows:   # bits per byte = nats/token / ln 2 * tokens/byte
        if "val_loss" in r:
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * tokens_per_byte, rel=1e-9)
    assert open(tmp_path / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = checkpoint.load(str(tmp_path))
    assert ckpt["step"] == 20 and ckpt["tokens"] == 20 * 4 * 32
    assert ckpt["tokenizer"]["spec"] == "bpe:300" and ckpt["tokenizer"]["vocab_size"] == 300
    import data
    enc = data.load_tokenizer("bpe:300", str(tmp_path / ckpt["tokenizer"]["rank_file"]))
    assert enc.decode(enc.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    model = checkpoint.build_model(ckpt)
    assert model.config.n_layer == 2 and model.config.vocab_size == 300


def test_lr_follows_the_wsd_schedule(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path, "--max_steps", 20, "--warmup_steps", 4, "--decay_steps", 6,
                            "--eval_interval", 0, "--log_interval", 1, "--lr", 0.02)) == 0
    logged = [r["lr"] for r in metrics(tmp_path)]
    # lr used at step s (logged after it as step s + 1), computed by hand: warmup 4, decay 14 -> 20, exp to 2%
    expected = [0.02 * s / 4 for s in range(4)] + [0.02] * 10 + [0.02 * 0.02 ** ((s - 14) / 6) for s in range(14, 20)]
    assert logged == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "cosine_loop"])
def test_cosine_period_from_the_command_line(corpus, tmp_path, name):
    # --cosine_period 4 over 12 steps (Appendix B.1): Cosine(4) stays at its floor after step 4,
    # CosineLoop(4) rises back to the peak at 8 and falls again; by hand, warmup 0, floor 0.1
    assert train.main(flags(corpus, tmp_path, "--max_steps", 12, "--schedule", name, "--cosine_period", 4,
                            "--warmup_steps", 0, "--eval_interval", 0, "--log_interval", 1, "--lr", 0.02)) == 0
    logged = [r["lr"] for r in metrics(tmp_path)]
    by_hand = lambda s: 0.02 * (0.1 + 0.9 * (1 + math.cos(math.pi * s / 4)) / 2)
    expected = [by_hand(min(s, 4) if name == "cosine" else s) for s in range(12)]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert (logged[8] == pytest.approx(0.02)) == (name == "cosine_loop")


def test_resume_is_bitwise_exact(corpus, tmp_path):
    common = ("--max_steps", 12, "--eval_interval", 6, "--log_interval", 1, "--ckpt_interval", 100)
    assert train.main(flags(corpus, tmp_path / "whole", *common)) == 0
    assert train.main(flags(corpus, tmp_path / "parts", *common, "--stop_at", 5)) == 0
    assert checkpoint.load(str(tmp_path / "parts"))["step"] == 5
    assert train.main(["--resume", str(tmp_path / "parts"), "--stop_at", "9"]) == 0     # in two more pieces
    assert train.main(["--resume", str(tmp_path / "parts")]) == 0
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [r["step"] for r in whole]
    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert without_speed(parts) == without_speed(whole)      # losses, val losses, grad norms: bitwise


def test_crash_while_writing_checkpoint_keeps_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"model": {"w": torch.ones(3)}, "model_config": {}, "step": 7}, path)

    class ExplodesWhilePickled:
        def __reduce__(self):
            raise RuntimeError("simulated crash in the middle of writing")
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_save({"model": {"w": torch.zeros(1000)}, "boom": ExplodesWhilePickled()}, path)
    assert checkpoint.load(path)["step"] == 7
    assert os.listdir(tmp_path) == ["ckpt.pt"]                       # no temporary file left behind


def test_ddp_equals_gradient_accumulation(corpus, tmp_path):
    common = flags(corpus, tmp_path / "x", "--max_steps", 4, "--eval_interval", 0, "--log_interval", 1,
                   "--dtype", "float32", "--warmup_steps", 1)
    common = common[:common.index("--out_dir")] + common[common.index("--out_dir") + 2:]
    assert train.main([*common, "--out_dir", str(tmp_path / "single"), "--grad_accum", "2"]) == 0
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *common, "--out_dir", str(tmp_path / "ddp")],
                         cwd=os.path.dirname(train.__file__), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = [r["train_loss"] for r in metrics(tmp_path / "single")]
    two = [r["train_loss"] for r in metrics(tmp_path / "ddp")]
    assert len(single) == len(two) == 4
    assert single == pytest.approx(two, abs=1e-5)
    assert single[0] != single[-1]


def test_unknown_flag_suggests_the_closest():
    out = run_cli(["--n_layers", "3"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "train.py: unknown flag --n_layers; did you mean --n_layer?"


def test_help_explains_every_flag():
    out = run_cli(["--help"])
    assert out.returncode == 0
    for f in train.fields(train.TrainConfig):
        assert f"--{f.name}" in out.stdout
    assert "--n_layer" in out.stdout and "default: 'tiny'" in out.stdout


def test_resume_with_different_config_lists_the_fields(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path, "--max_steps", 2, "--eval_interval", 0)) == 0
    out = run_cli(["--resume", str(tmp_path), "--lr", "0.5", "--n_layer", "3"])
    assert out.returncode == 2
    assert "cannot resume with a different configuration" in out.stderr
    assert "lr: checkpoint has 0.01, given 0.5" in out.stderr and "n_layer: checkpoint has 2, given 3" in out.stderr


def test_nan_loss_stops_and_names_the_last_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    # the model's 6th training forward (step 5) returns a NaN loss: the guard must stop before the update
    forward, calls = train.MiniCPM.forward, []

    def nan_at_step_5(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if self.training:
            calls.append(1)
            if len(calls) == 6:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(train.MiniCPM, "forward", nan_at_step_5)
    code = train.main(flags(corpus, tmp_path, "--max_steps", 10, "--ckpt_interval", 2, "--eval_interval", 0))
    assert code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and str(tmp_path / "ckpt.pt") in err
    assert checkpoint.load(str(tmp_path))["step"] == 4      # the last good one, untouched


def test_sigterm_saves_a_checkpoint_and_exits(corpus, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *flags(corpus, tmp_path, "--max_steps", 100000,
                             "--eval_interval", 0, "--log_interval", 1, "--ckpt_interval", 100000)],
                            cwd=os.path.dirname(train.__file__), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl") and
                                          os.path.getsize(tmp_path / "metrics.jsonl") > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = checkpoint.load(str(tmp_path))["step"]
    assert step >= 1 and f"stopped by signal at step {step}" in out


def test_decay_only_branch_from_a_stable_checkpoint(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path / "stable", "--max_steps", 6, "--schedule", "constant",
                            "--warmup_steps", 2, "--eval_interval", 0)) == 0
    assert train.main(flags(corpus, tmp_path / "decay", "--init_from", tmp_path / "stable", "--decay_only",
                            "--decay_steps", 5, "--eval_interval", 0, "--log_interval", 1)) == 0
    lrs = [r["lr"] for r in metrics(tmp_path / "decay")]
    assert lrs == pytest.approx([0.01 * 0.02 ** (s / 5) for s in range(5)], rel=1e-12)


def test_dry_run_plans_the_real_2_4b_without_allocating(tmp_path):
    t = time.time()
    out = run_cli(["--preset", "minicpm-2.4b", "--dry_run", "--dry_run_gpus", "8", "--batch_size", "1",
                   "--seq_len", "4096", "--grad_accum", "128", "--data_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert "2,442,057,984 non-embedding" in out.stdout
    assert "= 4,194,304 tokens per step" in out.stdout          # the paper's ~4M-token batch
    assert time.time() - t < 60 and not os.listdir(tmp_path)     # nothing prepared, nothing allocated


def test_bench_reports_throughput(corpus, tmp_path):
    out = run_cli(flags(corpus, tmp_path, "--bench", "--max_steps", 6))
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "% of" in out.stdout


def test_branched_decay_with_default_flags_equals_the_planned_run(corpus, tmp_path):
    """§4.3: a stable trunk (constant lr) resumed with a WSD decay is bitwise the run planned with that
    decay from the start, with every schedule default in play (warmup, decay length, final lr)."""
    assert train.main(flags(corpus, tmp_path / "planned", "--max_steps", 24, "--eval_interval", 12,
                            "--log_interval", 1)) == 0
    assert train.main(flags(corpus, tmp_path / "trunk", "--schedule", "constant", "--max_steps", 22,
                            "--eval_interval", 12, "--log_interval", 1)) == 0
    # the default decay of a 24-step run is its last 10%: from step 22; branch a copy of the trunk there
    import shutil
    shutil.copytree(tmp_path / "trunk", tmp_path / "branch")
    assert train.main(["--resume", str(tmp_path / "branch"), "--schedule", "wsd", "--max_steps", "24"]) == 0
    planned, branch = metrics(tmp_path / "planned"), metrics(tmp_path / "branch")
    keys = ("step", "lr", "train_loss", "grad_norm")   # (the trunk also evaluated at its own end, step 22)
    assert [[r.get(k) for k in keys] for r in branch] == [[r.get(k) for k in keys] for r in planned]
    assert branch[-1]["val_loss"] == planned[-1]["val_loss"]
    assert planned[-1]["lr"] < 0.01 and planned[16]["lr"] == 0.01   # (row 0 is the evaluation at step 0)


def test_a_new_run_never_replaces_an_existing_one(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path / "a", "--max_steps", 2, "--eval_interval", 0)) == 0
    before = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")}
    out = run_cli(flags(corpus, tmp_path / "a", "--max_steps", 3, "--eval_interval", 0))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "already holds a run" in out.stderr and "--resume" in out.stderr and "--overwrite" in out.stderr
    assert {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")} == before
    assert train.main(flags(corpus, tmp_path / "a", "--max_steps", 3, "--eval_interval", 0, "--overwrite")) == 0
    assert checkpoint.load(str(tmp_path / "a"))["step"] == 3


def test_resume_into_another_folder_keeps_both_histories(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path / "a", "--max_steps", 6, "--stop_at", 3, "--eval_interval", 0,
                            "--log_interval", 1)) == 0
    a_metrics = (tmp_path / "a" / "metrics.jsonl").read_bytes()
    assert train.main(["--resume", str(tmp_path / "a"), "--out_dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == a_metrics          # A untouched
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]       # B: A's history, then on
    assert checkpoint.load(str(tmp_path / "a"))["step"] == 3 and checkpoint.load(str(tmp_path / "b"))["step"] == 6


def test_validation_covers_the_whole_split_when_asked(corpus, tmp_path):
    """--eval_tokens 0: the loss over every consecutive window of val.bin, recomputed here by hand
    with plain cross-entropy on the saved model."""
    assert train.main(flags(corpus, tmp_path, "--max_steps", 2, "--eval_interval", 2, "--eval_tokens", 0,
                            "--batch_size", 64)) == 0
    ckpt = checkpoint.load(str(tmp_path))
    model = checkpoint.build_model(ckpt).eval()
    import numpy as np
    import data
    val_bin = os.path.join(corpus["data_dir"], data.default_name(corpus["source"], "byte"), "val.bin")
    ids = np.fromfile(val_bin, dtype=np.uint16).astype(np.int64)
    n = (len(ids) - 1) // 32
    windows = torch.from_numpy(np.stack([ids[i * 32:i * 32 + 33] for i in range(n)]))   # consecutive, all of it
    with torch.no_grad():
        logits = torch.cat([model(w[:, :-1])[0] for w in windows.split(512)])
    total = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    assert metrics(tmp_path)[-1]["val_loss"] == pytest.approx((total / (n * 32)).item(), rel=1e-5)
    assert data.eval_windows(val_bin, 32, 0).shape == (n, 33)


def test_checkpoints_from_older_versions_with_attn_impl_still_load(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path / "old", "--max_steps", 2, "--eval_interval", 0)) == 0
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["attn_impl"] = "triton"            # as runs with --attn triton used to save
    ckpt["train_config"] = ckpt.pop("config")               # and the old name of the flags
    del ckpt["kind"]
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    assert train.main(["--resume", str(tmp_path / "old"), "--max_steps", "3"]) == 0
    assert train.main(flags(corpus, tmp_path / "new", "--init_from", tmp_path / "old", "--max_steps", 1,
                            "--eval_interval", 0)) == 0


def test_triton_attention_on_a_cpu_is_one_line(corpus, tmp_path):
    out = run_cli(flags(corpus, tmp_path, "--attn", "triton", "--device", "cpu", "--max_steps", 2))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "--attn triton needs a CUDA GPU" in out.stderr and not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- context extension (§7.2)

def test_untie_head_starts_as_the_embedding_and_then_trains_on_its_own(corpus, tmp_path):
    assert train.main(flags(corpus, tmp_path / "base", "--max_steps", 4, "--eval_interval", 4)) == 0
    assert train.main(flags(corpus, tmp_path / "untied", "--init_from", tmp_path / "base", "--untie_head",
                            "--max_steps", 3, "--eval_interval", 3)) == 0
    # at the branch the function is unchanged: the same validation loss, to the last bit
    base_final = [r["val_loss"] for r in metrics(tmp_path / "base") if "val_loss" in r][-1]
    assert [r["val_loss"] for r in metrics(tmp_path / "untied") if "val_loss" in r][0] == base_final
    ckpt = checkpoint.load(str(tmp_path / "untied"))
    assert ckpt["model_config"]["tie_word_embeddings"] is False
    head, embedding = ckpt["model"]["lm_head.weight"], ckpt["model"]["model.embed_tokens.weight"]
    assert not torch.equal(head, embedding)   # three steps later: two tensors, trained apart
    # muP for the new tensor: the embedding's rule (lr not divided by m, weight decay, the embedding's
    # init class), so at the branch it moves as the tied matrix it came from moved
    model = checkpoint.build_model(ckpt)
    groups = {g["name"]: g for g in model.param_groups(0.01, 0.1)}
    assert any(p is model.lm_head.weight for p in groups["embedding"]["params"])
    assert groups["embedding"]["lr_scale"] == 1.0 and groups["embedding"]["weight_decay"] == 0.1


def test_continued_training_at_a_longer_context_with_a_new_rope_base(corpus, tmp_path, capsys):
    # SMALL_MODEL has block_size 64 and seq_len 32: continue at 128 tokens with ABF's larger base
    assert train.main(flags(corpus, tmp_path / "base", "--max_steps", 3, "--eval_interval", 0)) == 0
    longer = ["--init_from", tmp_path / "base", "--rope_theta", 160000, "--block_size", 256, "--seq_len", 128,
              "--max_steps", 2, "--eval_interval", 2, "--grad_ckpt"]
    assert train.main(flags(corpus, tmp_path / "plan", *longer, "--dry_run")) == 0
    assert "x 128 tokens" in capsys.readouterr().out          # the plan is for the new length
    assert train.main(flags(corpus, tmp_path / "long", *longer[:-1])) == 0   # flags() puts seq_len 32 first: 128 wins
    config = checkpoint.load(str(tmp_path / "long"))["model_config"]
    assert (config["rope_theta"], config["block_size"]) == (160000, 256)
    assert all(r["val_loss"] < 10 for r in metrics(tmp_path / "long") if "val_loss" in r)
