"""Tests of data mixtures and supervised fine-tuning in train.py (mixture.py): realised proportions against
the binomial, the switch at the decay start (§5), resume across it bitwise, per-component validation by
hand, SFT's default lr (§6.3) and kind, and bad mixtures refused in one line before anything is written."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import mixture
import train
from cli import UsageError
from conftest import SMALL_MODEL, metrics

A, B = ord("a"), ord("b")   # the byte tokenizer's ids of the two texts' letters


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two text sources with disjoint letters (a row's source is known from its bytes), and a chat .jsonl."""
    root = tmp_path_factory.mktemp("sources")
    for letter in "ab":
        folder = root / letter
        folder.mkdir()
        for i in range(6):   # several documents: one falls in the validation split
            (folder / f"{i}.txt").write_text(" ".join(letter * (1 + (i + k) % 7) for k in range(400)) + "\n")
    convos = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ("red", "green", "blue", "cyan", "pink") * 30]
    convos += [{"messages": [{"role": "user", "content": f"count to {n}"},
                             {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]} for n in range(1, 40)]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convos))
    return dict(a=str(root / "a"), b=str(root / "b"), chat=str(root / "chat.jsonl"),
                data_dir=str(tmp_path_factory.mktemp("data")))


def flags(s, out_dir, *extra):
    return ["--tokenizer", "byte", "--data_dir", s["data_dir"], "--out_dir", str(out_dir), *SMALL_MODEL,
            "--eval_tokens", "256", "--eval_interval", "0", "--log_interval", "1", *map(str, extra)]


def errors(capsys):
    # stderr without the progress bars (tqdm's lines while a component was prepared)
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "|" not in line]


def test_parse_normalises_weights_and_refuses_bad_ones():
    assert mixture.parse("x:3,y:1") == [("x", 0.75), ("y", 0.25)]
    assert mixture.parse("x") == [("x", 1.0)]   # a weight may be left out: 1
    for spec, says in [("x:-1", "finite weight > 0"), ("x:abc", "'abc' of 'x' is not a number"), ("x:0", "> 0"),
                       ("x:inf", "finite"), (":1", "needs a name"), ("x:1,x:2", "named twice")]:
        with pytest.raises(UsageError, match=says):
            mixture.parse(spec)


def test_realised_proportions_within_the_binomial_tolerance(sources):
    cfg = SimpleNamespace(source=sources["a"], tokenizer="byte", data_dir=sources["data_dir"])
    comps = mixture.prepare(mixture.parse(f"{sources['a']}:0.3,{sources['b']}:0.7"), cfg, quiet=True)
    rows_a = n = 0
    for step in range(50):
        x, y = mixture.get_batch(comps, 64, 16, seed=3, step=step, micro_step=0)
        from_a, from_b = (x == A).any(1), (x == B).any(1)
        assert not (from_a & from_b).any() and (from_a | from_b).all()   # every row from exactly one source
        rows_a, n = rows_a + int(from_a.sum()), n + len(x)
    # 3,200 rows drawn with p = 0.3: within 4 standard deviations of n p (a false alarm once in ~16,000)
    assert abs(rows_a - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7), rows_a
    # a pure function of (seed, step, micro_step): what resume and DDP rely on
    again = mixture.get_batch(comps, 64, 16, seed=3, step=49, micro_step=0)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_the_mixture_switches_exactly_at_the_decay_start(sources, tmp_path, monkeypatch):
    drawn = []   # (step, the sources of the mixture drawn from)
    real = mixture.get_batch
    monkeypatch.setattr(mixture, "get_batch", lambda comps, *a, **k: drawn.append(
        (k["step"], {os.path.basename(c.name) for c in comps})) or real(comps, *a, **k))
    assert train.main(flags(sources, tmp_path, "--data", sources["a"], "--decay_data", sources["b"],
                            "--max_steps", 6, "--warmup_steps", 0, "--decay_start", 4, "--decay_steps", 2, "--lr", 0.02)) == 0
    assert drawn == [(s, {"a"}) for s in range(4)] + [(s, {"b"}) for s in (4, 5)]
    # the lr by hand: the peak through step 4 (the decay's first step is exponent 0), then 2% over 2 steps
    assert [r["lr"] for r in metrics(tmp_path)] == pytest.approx([0.02] * 5 + [0.02 * 0.02 ** 0.5], rel=1e-12)
    assert checkpoint.load(str(tmp_path))["mixtures"]["decay"][0]["name"] == sources["b"]


def test_resume_across_the_switch_equals_the_whole_run(sources, tmp_path):
    common = ("--data", f"{sources['a']}:0.5,{sources['chat']}:0.5", "--decay_data", f"{sources['b']}:0.5,{sources['chat']}:0.5",
              "--max_steps", 8, "--decay_start", 5, "--warmup_steps", 1, "--eval_interval", 4)
    assert train.main(flags(sources, tmp_path / "whole", *common)) == 0
    assert train.main(flags(sources, tmp_path / "parts", *common, "--stop_at", 3)) == 0   # before the switch
    assert train.main(["--resume", str(tmp_path / "parts")]) == 0
    speedless = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert speedless(metrics(tmp_path / "parts")) == speedless(metrics(tmp_path / "whole"))   # bitwise

