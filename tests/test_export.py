"""End to end through the files a user moves between tools: export.py folders run in transformers
(LlamaForCausalLM + AutoTokenizer: same ids, same greedy text as sample.py), and sample.py --hf
--chat on a folder laid out like the released MiniCPM ones (tokenizer.json, BOS, byte fallback)."""
import collections
import json
import os

import pytest
import tokenizers
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import checkpoint
import data
import export
import hf
import sample
from conftest import ROOT, small_config
from minicpm import MiniCPM
from test_tokenizer import SAMPLES, released_folder

TEXT = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()   # real text for a small BPE


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A train.py checkpoint folder: random weights with sharp logits, a bpe:300 learned on TEXT."""
    folder = tmp_path_factory.mktemp("ckpt")
    vocab, _ = data.learn_bpe(collections.Counter(data.split_chunks(TEXT)), 299)
    data.write_rank_file(folder / "tokenizer.tiktoken", vocab)
    torch.manual_seed(0)
    model = MiniCPM(small_config(vocab_size=300, init_std=0.5, tie_word_embeddings=False))
    checkpoint.save(folder, "pretrain", model, step=0, tokenizer=dict(spec="bpe:300", rank_file="tokenizer.tiktoken",
                                                                      eot_id=299, vocab_size=300))
    return folder


def test_llama_export_runs_in_transformers(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "llama"
    assert export.main(["--ckpt", str(ckpt_dir), "--out", str(out), "--llama"]) == 0
    # safetensors weights (no pickle), and end-of-text named as BOS and EOS: null BOS made llama.cpp pick id 11
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 299
    enc = data.load_tokenizer("bpe:300", str(ckpt_dir / "tokenizer.tiktoken"))
    # the tokenizer: AutoTokenizer on the folder gives our ids for every text, multilingual included
    theirs = AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert theirs(text)["input_ids"] == enc.encode(text, allowed_special={data.EOT}), text
    # greedy generation: transformers' generate (stopping at the config's eos = our end-of-text) prints
    # the text sample.py prints
    prompt = "def main():\n    "
    lm = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([theirs(prompt)["input_ids"]])
    with torch.no_grad():
        generated = lm.generate(ids, max_new_tokens=24, do_sample=False)
    capsys.readouterr()
    assert sample.main(["--ckpt", str(ckpt_dir), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "24"]) == 0
    assert capsys.readouterr().out == theirs.decode(generated[0], skip_special_tokens=True) + "\n"
    # and sample.py --hf reads the folder's safetensors back to the same text
    assert sample.main(["--hf", str(out), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "24"]) == 0
    assert capsys.readouterr().out == theirs.decode(generated[0], skip_special_tokens=True) + "\n"


def test_default_export_reads_back_everywhere(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "minicpm"
    assert export.main(["--ckpt", str(ckpt_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "minicpm" and config["eos_token_id"] == 299 and config["scale_emb"] == 12.0
    model = checkpoint.build_model(checkpoint.load(str(ckpt_dir)))
    ids = torch.randint(0, 300, (2, 20))
    assert torch.equal(hf.load_hf(out)(ids)[0], model(ids)[0])
    capsys.readouterr()
    args = ["--prompt", "class ", "--temperature", "0", "--max_new_tokens", "16"]
    assert sample.main(["--hf", str(out)] + args) == 0
    from_folder = capsys.readouterr().out
    assert sample.main(["--ckpt", str(ckpt_dir)] + args) == 0
    assert capsys.readouterr().out == from_folder


def test_export_refuses_before_writing(ckpt_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export.main(["--ckpt", str(ckpt_dir), "--out", str(tmp_path / "taken")]) == 2
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    assert export.main(["--ckpt", str(ckpt_dir)]) == 2            # no --out
    moe_dir = tmp_path / "moe"
    moe_dir.mkdir()
    checkpoint.save(moe_dir, "pretrain", MiniCPM(small_config(vocab_size=257, n_experts=4)), step=0,
                    tokenizer=dict(spec="byte", rank_file=None, eot_id=256, vocab_size=257))
    assert export.main(["--ckpt", str(moe_dir), "--out", str(tmp_path / "moe-llama"), "--llama"]) == 2
    assert not (tmp_path / "moe-llama").exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export.py")]
    assert len(errors) == 3 and "--overwrite" in errors[0] and "--out" in errors[1] and "MoE" in errors[2]


@pytest.mark.parametrize("style", ["old", "new"])
def test_sample_chat_on_a_released_layout_folder(tmp_path, capsys, monkeypatch, style):
    # a folder as the releases are: MiniCPM's config.json and weights, tokenizer.json (+ .model)
    folder = released_folder(tmp_path, style)
    theirs = AutoTokenizer.from_pretrained(folder)   # transformers' LlamaTokenizerFast: the reference
    torch.manual_seed(0)
    model = MiniCPM(small_config(vocab_size=len(theirs), init_std=0.5)).eval()
    hf.save_hf(model, folder)
    # what --chat must feed the model: BOS (tokenizer_config.json's add_bos_token, which the release's
    # LlamaTokenizer honours whether or not tokenizer.json has a template), then the turn format
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = [1] + raw.encode("<用户>Hello world<AI>", add_special_tokens=False).ids
    expected = sample.generate(model, ids, 12, temperature=0, stop_id=2)
    seen = []   # what sample.py's command line feeds generate, and what comes back
    def spy(model, prompt_ids, *args, **kwargs):
        seen.append((prompt_ids, generate(model, prompt_ids, *args, **kwargs)))
        return seen[-1][1]
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", spy)
    assert sample.main(["--hf", str(folder), "--chat", "--prompt", " Hello world ", "--temperature", "0",
                        "--max_new_tokens", "12"]) == 0
    assert seen == [(ids, expected)]
    # a random model's tokens are mostly stray byte pieces (invalid UTF-8): the text checks are in
    # test_tokenizer.py; here only that the reply, not the template, is printed
    assert "<AI>" not in capsys.readouterr().out


def test_sample_decodes_past_max_position_with_dynamic_ntk(tmp_path, capsys, monkeypatch):
    # the released 128k config: dynamic NTK, so a sample may run past max_position_embeddings (16 here)
    torch.manual_seed(0)
    model = MiniCPM(small_config(vocab_size=257, block_size=16, rope_scaling="dynamic", rope_factor=4.0))
    checkpoint.save(tmp_path, "pretrain", model, step=0, tokenizer=dict(spec="byte", rank_file=None, eot_id=256, vocab_size=257))
    asked = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, ids, n, *a, **k: asked.append(n) or generate(m, ids, n, *a, **k))
    assert sample.main(["--ckpt", str(tmp_path), "--prompt", "hello", "--max_new_tokens", "40", "--temperature", "0"]) == 0
    assert asked == [40] and "note" not in capsys.readouterr().err   # not capped at 16 - 5


def test_dpo_on_a_released_layout_folder_then_sample_and_export(tmp_path, capsys):
    # dpo.py --hf on a released-style folder: BOS from its tokenizer, the tokenizer kept beside the
    # checkpoint (so sample.py and export.py read it back), and the folder's tokenizer.json exported
    import dpo
    (tmp_path / "release").mkdir()
    folder = released_folder(tmp_path / "release", "new")
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    hf.save_hf(MiniCPM(small_config(vocab_size=raw.get_vocab_size(), block_size=64)), folder)
    pairs = [dict(prompt=f"Question {i}: is it good?", chosen=" Yes, it is good.", rejected=" No 😀") for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "dpo"
    assert dpo.main(["--hf", str(folder), "--data", str(tmp_path / "pairs.jsonl"), "--out_dir", str(out), "--max_len", "48",
                     "--max_steps", "2", "--batch_size", "4", "--eval_interval", "2", "--val_frac", "0.3"]) == 0
    ckpt = checkpoint.load(str(out))
    assert ckpt["tokenizer"]["spec"] == "tokenizer.json" and (out / "tokenizer_config.json").is_file()
    assert sample.main(["--ckpt", str(out), "--prompt", "Question", "--max_new_tokens", "4"]) == 0
    assert export.main(["--ckpt", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
