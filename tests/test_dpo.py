"""Tests of dpo.py and preference.py: the DPO loss against hand computations, response-only log-probs, collate's masking
and left truncation, learning on the default task, its own checkpoint kind (exact resume, SIGTERM,
old checkpoints, other scripts on it) and clear command-line errors."""
import copy
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, fields

import pytest
import torch

import checkpoint
import hf
import data
import dpo
import preference
import train
from conftest import small_config
from minicpm import MiniCPM


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    torch.manual_seed(0)
    model = MiniCPM(small_config())
    pairs = [dict(prompt=[1, 2, 3], chosen=[4, 5], rejected=[6, 7, 8]), dict(prompt=[9], chosen=[10, 11, 12], rejected=[13])]
    ids, labels = preference.collate(pairs, max_len=16, pad_id=0, bos_id=0)
    pol = dpo.sequence_logps(model, ids, labels)
    with torch.no_grad():   # the frozen reference, made as dpo.load_models makes it
        ref = dpo.sequence_logps(copy.deepcopy(model).eval().requires_grad_(False), ids, labels)
    for eps in (0.0, 0.2):
        loss, chosen_r, rejected_r = dpo.dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta=0.1, label_smoothing=eps)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert chosen_r.tolist() == [0.0, 0.0] and rejected_r.tolist() == [0.0, 0.0]
    assert (pol < 0).all()   # real log-probs, not zeros that would make the identity trivial


def test_loss_and_gradient_match_a_hand_computation():
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta, eps = 0.5, 0.1
    loss, chosen_r, rejected_r = dpo.dpo_loss(pc, pr, rc, rr, beta, eps)
    loss.backward()
    # margins d = (pc - rc) - (pr - rr): (0.5 - (-1)) = 1.5 and (-1 - 1) = -2
    sig = lambda x: 1 / (1 + math.exp(-x))
    d = [1.5, -2.0]
    per_pair = [-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in d]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    # dL/dd = beta * ((1 - eps) * (sig(beta d) - 1) + eps * sig(beta d)) / 2; dd/dpc = 1, dd/dpr = -1
    grad_d = [beta * ((1 - eps) * (sig(beta * x) - 1) + eps * sig(beta * x)) / 2 for x in d]
    assert pc.grad.tolist() == pytest.approx(grad_d, rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([-g for g in grad_d], rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.25, -0.5]) and rejected_r.tolist() == pytest.approx([-0.5, 0.5])


def test_collate_masks_prompt_and_padding_and_truncates_the_prompt_on_the_left():
    pairs = [dict(prompt=[11, 12, 13, 14, 15], chosen=[21, 22], rejected=[31]),
             dict(prompt=[41], chosen=[51], rejected=[61, 62, 63])]
    ids, labels = preference.collate(pairs, max_len=5, pad_id=0, bos_id=99)
    # sequences [bos] + prompt + response, cut to max_len + 1 = 6 tokens from the left of the prompt;
    # inputs drop the last token, labels are the next tokens with the prompt and padding at -100
    assert ids.tolist() == [[12, 13, 14, 15, 21], [99, 41, 0, 0, 0], [11, 12, 13, 14, 15], [99, 41, 61, 62, 0]]
    assert labels.tolist() == [[-100, -100, -100, 21, 22], [-100, 51, -100, -100, -100],
                               [-100, -100, -100, -100, 31], [-100, 61, 62, 63, -100]]
    # a response longer than max_len keeps its first max_len tokens, after one token of prompt
    ids, labels = preference.collate([dict(prompt=[1, 2], chosen=list(range(10, 20)), rejected=[3])], max_len=4, pad_id=0, bos_id=99)
    assert ids[0].tolist() == [2, 10, 11, 12] and labels[0].tolist() == [10, 11, 12, 13]


