"""Tests of sample.py: KV-cache decoding against recomputing the whole sequence, the sampling filters
(top-k, top-p) on hand-made distributions, seeds, the end-of-text stop, streaming of multi-byte
characters, and the command line (checkpoints from checkpoint.save, HF folders from hf.save_hf)."""
import collections
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import data
import checkpoint
import hf
import sample
from conftest import ROOT, small_config
from minicpm import MiniCPM

TEXT = open(os.path.join(ROOT, "sample.py"), encoding="utf-8").read()   # any real text will do


def random_model(n_kv_head=2, seed=0, **kw):
    """A small random model whose greedy output is far from constant (init_std 0.5: sharp logits)."""
    torch.manual_seed(seed)
    return MiniCPM(small_config(n_kv_head=n_kv_head, init_std=0.5, **kw)).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
def test_cache_gives_the_same_tokens_as_recomputing(n_kv_head):
    model = random_model(n_kv_head, block_size=128)
    prompt = torch.randint(0, 97, (8,), generator=gen(1)).tolist()
    reference = list(prompt)       # independent reference: the full sequence through the model each step
    with torch.no_grad():
        for _ in range(64):
            reference.append(int(model(torch.tensor([reference]))[0][0, -1].argmax()))
    reference = reference[len(prompt):]
    assert len(set(reference)) > 10                     # not a trivially constant continuation
    assert sample.generate(model, prompt, 64, temperature=0) == reference
    assert sample.generate(model, prompt, 64, temperature=0, use_cache=False) == reference


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, 50, generator=gen(0))
    assert torch.equal(sample.sample_next(logits, temperature=1.5, top_k=1, generator=gen(1)), logits.argmax(-1))
    model, prompt = random_model(), [5, 17, 42]
    greedy = sample.generate(model, prompt, 40, temperature=0)
    assert sample.generate(model, prompt, 40, temperature=1.0, top_k=1, generator=gen(3)) == greedy
    assert sample.generate(model, prompt, 40, temperature=1.0, generator=gen(3)) != greedy   # sampling does differ


def test_top_k_draws_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(4000, 1)
    draws = sample.sample_next(logits, temperature=1.0, top_k=2, generator=gen(0))
    counts = collections.Counter(draws.tolist())
    assert set(counts) == {1, 3}
    assert counts[1] / 4000 == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.03)   # renormalised over the two


@pytest.mark.parametrize("probs, p, kept", [
    ([0.5, 0.3, 0.15, 0.05], 0.8, {0, 1}),            # 0.5 + 0.3 reaches 0.8 exactly
    ([0.5, 0.3, 0.15, 0.05], 0.81, {0, 1, 2}),
    ([0.5, 0.3, 0.15, 0.05], 0.5, {0}),
    ([0.5, 0.3, 0.15, 0.05], 0.3, {0}),               # the most likely token is always kept
    ([0.5, 0.3, 0.15, 0.05], 0.96, {0, 1, 2, 3}),
    ([0.5, 0.3, 0.15, 0.05], 1.0, {0, 1, 2, 3}),
    ([0.15, 0.05, 0.5, 0.3], 0.8, {2, 3}),            # order of ids does not matter
    ([0.25, 0.25, 0.25, 0.25], 0.5, {0, 1}),          # ties: the lower ids
    ([0.1, 0.3, 0.3, 0.3], 0.5, {1, 2}),
    ([0.4, 0.3, 0.2, 0.1], 0.9, {0, 1, 2}),           # 0.4 + 0.3 + 0.2 rounds either way in float32
])
def test_top_p_keeps_exactly_the_smallest_set_reaching_p(probs, p, kept):
    probs = torch.tensor(probs)
    out = sample.top_p_filter(probs, p)
    assert set(out.nonzero().flatten().tolist()) == kept
    mask = torch.tensor([i in kept for i in range(len(probs))])
    assert torch.allclose(out, probs * mask / probs[mask].sum())     # the kept ones renormalised


