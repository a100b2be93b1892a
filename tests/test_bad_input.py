"""Bad input across the four scripts: each case must end with its exit code and one line on stderr
naming the problem (no traceback), and leave the files of a prior run in the target folder
byte-identical. Run in-process (each script's main), so the whole battery takes seconds."""
import base64
import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import chat
import checkpoint
import data
import dpo
import eval as evaluate
import export
import sample
import train
from conftest import ROOT, SMALL_MODEL

MC = '{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}\n' * 3
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.fixture(scope="module")
def prior(corpus, tmp_path_factory):
    """A finished small run (its folder is the target of every train.py case, with --overwrite: even
    then, bad input must not touch it), broken HF folders and checkpoints, and a few odd files."""
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
    odd_files(root, run)
    return dict(root=root, run=run, common=common)


class Payload:
    """Unpickled, it would run os.mkdir(path): the marker that code ran."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def odd_files(root, run):
    """Edited checkpoints, broken copies of a real Hugging Face export, and malformed task/chat/data files."""
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for name, edit in [("extra", dict(model_config={**ckpt["model_config"], "bogus_key": 3})), ("kind", dict(kind="sft2")),
                       ("dyn", dict(model_config={**ckpt["model_config"], "rope_scaling": "dynamic", "rope_factor": 2.0}))]:
        (root / name).mkdir()
        torch.save({**ckpt, **edit}, root / name / "ckpt.pt")
    assert export.main(["--ckpt", str(run), "--out", str(root / "hfgood"), "--llama"]) == 0   # model.safetensors
    config = json.loads((root / "hfgood" / "config.json").read_text())
    for name, text in [("hflist", "[1, 2]"), ("hfheads", json.dumps({**config, "num_attention_heads": 0})),
                       ("hfneg", json.dumps({**config, "num_hidden_layers": -2})),
                       ("hfst", None), ("hfnoweights", None)]:
        shutil.copytree(root / "hfgood", root / name)
        if text:
            (root / name / "config.json").write_text(text)
    (root / "evil").mkdir()   # security: a pickle whose loading would make the folder `pwned`
    torch.save({"model": Payload(str(root / "pwned")), "model_config": {}, "step": 0}, root / "evil" / "ckpt.pt")
    os.unlink(root / "hfnoweights" / "model.safetensors")
    shutil.copytree(root / "hfnoweights", root / "hfevil")
    shutil.copyfile(root / "evil" / "ckpt.pt", root / "hfevil" / "pytorch_model.bin")
    st = root / "hfst" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])                       # cut short, as an interrupted download is
    files = {"mc_bad.jsonl": '{"question": "q", "choices": ["a"], "answer": 0}\n{oops\n', "mc_num.jsonl": "5\n",
             "mc_shape.jsonl": '{"question": "q", "choices": ["a", "b"], "answer": 7}\n', "mc_one.jsonl": MC,
             "exact_bad.jsonl": '{"prompt": 3, "answer": "x"}\n', "exact.jsonl": '{"prompt": "a", "answer": "b"}\n',
             "chat_bad.jsonl": CHAT + "{oops\n", "chat_empty.jsonl": CHAT.replace('"hello"', '"  "'),
             "chat_role.jsonl": CHAT.replace('"user"', '"robot"'), "chat_twice.jsonl": CHAT.replace('"assistant"', '"user"'),
             "chat_gpt.jsonl": '{"conversations": [{"from": "alien", "value": "x"}]}\n', "chat_list.jsonl": "[1, 2]\n",
             "ranks.tiktoken": "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)),
             "ranks_bad.tiktoken": "not a rank file at all\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    for name, body in [("parquet", {"x.parquet": b"PAR1 not really"}), ("gz", {"x.jsonl.gz": gzip.compress(b"{}" * 99)[:20]}),
                       ("nofield", {"x.jsonl": b'{"body": "some text"}\n' * 3}), ("badjson", {"x.jsonl": b'{"text": "a"}\n{oops\n'})]:
        (root / ("src_" + name)).mkdir()
        for file, data_ in body.items():
            (root / ("src_" + name) / file).write_bytes(data_)


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
    (["--resume", "RUN", "--init_from", "RUN"], "at most one of"), (["--decay_only"], "go with --init_from"), (["--untie_head"], "go with --init_from"),
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
        root = os.access(ro, os.W_OK)
        if root:   # root ignores permissions: simulate the refusal instead, where the folder is first written
            monkeypatch.setattr(checkpoint, "start_run_folder", lambda *a, **k: (_ for _ in ()).throw(
                PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ro))))
        code = train.main([*prior["common"], "--out_dir", str(ro), "--max_steps", "2", "--eval_interval", "0"])
        check_one_line(capsys, code, 1 if root else 2, str(ro))   # not root: refused up front, by check_run_folder
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


# ----------------------------------------------------------------------------- the second battery (issue 31)
# Each case: (class, flags, what the one line must name[, exit code]). The class says what the case
# guards against: S security (a file that would run code when loaded; tests/test_security.py has the
# sharded .metadata and every other loader path), T a traceback (a value that passed the parser and broke the code), D
# damage to files the user already had, N silent nonsense (exit 0 on a meaningless request), R a
# resource request that cannot fit. {root}/{run}/{tmp}/{corpus} are filled in per case.
BASES = {  # entry point -> (main, the flags every case starts from)
    "train": (train.main, ["{common}", "--out_dir", "{run}", "--overwrite", "--eval_tokens", "256"]),
    "sample": (sample.main, ["--ckpt", "{run}"]), "export": (export.main, ["--ckpt", "{run}"]),
    "eval": (evaluate.main, ["--ckpt", "{run}", "--out", "{tmp}/r.jsonl"]),
    "chat": (chat.main, ["--data_dir", "{tmp}", "--tokenizer", "byte"]),
    "data": (data.main, ["--data_dir", "{tmp}", "--tokenizer", "byte", "--workers", "1", "--source", "{corpus}"]),
    "dpo": (dpo.main, ["--init_from", "{run}", "--out_dir", "{tmp}/dpo", "--max_len", "32"])}
CASES = {
    "train": [
        ("S", ["--init_from", "{root}/evil"], "cannot read checkpoint"), ("S", ["--resume", "{root}/evil"], "cannot read checkpoint"),
        ("S", ["--upcycle_from", "{root}/evil"], "cannot read checkpoint"), ("S", ["--init_from", "{root}/hfevil"], "pytorch_model.bin"),
        ("R", ["--batch_size", "100000000"], "--batch_size 100000000"), ("R", ["--batch_size", "10000000", "--seq_len", "64"], "GiB"), ("R", ["--n_embd", "100000000"], "parameters"),
        ("R", ["--n_layer", "10000000"], "parameters"), ("R", ["--ffn_dim", "1000000000"], "parameters"),
        ("T", ["--init_from", "{root}/extra"], "'bogus_key'"), ("T", ["--upcycle_from", "{root}/extra"], "'bogus_key'"),
        ("T", ["--resume", "{root}/kind"], "'sft2'"), ("T", ["--init_from", "{root}/hflist"], "hflist/config.json"),
        ("T", ["--init_from", "{root}/hfheads"], "num_attention_heads=0"), ("T", ["--init_from", "{root}/hfneg"], "num_hidden_layers=-2"),
        ("T", ["--init_from", "{root}/hfst"], "hfst/model.safetensors"), ("T", ["--init_from", "{root}/hfnoweights"], "hfnoweights"),
        ("T", ["--dim_model_base", "0"], "dim_model_base"), ("N", ["--init_std", "-1"], "init_std"),
        ("N", ["--grad_clip", "nan"], "--grad_clip nan"), ("N", ["--lr", "inf"], "--lr inf"), ("N", ["--lr", "nan"], "--lr nan"),
        ("N", ["--rope_theta", "inf"], "--rope_theta inf"), ("N", ["--norm_eps", "-1"], "norm_eps"),
        ("N", ["--decay_half_life", "-5"], "--decay_half_life"), ("N", ["--peak_tflops", "-5"], "--peak_tflops"),
        ("N", ["--warmup_steps", "50", "--max_steps", "2"], "--warmup_steps"), ("N", ["--adam_eps", "-1"], "--adam_eps"),
        ("N", ["--seed", "-1"], "--seed"), ("N", ["--seed", "123456789012345678901"], "--seed"),
        ("N", ["--stop_at", "-5"], "--stop_at"), ("N", ["--rope_scaling", "yarn"], "rope_scaling"),
        ("N", ["--rope_scaling", "linear", "--rope_factor", "0.5"], "rope_factor"), ("N", ["--n_experts", "4", "--top_k", "5"], "top_k"),
        ("N", ["--cosine_period", "5"], "--cosine_period"), ("N", ["--schedule", "cosine", "--decay_steps", "5"], "--decay_steps"),
        ("N", ["--fsdp", "--dtype", "float16"], "--fsdp"), ("T", ["--source", "{root}/src_badjson"], "x.jsonl:2"),
        ("D", ["--out_dir", "{root}/garbage.pt"], "garbage.pt"), ("D", ["--out_dir", "/proc/run"], "--out_dir /proc/run"), ("N", ["--eval_tokens", "1e3"], "--eval_tokens")],
    "sample": [
        ("S", ["--ckpt", "{root}/evil"], "cannot read checkpoint"), ("S", ["--hf", "{root}/hfevil"], "pytorch_model.bin"),
        ("N", ["--temperature", "nan"], "--temperature nan"), ("N", ["--temperature", "inf"], "--temperature inf"),
        ("N", ["--top_p", "nan"], "--top_p nan"), ("N", ["--num_samples", "-3"], "--num_samples"),
        ("R", ["--ckpt", "{root}/dyn", "--max_new_tokens", "999999999999"], "--max_new_tokens"),
        ("T", ["--ckpt", "{root}/extra"], "'bogus_key'"), ("T", ["--hf", "{root}/hflist"], "hflist/config.json"),
        ("T", ["--hf", "{root}/hfheads"], "num_attention_heads=0"), ("T", ["--hf", "{root}/hfneg"], "num_hidden_layers=-2"),
        ("T", ["--hf", "{root}/hfst"], "hfst/model.safetensors"), ("T", ["--hf", "{root}/hfnoweights"], "hfnoweights"),
        ("T", ["--tokenizer", "bpe:300@{root}/ranks.tiktoken"], "ranks.tiktoken holds 256 tokens"),
        ("T", ["--tokenizer", "bpe:300@/nonexistent/r.tiktoken"], "/nonexistent/r.tiktoken"),
        ("T", ["--tokenizer", "bpe:257@{root}/ranks_bad.tiktoken"], "ranks_bad.tiktoken"),
        ("T", ["--prompt", "@{root}/binary.jsonl"], "binary.jsonl"), ("T", ["--hf", "{root}/garbage.pt"], "garbage.pt")],
    "export": [
        ("S", ["--ckpt", "{root}/evil", "--out", "{tmp}/e"], "cannot read checkpoint"),
        ("S", ["--ckpt", "{root}/evil", "--gguf", "{tmp}/m.gguf"], "cannot read checkpoint"),
        ("D", ["--out", "{run}", "--overwrite"], "--out"), ("D", ["--out", "{root}", "--overwrite"], "holds the checkpoint"),
        ("D", ["--gguf", "{run}/ckpt.pt", "--overwrite"], "--gguf"), ("D", ["--out", "{run}/metrics.jsonl"], "is a file"),
        ("D", ["--ckpt", "{root}/hfgood", "--out", "{root}/hfgood", "--overwrite"], "hfgood"),
        ("D", ["--out", "{root}/hfgood"], "not empty"), ("N", ["--out", "{tmp}/e", "--dtype", "float8"], "--dtype"),
        ("N", ["--out", "{tmp}/e", "--single", "--llama"], "--single"), ("N", [], "--out is required"),
        ("T", ["--ckpt", "/nonexistent/run", "--out", "{tmp}/e"], "no checkpoint at"),
        ("T", ["--ckpt", "{root}/garbage.pt", "--out", "{tmp}/e"], "garbage.pt"),
        ("T", ["--ckpt", "{root}/extra", "--out", "{tmp}/e"], "'bogus_key'"),
        ("T", ["--ckpt", "{root}/hfheads", "--out", "{tmp}/e"], "num_attention_heads=0"),
        ("N", ["--gguf", "{tmp}/m.gguf", "--out", "{tmp}/e"], "drop --out"), ("N", ["--gguf", "{tmp}"], "is a folder"),
        ("D", ["--gguf", "{run}/metrics.jsonl"], "exists"), ("D", ["--out", "/proc/e"], "--out /proc/e"),
        ("D", ["--gguf", "/proc/m.gguf"], "--gguf /proc/m.gguf"), ("N", ["--gguf", "{tmp}/m.gguf", "--gguf_dtype", "q4"], "--gguf_dtype"),
        ("N", ["--gguf", "{tmp}/m.gguf", "--dtype", "bfloat16"], "--gguf_dtype"),
        ("T", ["--gguf", "{tmp}/m.gguf", "--ckpt", "{root}/hflist"], "hflist/config.json"),
        ("T", ["--gguf", "{tmp}/m.gguf", "--ckpt", "{root}/extra"], "'bogus_key'")],
    "eval": [
        ("N", ["--task", "unknown"], "--task 'unknown'"), ("N", ["--task", "mc:"], "--task 'mc:'"), ("N", [], "give --task"),
        ("T", ["--task", "mc:/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"), ("T", ["--task", "mc:{root}/mc_bad.jsonl"], "mc_bad.jsonl"),
        ("T", ["--task", "mc:{root}/mc_num.jsonl"], "mc_num.jsonl"), ("N", ["--task", "mc:{root}/mc_shape.jsonl"], "mc_shape.jsonl"),
        ("N", ["--task", "mc:{root}/mc_one.jsonl", "--num_fewshot", "3"], "--num_fewshot"),
        ("T", ["--task", "exact:/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
        ("T", ["--task", "exact:{root}/exact_bad.jsonl"], "exact_bad.jsonl"), ("T", ["--task", "exact:{root}/binary.jsonl"], "binary.jsonl"),
        ("D", ["--task", "mc:{root}/mc_one.jsonl", "--out", "{root}"], "--out"),
        ("D", ["--task", "mc:{root}/mc_one.jsonl", "--out", "/proc"], "--out /proc"),
        ("D", ["--task", "mc:{root}/mc_one.jsonl", "--out", "/proc/r.jsonl"], "--out /proc/r.jsonl"),
        ("D", ["--task", "mc:{root}/mc_one.jsonl", "--out", "/nonexistent/r.jsonl"], "--out /nonexistent/r.jsonl"),
        ("T", ["--task", "mc:{root}/mc_one.jsonl", "--ckpt", "/nonexistent/run"], "no checkpoint at"),
        ("T", ["--task", "mc:{root}/mc_one.jsonl", "--ckpt", "{root}/extra"], "'bogus_key'"),
        ("S", ["--task", "mc:{root}/mc_one.jsonl", "--ckpt", "{root}/evil"], "cannot read checkpoint"),
        ("T", ["--task", "mc:{root}/mc_one.jsonl", "--hf", "{root}/hfheads"], "num_attention_heads=0"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--samples", "2"], "--samples"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--temperature", "nan"], "--temperature nan"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--top_p", "0"], "--top_p"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--max_new_tokens", "0"], "--max_new_tokens"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--timeout", "0"], "--timeout"),
        ("N", ["--task", "exact:{root}/exact.jsonl", "--dtype", "float8"], "--dtype"),
        ("T", ["--data", "/nonexistent/ds"], "/nonexistent/ds"),
        ("R", ["--task", "exact:{root}/exact.jsonl", "--ckpt", "{root}/dyn", "--max_new_tokens", "999999999999"], "--max_new_tokens")],
    "chat": [
        ("T", ["--source", "{root}/chat_bad.jsonl"], "chat_bad.jsonl:2"), ("N", ["--source", "{root}/chat_empty.jsonl"], "chat_empty.jsonl:1"),
        ("N", ["--source", "{root}/chat_role.jsonl"], "chat_role.jsonl:1"), ("N", ["--source", "{root}/chat_twice.jsonl"], "chat_twice.jsonl:1"),
        ("N", ["--source", "{root}/chat_gpt.jsonl"], "'alien'"), ("T", ["--source", "{root}/chat_list.jsonl"], "chat_list.jsonl:1"),
        ("T", ["--source", "{root}/binary.jsonl"], "binary.jsonl"), ("T", ["--source", "/nonexistent/c.jsonl"], "/nonexistent/c.jsonl"),
        ("T", ["--source", "{root}/chat_empty.jsonl", "--tokenizer", "bpe:300", "--rank_file", "/nonexistent/r.tiktoken"], "/nonexistent/r.tiktoken"),
        ("T", ["--source", "{root}/chat_empty.jsonl", "--tokenizer", "bpe:300", "--rank_file", "{root}/ranks.tiktoken"], "ranks.tiktoken"),
        ("N", ["--tokenizer", "wordpiece:9"], "wordpiece:9"), ("N", ["--sourse", "x"], "did you mean --source")],
    "data": [
        ("N", ["--text_field", ""], "--text_field"), ("N", ["--chunk_mb", "0"], "--chunk_mb"), ("N", ["--chunk_mb", "-1"], "--chunk_mb"),
        ("N", ["--chunk_mb", "nan"], "--chunk_mb nan"), ("N", ["--bpe_sample_mb", "nan"], "--bpe_sample_mb nan"),
        ("T", ["--tokenizer", "bpe:300@{root}/ranks.tiktoken"], "ranks.tiktoken"),
        ("T", ["--tokenizer", "bpe:300@/nonexistent/r.tiktoken"], "/nonexistent/r.tiktoken"),
        ("T", ["--tokenizer", "bpe:257@{root}/ranks_bad.tiktoken"], "ranks_bad.tiktoken"),
        ("T", ["--source", "{root}/src_parquet"], "x.parquet"), ("T", ["--source", "{root}/src_gz"], "x.jsonl.gz"),
        ("N", ["--source", "{root}/src_nofield"], "x.jsonl"), ("T", ["--source", "{root}/src_badjson"], "x.jsonl:2"),
        # an operating-system error (exit 1), naming the path, before anything is written
        ("D", ["--data_dir", "{root}/garbage.pt"], "garbage.pt", 1), ("D", ["--data_dir", "/proc/d"], "/proc/d", 1)],
    "dpo": [
        ("S", ["--init_from", "{root}/evil"], "cannot read checkpoint"), ("S", ["--resume", "{root}/evil"], "cannot read checkpoint"),
        ("N", ["--beta", "nan"], "--beta nan"), ("N", ["--label_smoothing", "nan"], "--label_smoothing nan"),
        ("N", ["--val_frac", "inf"], "--val_frac inf"), ("T", ["--init_from", "{root}/extra"], "'bogus_key'"),
        ("T", ["--init_from", "{root}/hfheads"], "num_attention_heads=0"), ("T", ["--resume", "{root}/kind"], "'sft2'"),
        ("T", ["--resume", "{run}"], "written by train.py"), ("D", ["--out_dir", "/proc/dpo"], "--out_dir /proc/dpo"),
        ("D", ["--out_dir", "{root}/garbage.pt"], "garbage.pt"), ("D", ["--out_dir", "{run}"], "--init_from and --out_dir"), ("N", ["--hf", "{root}/hfgood"], "not both")],
}
BATTERY = [(entry, *case, 2)[:5] for entry, cases in CASES.items() for case in cases]   # exit 2 unless given


@pytest.mark.parametrize("entry,cls,flags,needle,code", BATTERY,
                         ids=[f"{e}-{c}-" + " ".join(f).replace("{", "").replace("}", "") for e, c, f, *_ in BATTERY])
def test_battery(prior, corpus, capsys, tmp_path, entry, cls, flags, needle, code):
    """One line naming the problem, exit 2, no traceback; the prior run and the output folder untouched."""
    main, base = BASES[entry]
    where = dict(root=prior["root"], run=prior["run"], tmp=tmp_path, corpus=corpus["source"])
    argv = [x for a in base + flags for x in (prior["common"] if a == "{common}" else [a.format(**where)])]
    before, inside = snapshot(prior["run"]), sorted(os.listdir(tmp_path))
    check_one_line(capsys, main(argv), code, needle.format(**where))
    assert snapshot(prior["run"]) == before and sorted(os.listdir(tmp_path)) == inside
    assert not (prior["root"] / "pwned").exists()   # no checkpoint ran code (S cases; checked after every case)


# Under torchrun every rank meets the same bad input; rank 0 alone prints it (cli.say), once. What
# follows is torchrun's own and out of our hands: its agent SIGTERMs the other ranks, logs "failed
# (exitcode: 2) local_rank: 0", then raises ChildFailedError, whose traceback and "train.py FAILED"
# summary (rank 0's exitcode 2 as the root cause) end stderr; torchrun itself exits 1 (torch 2.13).
@pytest.mark.slow   # two torchrun launches: ~12 s on an idle 2-core machine, 30 s+ when it is shared
@pytest.mark.parametrize("flags,needle", [(["--batch_size", "0"], "--batch_size"), (["--resume", "/nonexistent/run"], "no checkpoint at")])
def test_torchrun_bad_flag_is_said_once(flags, needle):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", "--device", "cpu", *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in done.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(ours) == 1 and needle in ours[0], done.stderr
    assert done.returncode == 1 and "exitcode  : 2" in done.stderr and not done.stdout.strip(), done.stderr