def test_summed_logps_ignore_prompt_targets_and_padding():
    torch.manual_seed(0)
    model = MiniCPM(small_config()).eval()
    pairs = [dict(prompt=[5, 6, 7, 8], chosen=[9, 10, 11], rejected=[12])]
    ids, labels = preference.collate(pairs, max_len=32, pad_id=0, bos_id=1)
    logps = dpo.sequence_logps(model, ids, labels)
    # by hand: the log-softmax of the logits at the response positions only
    full = torch.log_softmax(model(ids)[0], dim=-1)
    by_hand = [sum(full[b, t, labels[b, t]].item() for t in range(ids.shape[1]) if labels[b, t] != -100) for b in range(2)]
    assert logps.tolist() == pytest.approx(by_hand, rel=1e-5)
    # more and different padding (a longer pair in the batch, another pad id): the same sums
    ids3, labels3 = preference.collate(pairs + [dict(prompt=[1] * 20, chosen=[2] * 9, rejected=[3] * 8)], 32, pad_id=42, bos_id=1)
    assert ids3.shape[1] > ids.shape[1]
    logps3 = dpo.sequence_logps(model, ids3, labels3)
    assert logps3[[0, 2]].tolist() == pytest.approx(logps.tolist(), rel=1e-5, abs=1e-5)
    changed = labels.clone()
    changed[changed == -100] = 7                   # scoring the prompt and padding would change them
    assert not torch.allclose(dpo.sequence_logps(model, ids, changed), logps)


# The test corpus: each document is lower-cased real code written in one of these scripts (a-z onto
# 26 consecutive letters of it). Every letter is 2 UTF-8 bytes with the script's own lead byte, so no
# script is cheaper per byte than another; a prompt shows its document's script, and a continuation
# from another document is (7 times in 8) in another one. A tiny byte model learns that consistency
# in a few steps, which is what the default task's pairs test (on plain code it cannot: ~0.55).
SCRIPTS = [0x410, 0x561, 0x5D0, 0x621, 0x712, 0x780, 0x3C0, 0x7CA]   # Cyrillic, Armenian, Hebrew, Arabic,
#                                                                     Syriac, Thaana, Greek, N'Ko