def test_a_resume_refuses_another_mixture(sources, tmp_path, capsys):
    assert train.main(flags(sources, tmp_path, "--data", f"{sources['a']}:0.5,{sources['b']}:0.5", "--max_steps", 2,
                            "--stop_at", 1)) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path), "--data", sources["a"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0], err


def test_validation_reports_each_component_in_bits_per_byte(sources, tmp_path):
    assert train.main(flags(sources, tmp_path, "--data", f"{sources['a']}:0.5,{sources['chat']}:0.5",
                            "--max_steps", 2, "--eval_interval", 2)) == 0
    last = metrics(tmp_path)[-1]
    chat_meta = json.load(open(checkpoint.load(str(tmp_path))["mixtures"]["stable"][1]["folder"] + "/meta.json"))
    text_meta = json.load(open(tmp_path / "data_meta.json"))   # the first component: the headline
    val = chat_meta["val"]   # the replies' bytes and tokens: bits per byte of what is scored
    assert last[f"val_bpb/{sources['chat']}"] == pytest.approx(
        last[f"val_loss/{sources['chat']}"] / math.log(2) / (val["scored_bytes"] / val["scored_tokens"]), rel=1e-9)
    assert last["val_bpb"] == pytest.approx(
        last["val_loss"] / math.log(2) / (text_meta["val"]["bytes"] / text_meta["val"]["tokens"]), rel=1e-9)


def test_sft_starts_at_the_decays_last_lr_and_writes_its_own_kind(sources, tmp_path, capsys):
    assert train.main(flags(sources, tmp_path / "base", "--source", sources["a"], "--max_steps", 6,
                            "--warmup_steps", 0, "--decay_steps", 3, "--lr", 0.02)) == 0
    sft = flags(sources, tmp_path / "sft", "--init_from", tmp_path / "base", "--sft", "--data", sources["chat"],
                "--max_steps", 4, "--decay_steps", 2)
    assert train.main(sft + ["--stop_at", "2"]) == 0
    assert train.main(["--resume", str(tmp_path / "sft")]) == 0   # an sft checkpoint resumes with train.py
    ckpt = checkpoint.load(str(tmp_path / "sft"))
    assert ckpt["kind"] == "sft" and ckpt["step"] == 4
    # §6.3 by hand: the base run's lr at its end, 0.02 * 0.02 ** (3 / 3); no warmup, then its own decay
    lrs = [r["lr"] for r in metrics(tmp_path / "sft")]
    assert lrs == pytest.approx([0.0004, 0.0004, 0.0004, 0.0004 * 0.02 ** 0.5], rel=1e-9)
    # a pretrain run cannot --resume it, and the model answers in the chat format from sample.py
    import sample
    assert sample.main(["--ckpt", str(tmp_path / "sft"), "--chat", "--prompt", "say red", "--max_new_tokens", "4"]) == 0


BAD = [  # (extra flags, what the one line must say)
    (["--data", "{a}:-1"], "--data: '{a}:-1' needs a name and a finite weight > 0"),
    (["--data", "{a}:abc"], "--data: weight 'abc'"),
    (["--data", "{a}:1", "--decay_data", "{b}:x"], "--decay_data: weight 'x'"),
    (["--data", "/nonexistent/corpus:1"], "/nonexistent/corpus"),
    (["--decay_data", "{b}:1"], "--decay_data goes with --data"),
    (["--sft", "--data", "{chat}"], "--sft go with --init_from"),
    (["--data", "{a}:1,{bad}:1"], "{bad}:2 is not a conversation"),
    (["--data", "{a}:1,{empty}:1"], "{empty}:1 message 1 is an empty assistant message"),
]


@pytest.mark.parametrize("extra,says", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_mixtures_are_one_line_and_write_nothing(sources, tmp_path, capsys, extra, says):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    (tmp_path / "empty.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                          '{"role": "assistant", "content": "  "}]}\n')
    names = dict(sources, bad=str(tmp_path / "bad.jsonl"), empty=str(tmp_path / "empty.jsonl"))
    data_dir = tmp_path / "data"
    argv = flags(names, tmp_path / "run", "--max_steps", 2)
    argv[argv.index("--data_dir") + 1] = str(data_dir)
    code = train.main(argv + [e.format(**names) for e in extra])
    err = errors(capsys)
    assert code == 2 and len(err) == 1 and says.format(**names) in err[0], err
    assert not (tmp_path / "run").exists()
    assert not data_dir.exists() or not [p for p in data_dir.iterdir() if "chat" in p.name or p.name.startswith("bad")]


def test_components_with_different_tokenizers_are_refused(sources, tmp_path, capsys):
    # conversations are tokenized with the checkpoint's tokenizer (byte); the text here with bpe:260
    assert train.main(flags(sources, tmp_path / "base", "--source", sources["a"], "--max_steps", 1)) == 0
    argv = flags(sources, tmp_path / "run", "--init_from", tmp_path / "base", "--data",
                 f"{sources['b']}:0.5,{sources['chat']}:0.5", "--max_steps", 2)
    argv[argv.index("byte")] = "bpe:260"
    assert train.main(argv) == 2
    err = errors(capsys)
    assert len(err) == 1 and "different tokenizers" in err[0] and not (tmp_path / "run").exists(), err
