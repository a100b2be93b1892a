"""Tests of train.py --fsdp (FSDP2 through parallel.shard) and of sharded checkpoints (checkpoint.py,
torch.distributed.checkpoint): two gloo processes under torchrun against one process with the same
global batch (2 x 1 micro-batch = 1 x 2), which is the independent reference: no sharding, no DCP.
Every torchrun has a timeout that kills its whole process group, so a hang fails instead of blocking."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import export
import train
from conftest import ROOT, SMALL_MODEL, metrics

MOE = ["--n_experts", "4", "--top_k", "2"]
# the bound, relative: losses near 7 are float32 numbers 4.8e-7 apart, and sums taken in another
# order (a reduce-scatter's mean instead of accumulation) move them by an ulp or two
TOL = 1e-6


def close(a, b):
    return all(abs(x - y) <= TOL * abs(y) for x, y in zip(a, b))


def flags(corpus, out_dir, *extra):
    # fp32 (the CPU default would be too, said explicitly), losses logged every step, two evaluations
    return ["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"],
            "--out_dir", str(out_dir), *SMALL_MODEL, "--eval_tokens", "512", "--dtype", "float32",
            "--max_steps", "4", "--warmup_steps", "1", "--log_interval", "1", "--eval_interval", "2",
            *map(str, extra)]


def torchrun(args, nproc=2, timeout=300):
    """train.py under torchrun; -> stderr. Fails on a non-zero exit, an abort at exit, or a hang."""
    # a new session, so a timeout kills torchrun and its workers together (no orphan holding a port)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s")
    # the DDP lesson: a worker aborting at exit (SIGABRT in teardown) fails the run even after training
    assert proc.returncode == 0 and "Signal 6" not in err, err[-3000:]
    return err


def losses(out_dir, key="train_loss"):
    return [r[key] for r in metrics(out_dir) if key in r]


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_fsdp_equals_one_process(corpus, tmp_path, model):
    # the MoE with activation checkpointing too: FSDP gathers a layer again for its recomputation
    extra = [*MOE, "--grad_ckpt"] if model == "moe" else []
    assert train.main(flags(corpus, tmp_path / "one", "--grad_accum", 2, *extra)) == 0
    torchrun(flags(corpus, tmp_path / "fsdp", "--fsdp", *extra))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(one) == len(two) == 4 and one[0] != one[-1]   # 4 steps that learned something
    assert close(one, two)
    print(f"{model}: max |train loss difference| over 4 steps {max(abs(a - b) for a, b in zip(one, two)):.2e}")
    # validation: 16 windows, all on rank 0's share, so rank 1 runs its padding forward (weight 0)
    # (relative: a few float32 ulps of a loss near 5, from sums in another order)
    assert losses(tmp_path / "one", "val_loss") == pytest.approx(losses(tmp_path / "fsdp", "val_loss"), rel=TOL)
    assert os.path.isfile(tmp_path / "fsdp" / "sharded" / "LATEST")   # a sharded checkpoint, no ckpt.pt
    assert not os.path.exists(tmp_path / "fsdp" / "ckpt.pt")



def test_fsdp_with_compile_equals_one_process(corpus, tmp_path):
    # each layer compiled before it is sharded (parallel.shard), against one compiled process. About
    # 40 s of the suite: inductor compiles C++ for each of the 3 processes.
    assert train.main(flags(corpus, tmp_path / "one", "--grad_accum", 2, "--compile")) == 0
    torchrun(flags(corpus, tmp_path / "fsdp", "--fsdp", "--compile"))
    assert close(losses(tmp_path / "fsdp"), losses(tmp_path / "one")) and len(losses(tmp_path / "fsdp")) == 4

def test_sharded_resume_on_two_and_one_process_and_conversion(corpus, tmp_path):
    # the reference: one process, uninterrupted, 2 micro-batches per step
    assert train.main(flags(corpus, tmp_path / "ref", "--grad_accum", 2, *MOE)) == 0
    torchrun(flags(corpus, tmp_path / "two", "--fsdp", "--stop_at", 2, *MOE))
    assert sorted(os.listdir(tmp_path / "two" / "sharded")) == ["LATEST", "step_00000002"]
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    # on 2 processes: the flags come from the checkpoint (--fsdp included)
    torchrun(["--resume", str(tmp_path / "two")])
    # on 1 process, no FSDP: DCP assembles the slices; the global batch kept by --grad_accum 2
    assert train.main(["--resume", str(tmp_path / "one"), "--fsdp", "false", "--grad_accum", "2"]) == 0
    ref = losses(tmp_path / "ref")
    for run in ("two", "one"):
        assert len(losses(tmp_path / run)) == 4
        assert close(losses(tmp_path / run), ref), run
        print(f"resumed on {run}: max |loss difference| {max(abs(a - b) for a, b in zip(ref, losses(tmp_path / run))):.2e}")
    # the one-process resume wrote a ckpt.pt, replacing the sharded checkpoint (one per folder)
    assert os.listdir(tmp_path / "one").count("sharded") == 0

    # conversion: the sharded run at step 4 -> ckpt.pt, against the reference's own ckpt.pt
    assert export.main(["--ckpt", str(tmp_path / "two"), "--out", str(tmp_path / "conv"), "--single"]) == 0
    conv, want = torch.load(tmp_path / "conv" / "ckpt.pt"), torch.load(tmp_path / "ref" / "ckpt.pt")
    assert conv["step"] == want["step"] == 4 and conv["model"].keys() == want["model"].keys()
    for k, w in want["model"].items():
        torch.testing.assert_close(conv["model"][k], w, atol=1e-5, rtol=0, msg=k)
    print(f"conversion: max |weight difference| {max((conv['model'][k] - w).abs().max().item() for k, w in want['model'].items()):.2e}")
    for i, s in want["optimizer"]["state"].items():   # Adam's moments, parameter by parameter
        torch.testing.assert_close(conv["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], atol=1e-8, rtol=1e-3)
    assert [g["lr_scale"] for g in conv["optimizer"]["param_groups"]] == [g["lr_scale"] for g in want["optimizer"]["param_groups"]]
    # and a Hugging Face folder straight from the sharded checkpoint
    assert export.main(["--ckpt", str(tmp_path / "two"), "--out", str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "config.json")


def test_resume_with_another_global_batch_is_refused(corpus, tmp_path, capsys):
    assert train.main(flags(corpus, tmp_path, "--grad_accum", 2, "--stop_at", 1, "--fsdp")) == 0   # 1 process: sharded files
    assert checkpoint.sharded_folder(str(tmp_path))
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path), "--grad_accum", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grad_accum" in err[0] and "256 tokens per step" in err[0]


def test_dry_run_fsdp_memory_per_gpu(capsys):
    # hand values: minicpm-2.4b has 2,724,880,896 parameters; fp32 weights over 8 GPUs = 4 n / 8 bytes
    assert train.main(["--preset", "minicpm-2.4b", "--dry_run", "--fsdp", "--dry_run_gpus", "8", "--data_dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 8" in out and f"weights {4 * 2_724_880_896 / 8 / 2**30:.2f} GiB" in out
    assert f"Adam {8 * 2_724_880_896 / 8 / 2**30:.2f} GiB" in out


def test_peak_tflops_sets_the_mfu_denominator(corpus, tmp_path, capsys):
    assert train.main(flags(corpus, tmp_path, "--bench", "--peak_tflops", "2")) == 0
    assert "of 2.000 TFLOP/s (--peak_tflops)" in capsys.readouterr().out


def test_fsdp_refuses_float16(capsys):
    assert train.main(["--fsdp", "--dtype", "float16", "--dry_run"]) == 2
    assert "--fsdp takes --dtype bfloat16 or float32" in capsys.readouterr().err


def test_ckpt_pt_resumes_under_fsdp(corpus, tmp_path):
    # a one-process run's ckpt.pt (optimizer keyed by position) continued by 2 sharded processes: the
    # moments are renamed by parameter (checkpoint.optimizer_by_name), then each rank keeps its slices
    assert train.main(flags(corpus, tmp_path / "ref", "--grad_accum", 2)) == 0
    assert train.main(flags(corpus, tmp_path / "run", "--grad_accum", 2, "--stop_at", 2)) == 0
    torchrun(["--resume", str(tmp_path / "run"), "--fsdp", "--grad_accum", "1"])
    assert close(losses(tmp_path / "run"), losses(tmp_path / "ref")) and len(losses(tmp_path / "run")) == 4
    # the sharded checkpoint replaced the ckpt.pt: a run folder holds one checkpoint, the newest
    assert checkpoint.sharded_folder(str(tmp_path / "run")) and not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_crash_while_saving_keeps_the_last_sharded_checkpoint(corpus, tmp_path, monkeypatch):
    assert train.main(flags(corpus, tmp_path, "--fsdp", "--stop_at", 1)) == 0
    real_save = checkpoint.dcp.save

    def disk_full(state, checkpoint_id, **kw):   # the slices written, then the disk fills up
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.dcp, "save", disk_full)
    assert train.main(["--resume", str(tmp_path), "--stop_at", "2"]) == 1   # cli.py: an OS error exits 1
    monkeypatch.undo()
    # LATEST still names step 1, whose folder is whole: the resume starts from it
    assert open(tmp_path / "sharded" / "LATEST").read() == "step_00000001"
    assert checkpoint.load(str(tmp_path))["step"] == 1
    assert train.main(["--resume", str(tmp_path)]) == 0
    # a step folder deleted by hand: one line naming the folder, not a traceback from DCP
    shutil.rmtree(tmp_path / "sharded" / open(tmp_path / "sharded" / "LATEST").read())
    with pytest.raises(checkpoint.UsageError, match="cannot read the sharded checkpoint"):
        checkpoint.load(str(tmp_path))
