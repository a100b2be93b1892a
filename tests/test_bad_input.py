"""Bad input across the four scripts: each case must end with its exit code and one line on stderr
naming the problem (no traceback), and leave the files of a prior run in the target folder
byte-identical. Run in-process (each script's main), so the whole battery takes seconds."""
import errno
import json
import os

import pytest
import torch

import checkpoint
import data
import dpo
import sample
import train
from conftest import SMALL_MODEL


@pytest.fixture(scope="module")
def prior(corpus, tmp_path_factory):
    """A finished small run (its folder is the target of every train.py case, with --overwrite: even
    then, bad input must not touch it), a broken HF folder, and a few odd files."""
    root = tmp_path_factory.mktemp("prior")
    run = root / "run"
    common = ["--source", corpus["source"], "--tokenizer", "byte", "--data_dir", corpus["data_dir"], *SMALL_MODEL]
    assert train.main([*common, "--out_dir", str(run), "--max_steps", "3", "--eval_tokens", "256",
                       "--eval_interval", "3"]) == 0
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{not json")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (root / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    return dict(root=root, run=run, common=common)


def snapshot(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def check_one_line(capsys, code, expected_code, needle):
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


TRAIN = [  # (flags, what the one line must contain)
    (["--batch_size", "0"], "--batch_size"), (["--seq_len", "0"], "--seq_len"), (["--grad_accum", "0"], "--grad_accum"),
    (["--max_steps", "0"], "--max_steps"), (["--log_interval", "0"], "--log_interval"),
    (["--ckpt_interval", "0"], "--ckpt_interval"), (["--eval_interval", "-1"], "--eval_interval"),
    (["--eval_tokens", "-5"], "--eval_tokens"), (["--lr", "0"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--beta1", "1.5"], "--beta1"), (["--beta2", "-0.1"], "--beta2"), (["--grad_clip", "-1"], "--grad_clip"),
    (["--weight_decay", "-1"], "--weight_decay"), (["--schedule", "onecycle"], "--schedule"),
    (["--decay_shape", "step"], "--decay_shape"), (["--attn", "flash"], "--attn"),
    (["--attn", "triton", "--device", "cpu"], "--attn triton needs a CUDA GPU"),
    (["--device", "tpu"], "--device tpu"), (["--dtype", "float8"], "--dtype"), (["--preset", "huge"], "unknown preset"),
    (["--n_layer", "0"], "n_layer must be positive"), (["--n_head", "5", "--n_kv_head", "5"], "n_head=5 does not divide"),
    (["--n_kv_head", "3"], "n_kv_head=3 does not divide"), (["--seq_len", "100000"], "longer than the model's block_size"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"), (["--init_from", "/nonexistent/run"], "no checkpoint at"),
    (["--upcycle_from", "/nonexistent/run"], "no checkpoint at"),
    (["--resume", "RUN", "--init_from", "RUN"], "at most one of"), (["--decay_only"], "--decay_only and --untie_head go with --init_from"), (["--untie_head"], "--untie_head go with --init_from"),
    (["--decay_half_life", "10", "--final_lr_frac", "0.1"], "half-life"),
    (["--decay_half_life", "10", "--decay_shape", "linear"], "half-life"), (["--final_lr_frac", "2"], "--final_lr_frac"),
    (["--warmup_steps", "100", "--decay_start", "50", "--max_steps", "200"], "decay_start"),
    (["--batch_size", "abc"], "--batch_size: invalid int value"), (["--nlayer", "3"], "did you mean --n_layer"),
    (["--mup", "maybe"], "expected true or false"), (["--source", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--tokenizer", "wordpiece:9"], "wordpiece:9"), (["--dry_run_gpus", "0"], "--dry_run_gpus"),
    (["--warmup_steps", "-5"], "--warmup_steps"), (["--decay_steps", "-5"], "--decay_steps"),
]


@pytest.mark.parametrize("flags,needle", TRAIN, ids=[" ".join(f) for f, _ in TRAIN])
def test_train_bad_input(prior, capsys, flags, needle):
    before = snapshot(prior["run"])
    flags = [str(prior["run"]) if f == "RUN" else f for f in flags]
    code = train.main([*prior["common"], "--out_dir", str(prior["run"]), "--overwrite", "--eval_tokens", "256", *flags])
    check_one_line(capsys, code, 2, needle)
    assert snapshot(prior["run"]) == before


RESUME = [  # a resume asked for something the saved run cannot do
    (["--max_steps", "2"], "already at the end of its 2 steps"), (["--lr", "0.5"], "--lr: checkpoint has 0.01, given 0.5"),
    (["--n_layer", "3"], "--n_layer: checkpoint has 2, given 3"), (["--seed", "7"], "--seed"),
]


@pytest.mark.parametrize("flags,needle", RESUME, ids=[" ".join(f) for f, _ in RESUME])
def test_resume_bad_input(prior, capsys, flags, needle):
    before = snapshot(prior["run"])
    check_one_line(capsys, train.main(["--resume", str(prior["run"]), *flags]), 2, needle)
    assert snapshot(prior["run"]) == before


def test_train_resume_of_a_garbage_file_and_of_another_scripts_checkpoint(prior, capsys, tmp_path):
    check_one_line(capsys, train.main(["--resume", str(prior["root"] / "garbage.pt")]), 2, "cannot read checkpoint")
    ckpt = torch.load(prior["run"] / "ckpt.pt", weights_only=True)
    ckpt["kind"] = "dpo"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    check_one_line(capsys, train.main(["--resume", str(tmp_path)]), 2, "written by dpo.py")


SAMPLE = [
    (["--num_samples", "0"], "--num_samples"), (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--temperature", "-1"], "--temperature"), (["--top_k", "-1"], "--top_k"), (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"), (["--dtype", "float8"], "--dtype"), (["--ckpt", "/nonexistent/run"], "no checkpoint at"),
    (["--hf", "/nonexistent/hf"], "/nonexistent/hf"), (["--hf", "HF"], "config.json"),
    (["--prompt", "@/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"), (["--tokenizer", "wordpiece:9"], "wordpiece:9"),
    (["--device", "tpu"], "--device tpu"), (["--tempreature", "1"], "did you mean --temperature"),
    (["--ckpt", "GARBAGE"], "cannot read checkpoint"),
]


@pytest.mark.parametrize("flags,needle", SAMPLE, ids=[" ".join(f) for f, _ in SAMPLE])
def test_sample_bad_input(prior, capsys, flags, needle):
    before = snapshot(prior["run"])
    flags = [{"HF": str(prior["root"] / "hf"), "GARBAGE": str(prior["root"] / "garbage.pt")}.get(f, f) for f in flags]
    check_one_line(capsys, sample.main(["--ckpt", str(prior["run"]), *flags]), 2, needle)
    assert snapshot(prior["run"]) == before


DPO = [
    (["--batch_size", "0"], "--batch_size"), (["--eval_interval", "-1"], "--eval_interval"),
    (["--max_steps", "0"], "--max_steps"), (["--beta", "0"], "--beta"), (["--label_smoothing", "0.6"], "--label_smoothing"),
    (["--val_frac", "1.5"], "--val_frac"), (["--data", "/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
    (["--data", "BINARY"], "binary.jsonl"), (["--data", "BAD"], "bad.jsonl:1"),
    (["--init_from", "/nonexistent/run"], "no checkpoint at"), (["--device", "tpu"], "--device tpu"),
    (["--bta", "0.1"], "did you mean --beta"),
]


@pytest.mark.parametrize("flags,needle", DPO, ids=[" ".join(f) for f, _ in DPO])
def test_dpo_bad_input(prior, capsys, flags, needle, tmp_path):
    out = tmp_path / "dpo"
    flags = [{"BINARY": str(prior["root"] / "binary.jsonl"), "BAD": str(prior["root"] / "bad.jsonl")}.get(f, f)
             for f in flags]
    before = snapshot(prior["run"])
    check_one_line(capsys, dpo.main(["--init_from", str(prior["run"]), "--out_dir", str(out), "--max_len", "32", *flags]),
                   2, needle)
    assert snapshot(prior["run"]) == before and not out.exists()


DATA = [
    (["--tokenizer", "wordpiece:9"], "wordpiece:9"), (["--source", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--workers", "-1"], "--workers"), (["--sourse", "x"], "did you mean --source"),
    (["--bpe_sample_mb", "0"], "--bpe_sample_mb"), (["--workers", "two"], "--workers: invalid int value"),
]


@pytest.mark.parametrize("flags,needle", DATA, ids=[" ".join(f) for f, _ in DATA])
def test_data_bad_input(capsys, flags, needle, tmp_path):
    check_one_line(capsys, data.main(["--data_dir", str(tmp_path), *flags]), 2, needle)
    assert not os.listdir(tmp_path)


def test_failed_preparation_keeps_the_old_dataset_whole(corpus, tmp_path, capsys):
    """--force with a source that fails half-way: the old dataset stays byte-identical, and no
    partial dataset or temporary file is left beside it."""
    old = data.prepare(corpus["source"], "byte", data_dir=str(tmp_path), name="d", quiet=True, workers=1)
    before = snapshot(old)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    code = data.main(["--source", str(bad), "--tokenizer", "byte", "--data_dir", str(tmp_path), "--name", "d", "--force",
                      "--workers", "1"])
    check_one_line(capsys, code, 2, "a.jsonl:2")
    assert snapshot(old) == before
    assert sorted(os.listdir(tmp_path)) == ["bad", "d"]


def test_disk_full_and_read_only_are_one_line_and_keep_the_last_checkpoint(prior, capsys, monkeypatch, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(prior["run"], run)
    before = snapshot(run)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):   # the checkpoint's write fails the way a full disk does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f.name) if hasattr(f, "name") else None)
    monkeypatch.setattr(torch, "save", full_disk)
    code = train.main(["--resume", str(run), "--max_steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()   # (above it, the progress bar of the one step)
    assert code == 1 and "No space left on device" in err[-1] and err[-1].startswith("train.py: ")
    assert not any("Traceback" in line for line in err)
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / "ckpt.pt").read_bytes() == before["ckpt.pt"]           # the last good checkpoint, intact
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]     # and no temporary left behind
    # a folder the run may not write into
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):   # root ignores permissions: simulate the refusal instead
            monkeypatch.setattr(checkpoint, "start_run_folder", lambda *a, **k: (_ for _ in ()).throw(
                PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ro))))
        code = train.main([*prior["common"], "--out_dir", str(ro), "--max_steps", "2", "--eval_interval", "0"])
        check_one_line(capsys, code, 1, str(ro))
    finally:
        os.chmod(ro, 0o700)


def test_stale_temporary_files_are_removed_at_the_next_start(prior, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(prior["run"], run)
    (run / ".tmp-abc123").write_bytes(b"\0" * 1000)     # what kill -9 during a checkpoint write leaves
    assert train.main(["--resume", str(run), "--max_steps", "4"]) == 0
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert checkpoint.load(str(run))["step"] == 4


def test_outputs_get_the_usual_permissions(prior):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("ckpt.pt", "metrics.jsonl", "data_meta.json"):
        assert os.stat(prior["run"] / name).st_mode & 0o777 == 0o666 & ~mask, name
    assert json.loads((prior["run"] / "data_meta.json").read_text())["tokenizer"] == "byte"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with CUDA, --device cuda is valid")
@pytest.mark.parametrize("script", ["train", "sample", "dpo"])
def test_device_cuda_without_a_gpu_is_one_line(prior, capsys, script, tmp_path):
    before = snapshot(prior["run"])
    main, args = {"train": (train.main, [*prior["common"], "--out_dir", str(prior["run"]), "--overwrite"]),
                  "sample": (sample.main, ["--ckpt", str(prior["run"])]),
                  "dpo": (dpo.main, ["--init_from", str(prior["run"]), "--out_dir", str(tmp_path / "d")])}[script]
    check_one_line(capsys, main([*args, "--device", "cuda"]), 2, "no CUDA GPU")
    assert snapshot(prior["run"]) == before


def test_corrupt_metrics_line_on_resume_names_the_file_and_line(prior, capsys, tmp_path):
    # a bad line inside the history is damage: refused, naming it; a cut-short LAST line is what a
    # full disk or a kill mid-append leaves: dropped with a note, and the resume goes on
    import shutil
    run = tmp_path / "run"
    shutil.copytree(prior["run"], run)
    good = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(good[:1] + ["{half a line\n"] + good[1:]))
    before = snapshot(run)
    check_one_line(capsys, train.main(["--resume", str(run), "--max_steps", "4"]), 2, "metrics.jsonl:2")
    assert snapshot(run) == before
    (run / "metrics.jsonl").write_text("".join(good) + '{"step": 4, "tok')   # torn while appending
    assert train.main(["--resume", str(run), "--max_steps", "4"]) == 0
    assert "metrics.jsonl:%d was cut short" % (len(good) + 1) in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 4