def transliterate(text, script):
    return "".join(chr(SCRIPTS[script] + ord(c) - ord("a")) if "a" <= c <= "z" else c for c in text.lower())


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small corpus (byte tokenizer) of transliterated code whose validation documents are 7 long
    chunks, and a 2-layer model trained on its training part for a few steps."""
    root = tmp_path_factory.mktemp("dpo")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / n).read_text(encoding="utf-8") for n in
                   ["textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "glob.py"])
    # without indentation and blank lines: runs of spaces would be continuations any prompt accepts
    text = "\n".join(line.strip() for line in text.splitlines() if line.strip())
    assert all(len(chr(b + i).encode()) == 2 and chr(b + i).isalpha() for b in SCRIPTS for i in range(26))
    lines, pos, long_val = [], 0, 0
    while len(lines) < 600 or long_val < 7:
        # data.py puts a document in validation by the hash of its content: a 2000-character chunk
        # that falls there is kept whole (a long validation document), any other one is cut to 150
        doc = transliterate(text[pos:pos + 2000], len(lines) % len(SCRIPTS))
        long_val += data.is_val(doc, None)
        doc = doc if data.is_val(doc, None) else doc[:150]
        lines.append(json.dumps({"text": doc}))
        pos = (pos + len(doc)) % (len(text) - 2000)
    (root / "src").mkdir()
    (root / "src" / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--source", str(root / "src"), "--tokenizer", "byte", "--data_dir", str(root / "data"),
            "--out_dir", str(root / "pre"), "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2",
            "--ffn_dim", "160", "--block_size", "128", "--batch_size", "8", "--seq_len", "64",
            "--max_steps", "80", "--eval_interval", "0"]
    assert train.main(args) == 0
    return root


def test_a_short_run_on_the_default_task_raises_held_out_accuracy(task, tmp_path):
    assert dpo.main(["--init_from", str(task / "pre"), "--out_dir", str(tmp_path), "--max_len", "100", "--lr", "3e-3",
                     "--eval_interval", "100"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert first["eval_accuracy"] == 0.5 and first["eval_margin"] == 0.0        # policy = reference: all ties
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # measured: 0.5 -> 0.951 in one epoch (40 steps) on this corpus and data.py's content-keyed split
    # (before the redesign 0.915 over 38 steps, 0.90-0.97 with other seeds): 0.8 leaves room for noise
    assert last["eval_accuracy"] > 0.8 and last["eval_margin"] > 0 and last["eval_loss"] < math.log(2)
    assert [r["step"] for r in rows] == list(range(len(rows))) and "accuracy" in rows[1]
    assert open(tmp_path / "dpo.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = checkpoint.load(tmp_path, kind="dpo")
    assert ckpt["step"] == len(rows) - 1 and ckpt["tokenizer"]["spec"] == "byte"
    # the default task's dataset is saved in the config: a resume or a further run reads the same pairs
    assert os.path.isfile(os.path.join(ckpt["config"]["dataset"], "val.bin"))
    assert not torch.equal(ckpt["model"]["model.norm.weight"], checkpoint.load(task / "pre")["model"]["model.norm.weight"])


# ----------------------------------------------------------------------------- the dpo checkpoint

BYTE = dict(spec="byte", rank_file=None, eot_id=256, vocab_size=257)
FAST = ["--batch_size", "4", "--max_len", "32", "--eval_interval", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A hand-made pretrain checkpoint (random weights, byte tokenizer) and 48 text pairs: fast runs."""
    root = tmp_path_factory.mktemp("start")
    torch.manual_seed(0)
    checkpoint.save(str(root), "pretrain", MiniCPM(small_config(vocab_size=257)), step=0, tokenizer=BYTE, config={})
    pairs = [dict(prompt=f"def f{i}(x):", chosen=f" return x + {i}", rejected=f" pass  # {i * 7}") for i in range(48)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def dpo_args(start, out, *more):
    return ["--init_from", str(start), "--data", str(start / "pairs.jsonl"), "--out_dir", str(out), *FAST, *map(str, more)]


def without_speed(run_dir):
    """A run's metrics rows without tokens/s: the one measure that is a wall-clock time, not a result."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(run_dir / "metrics.jsonl")]


def test_stop_and_resume_continue_bitwise(start, tmp_path):
    """12 steps in one go vs --stop_at 7 then --resume: the same metrics.jsonl, line for line (the stop
    falls mid-epoch, so the rest of the epoch's batch order must come back; the resume crosses into epoch 2)."""
    assert dpo.main(dpo_args(start, tmp_path / "whole", "--max_steps", 12)) == 0
    assert dpo.main(dpo_args(start, tmp_path / "parts", "--max_steps", 12, "--stop_at", 7)) == 0
    assert checkpoint.load(tmp_path / "parts", kind="dpo")["step"] == 7
    assert dpo.main(["--resume", str(tmp_path / "parts")]) == 0
    whole, parts = (without_speed(tmp_path / d) for d in ("whole", "parts"))
    assert len(whole) == 13 and parts == whole
    a, b = (checkpoint.load(tmp_path / d) for d in ("whole", "parts"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and b["step"] == 12


def test_sigterm_saves_exits_143_and_resume_finishes(start, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "dpo.py", *dpo_args(start, out, "--max_steps", 100000, "--eval_interval", 1000)],
                            cwd=os.path.dirname(dpo.__file__), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged = lambda: len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    deadline = time.time() + 60
    while logged() < 3:   # the eval at step 0, then steps 1 and 2
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no steps logged in 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)                 # inside the loop now
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by signal at step" in stdout
    ckpt = checkpoint.load(out, kind="dpo")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert ckpt["step"] >= 2 and rows[-1]["step"] == ckpt["step"]   # the step it was in finished, then saved
    assert dpo.main(["--resume", str(out), "--max_steps", str(ckpt["step"] + 2)]) == 0
    assert checkpoint.load(out)["step"] == ckpt["step"] + 2


def test_old_checkpoint_with_triton_attention_runs_on_cpu(start, tmp_path):
    """A checkpoint from before kinds and runtime choices: no "kind", attn_impl "triton" in model_config."""
    model = MiniCPM(small_config(vocab_size=257))
    torch.save(dict(model=model.state_dict(), model_config={**asdict(model.config), "attn_impl": "triton"}, step=5,
                    tokenizer=BYTE, train_config={}), tmp_path / "ckpt.pt")
    assert dpo.main(dpo_args(tmp_path, tmp_path / "out", "--max_steps", 2, "--data", start / "pairs.jsonl")) == 0
    ckpt = checkpoint.load(tmp_path / "out", kind="dpo")
    assert ckpt["step"] == 2 and "attn_impl" not in ckpt["model_config"]


def test_other_scripts_on_a_dpo_checkpoint(start, tmp_path, capsys):
    assert dpo.main(dpo_args(start, tmp_path / "a", "--max_steps", 3)) == 0
    ckpt = checkpoint.load(tmp_path / "a")
    # what sample.py reads: kind, weights, architecture, step, tokenizer record
    assert ckpt["kind"] == "dpo" and {"model", "model_config", "step", "tokenizer", "config"} <= ckpt.keys()
    model = checkpoint.build_model(ckpt)
    enc = data.load_tokenizer(ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt))
    assert enc.n_vocab <= model.config.vocab_size == ckpt["tokenizer"]["vocab_size"]
    # dpo.py --init_from a dpo run: a new run whose reference is that run's policy (step 0: ln 2, ties)
    assert dpo.main(dpo_args(tmp_path / "a", tmp_path / "b", "--max_steps", 2, "--data", start / "pairs.jsonl")) == 0
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["eval_accuracy"] == 0.5
    # train.py --resume on a dpo folder: one line naming the script that wrote it
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dpo checkpoint written by dpo.py" in err


def test_hugging_face_start_resumes_with_its_reference_rebuilt(start, tmp_path):
    """--hf: the tokenizer comes from the folder's tokenizer_record.json, and a resume rebuilds the
    frozen reference from the folder (the same fingerprint), so it continues as the whole run does."""
    hf.save_hf(checkpoint.build_model(checkpoint.load(start)), str(tmp_path / "hf"), BYTE)
    args = ["--hf", str(tmp_path / "hf"), "--data", str(start / "pairs.jsonl"), *FAST, "--max_steps", "4"]
    assert dpo.main([*args, "--out_dir", str(tmp_path / "whole")]) == 0
    assert dpo.main([*args, "--out_dir", str(tmp_path / "parts"), "--stop_at", "2"]) == 0
    assert dpo.main(["--resume", str(tmp_path / "parts")]) == 0
    assert without_speed(tmp_path / "parts") == without_speed(tmp_path / "whole")
    assert checkpoint.load(tmp_path / "parts", kind="dpo")["tokenizer"] == BYTE


def test_resume_refuses_another_configuration_and_a_changed_reference(start, tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "ckpt.pt").write_bytes((start / "ckpt.pt").read_bytes())
    assert dpo.main(dpo_args(ref, tmp_path / "run", "--max_steps", 6, "--stop_at", 2, "--data", start / "pairs.jsonl")) == 0
    capsys.readouterr()
    assert dpo.main(["--resume", str(tmp_path / "run"), "--beta", "0.3"]) == 2
    assert "cannot resume with a different configuration: --beta: checkpoint has 0.1, given 0.3" in capsys.readouterr().err
    torch.manual_seed(1)   # the reference's source is replaced by other weights
    checkpoint.save(str(ref), "pretrain", MiniCPM(small_config(vocab_size=257)), step=0, tokenizer=BYTE, config={})
    assert dpo.main(["--resume", str(tmp_path / "run")]) == 2
    assert "has changed since this run started" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size, --eval_pairs"), (["--eval_interval", "-1"], "--eval_interval"),
    (["--eval_pairs", "0"], "must be >= 1"), (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--beta", "0"], "--beta must be > 0"), (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5)"),
    (["--val_frac", "1"], "--val_frac must be in (0, 1)"), (["--val_frac", "0"], "--val_frac must be in (0, 1)"),
    (["--max_len", "64"], "does not fit the model's block_size 64"), ([], "already holds a run")])