def test_top_p_matches_brute_force_on_random_distributions():
    g = gen(0)
    for _ in range(100):
        probs = torch.rand(6, generator=g) ** 3
        probs /= probs.sum()
        p = float(torch.rand((), generator=g))
        kept = set(sample.top_p_filter(probs, p).nonzero().flatten().tolist())
        # reference: the smallest size of any subset whose mass reaches p, and the best subset of that size
        size = min(k for k in range(1, 7) for s in itertools.combinations(range(6), k) if probs[list(s)].sum() >= p)
        best = max(itertools.combinations(range(6), size), key=lambda s: float(probs[list(s)].sum()))
        assert kept == set(best)


def test_top_p_sampling_draws_from_the_nucleus_only():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    draws = sample.sample_next(logits, temperature=1.0, top_p=0.8, generator=gen(0)).tolist()
    assert set(draws) == {0, 1}
    assert draws.count(0) / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)


def test_same_seed_same_samples():
    model, prompt = random_model(), [1, 2, 3]
    a = sample.generate(model, prompt, 32, temperature=1.0, top_p=0.9, generator=gen(7))
    b = sample.generate(model, prompt, 32, temperature=1.0, top_p=0.9, generator=gen(7))
    c = sample.generate(model, prompt, 32, temperature=1.0, top_p=0.9, generator=gen(8))
    assert a == b and a != c


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_token_ends_generation(use_cache):
    model, prompt = random_model(), [4, 8, 15]
    free = sample.generate(model, prompt, 30, temperature=0)
    j = next(i for i in range(3, 30) if free[i] not in free[:i])   # its first appearance
    streamed = []
    out = sample.generate(model, prompt, 30, temperature=0, use_cache=use_cache, stop_id=free[j],
                          on_token=streamed.append)
    assert out == streamed == free[:j]                              # the stop token is not emitted


def test_stream_does_not_split_multibyte_characters():
    enc = data.load_tokenizer("byte")               # one byte per token: every character gets split
    text = "héllo, 日本語 👋!"
    pieces = []
    out = type("Out", (), {"write": lambda self, s: pieces.append(s), "flush": lambda self: None})()
    stream = sample.TextStream(enc, out)
    for token in enc.encode(text):
        stream(token)
    stream.close()
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "日" in pieces and "👋" in pieces          # written whole, once its last byte arrived
    pieces.clear()
    stream = sample.TextStream(enc, out)
    stream("日".encode()[0])
    assert pieces == [""]
    stream.close()                                   # an unfinished character at the end: U+FFFD
    assert pieces[-1] == "\ufffd"


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A train.py checkpoint folder (random weights) with a bpe:300 tokenizer learned on TEXT."""
    folder = tmp_path_factory.mktemp("ckpt")
    vocab, _ = data.learn_bpe(collections.Counter(data.split_chunks(TEXT)), 299)
    data.write_rank_file(folder / "tokenizer.tiktoken", vocab)
    model = random_model(vocab_size=300, block_size=64)
    checkpoint.save(folder, "pretrain", model, step=0, tokenizer=dict(spec="bpe:300", rank_file="tokenizer.tiktoken",
                                                                      eot_id=299, vocab_size=300))
    return folder


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf.save_hf(checkpoint.build_model(checkpoint.load(str(ckpt_dir))), folder)
    shutil.copy(ckpt_dir / "tokenizer.tiktoken", folder / "ranks.tiktoken")
    (folder / "tokenizer_record.json").write_text(json.dumps({"spec": "bpe:300", "rank_file": "ranks.tiktoken"}))
    return folder


@pytest.fixture(scope="module")
def cli(ckpt_dir, hf_dir, tmp_path_factory):
    """The command-line runs, started together (each spends seconds importing torch) -> name: result."""
    spm = tmp_path_factory.mktemp("sentencepiece")      # a released-MiniCPM-like folder: no tokenizer record
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(hf_dir / name, spm / name)
    (spm / "tokenizer.model").write_bytes(b"\x0a\x05")
    runs = dict(sample=["--ckpt", ckpt_dir, "--prompt", "def ", "--max_new_tokens", 20, "--seed", 3],
                missing=["--ckpt", spm / "nowhere"],
                long_prompt=["--ckpt", ckpt_dir, "--prompt", TEXT[:3000]],
                unknown_tokenizer=["--hf", hf_dir, "--tokenizer", "wordpiece:9"],
                sentencepiece=["--hf", spm])
    procs = {name: subprocess.Popen([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, args in runs.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[name] = types.SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return results


def one_error_line(out):
    assert out.returncode == 2 and out.stdout == "", out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_cli_samples_and_reports_speed(cli):
    out = cli["sample"]
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ") and len(out.stdout) > len("def \n")
    m = re.fullmatch(r"sample.py: (\d+) new tokens in [\d.]+ s: [\d,.]+ tokens/s \(KV cache, cpu, float32\)",
                     out.stderr.strip())
    assert m and 1 <= int(m[1]) <= 20


def test_cli_missing_checkpoint(cli):
    line = one_error_line(cli["missing"])
    assert line.startswith("sample.py: no checkpoint at") and "nowhere" in line


def test_cli_prompt_longer_than_context(cli):
    line = one_error_line(cli["long_prompt"])
    assert re.fullmatch(r"sample.py: the prompt is \d+ tokens, too long for the model's context \(block_size 64\)", line)


def test_cli_unknown_tokenizer(cli):
    assert one_error_line(cli["unknown_tokenizer"]).startswith("sample.py: unknown tokenizer 'wordpiece:9'")


def test_cli_sentencepiece_folder_says_what_to_pass(cli):
    line = one_error_line(cli["sentencepiece"])
    assert "sentencepiece" in line and "not supported" in line and "--tokenizer" in line


def test_hf_folder_and_checkpoint_give_the_same_text(ckpt_dir, hf_dir, capsys):
    outputs = []
    for source in (["--ckpt", str(ckpt_dir)], ["--hf", str(hf_dir)], ["--ckpt", str(ckpt_dir), "--no_cache"]):
        assert sample.main([*source, "--prompt", "import os", "--temperature", "0", "--max_new_tokens", "30"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > len("import os\n")


def test_prompt_file_samples_and_context_cap(ckpt_dir, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("class Config:")
    assert sample.main(["--ckpt", str(ckpt_dir), "--prompt", f"@{tmp_path / 'prompt.txt'}", "--num_samples", "2",
                        "--max_new_tokens", "500", "--temperature", "1.0"]) == 0
    out, err = capsys.readouterr()
    first, second = out.split("\n---------------\n")
    assert first.startswith("class Config:") and second.startswith("class Config:") and first != second
    assert "note:" in err and "instead of 500" in err and "block_size 64" in err


def test_bad_flags_are_one_line(capsys):
    assert sample.main(["--temprature", "1"]) == 2
    assert capsys.readouterr().err == "sample.py: unknown flag --temprature; did you mean --temperature?\n"
    assert sample.main(["--top_p", "0"]) == 2
    assert capsys.readouterr().err == "sample.py: --top_p must be in (0, 1]\n"


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(sample.SampleConfig):
        assert f"--{f.name}" in text and f.metadata["help"][:20] in " ".join(text.split())


def test_bench_compares_cache_and_recompute(ckpt_dir, capsys):
    assert sample.main(["--ckpt", str(ckpt_dir), "--bench"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"bench: 63 new tokens, greedy, cpu, float32: KV cache [\d,.]+ tokens/s, no cache [\d,.]+ "
                     r"tokens/s, ratio [\d.]+x; same tokens: True", out), out


def test_checkpoint_trained_with_triton_attention_samples_on_a_cpu(ckpt_dir, tmp_path, capsys):
    """The attention implementation is the running script's choice: an old checkpoint that saved
    attn_impl "triton" in its model config samples on a CPU (with sdpa), as does a dpo.py one."""
    ckpt = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["attn_impl"] = "triton"
    ckpt["kind"] = "dpo"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    shutil.copy(ckpt_dir / "tokenizer.tiktoken", tmp_path / "tokenizer.tiktoken")
    assert sample.main(["--ckpt", str(tmp_path), "--prompt", "def ", "--max_new_tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