def test_bad_requests_write_nothing(start, tmp_path, capsys, flags, message):
    """Into a folder that holds a run: each bad request is one line, exit 2, the run untouched."""
    (tmp_path / "ckpt.pt").write_bytes(b"an earlier run")
    (tmp_path / "metrics.jsonl").write_text("")
    capsys.readouterr()
    overwrite = ["--overwrite"] if flags else []
    assert dpo.main(dpo_args(start, tmp_path, *overwrite, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo.py: ") and message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"an earlier run" and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "metrics.jsonl"]


def run_cli(*args):
    return subprocess.run([sys.executable, "dpo.py", *map(str, args)], cwd=os.path.dirname(dpo.__file__),
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_clear_line(start, tmp_path):
    missing = run_cli("--init_from", tmp_path / "nothing", "--out_dir", tmp_path / "o")
    assert missing.returncode == 2 and missing.stderr.startswith("dpo.py: no checkpoint at")
    assert len(missing.stderr.strip().splitlines()) == 1
    unknown = run_cli("--betta", "0.2")
    assert unknown.returncode == 2 and "unknown flag --betta; did you mean --beta?" in unknown.stderr
    # a JSONL file with a bad third line
    good = json.dumps(dict(prompt="def f(x):", chosen=" return x", rejected=" pass"))
    (tmp_path / "pairs.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    bad = run_cli("--init_from", start, "--data", tmp_path / "pairs.jsonl", "--out_dir", tmp_path / "o", "--max_len", 32)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith(f"dpo.py: {tmp_path / 'pairs.jsonl'}:3 is not valid JSON")
    assert not (tmp_path / "o").exists()
    help_text = run_cli("--help").stdout
    assert all(f"--{f.name}" in help_text for f in fields(dpo.DPOConfig)) and "(default: 0.1)" in help_text
