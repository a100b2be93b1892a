"""export.py --gguf, read back with the gguf package's own GGUFReader (ggml's): every tensor is hf.py's
folded Llama tensor (whose logits test_hf.py checks against transformers), the metadata is what
llama.cpp's loader reads for the llama architecture, and the file computes our logits when run with
llama.cpp's formulas (interleaved RoPE pairs), written out here in float64. A released tokenizer.json
becomes llama.cpp's SentencePiece vocabulary, whose ids a plain copy of llama.cpp's SPM algorithm,
reading the file alone, must reproduce. llama.cpp itself runs the file in tools/llama_cpp_check.py
(a build of minutes: not a test)."""
import collections
import copy
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
import tokenizers
import gguf   # ggml's reader (requirements-test.txt pins it); export.py itself refuses in one line without it

import checkpoint
import data
import export
import gguf_spm
import hf
import tokenizer
from cli import UsageError
from conftest import ROOT, small_config
from minicpm import MiniCPM
from test_minicpm import perturbed

TEXT = open(f"{ROOT}/train.py", encoding="utf-8").read()   # real text for a small BPE


def save_ckpt(folder, vocab_size=300, spec="bpe:300", seed=0, **model):
    """A train.py-style checkpoint: random weights (random norm gains), GQA, untied head."""
    # init_std 0.5 gives sharp logits, GQA makes k_proj's interleave differ from q_proj's, and the
    # untied head must be divided by m while the embedding is multiplied by scale_emb
    if spec.startswith("bpe:"):
        vocab, _ = data.learn_bpe(collections.Counter(data.split_chunks(TEXT)), vocab_size - 1)
        data.write_rank_file(folder / "tokenizer.tiktoken", vocab)
    torch.manual_seed(seed)
    net = perturbed(MiniCPM(small_config(vocab_size=vocab_size, init_std=0.5, tie_word_embeddings=False, **model)))
    record = dict(spec=spec, rank_file="tokenizer.tiktoken" if spec.startswith("bpe:") else None,
                  eot_id=vocab_size - 1, vocab_size=vocab_size)
    checkpoint.save(folder, "pretrain", net, step=0, tokenizer=record)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint with linear RoPE scaling, exported at each --gguf_dtype -> (model, folder, {dtype: reader})."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = save_ckpt(folder, rope_theta=5e5, rope_scaling="linear", rope_factor=2.0)
    readers = {}
    # through the command line, as a user runs it: the flags, the checks and the atomic write included
    for dtype in export.GGUF_DTYPES:
        path = folder / f"model-{dtype}.gguf"
        assert export.main(["--ckpt", str(folder), "--gguf", str(path), "--gguf_dtype", dtype]) == 0
        readers[dtype] = gguf.GGUFReader(path)
    return model, folder, readers


def value(reader, key):
    # contents(): the field decoded (a string, a number, a list), as llama.cpp's gguf_get_* would
    return reader.fields[key].contents()


def llama_names(n_layer):
    """GGUF tensor names (llama.cpp's llama) -> ours, written out by hand."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm", attn_q="self_attn.q_proj",
                     attn_k="self_attn.k_proj", attn_v="self_attn.v_proj", attn_output="self_attn.o_proj",
                     ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
    for i in range(n_layer):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in per_layer.items()})
    return names


def tensor(t):
    """A ReaderTensor as a float32 torch tensor in PyTorch's [out, in] shape."""
    raw = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:   # read as bytes: 2 per value
        return torch.from_numpy(raw.copy().view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw.astype(np.float32))


def rotate_half_rows(w, n_heads):
    """Undo the file's q/k row order, element by element: its row 2j + c of a head is our row c * hd/2 + j."""
    hd = w.shape[0] // n_heads
    order = [h * hd + c * hd // 2 + j for h in range(n_heads) for j in range(hd // 2) for c in range(2)]
    out = torch.empty_like(w)
    out[order] = w
    return out


# ----------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("dtype,rtol", [("f32", 0.0), ("f16", 2 ** -11), ("bf16", 2 ** -8)])
def test_every_tensor_is_the_folded_one(exported, dtype, rtol):
    model, _, readers = exported
    # hf.llama_state is the fold test_hf.py checks against transformers: the file must hold exactly it
    cfg, folded = model.config, hf.llama_state(model)
    names = llama_names(cfg.n_layer)
    tensors = {t.name: t for t in readers[dtype].tensors}
    assert set(tensors) == set(names) and len(names) == len(folded)
    for name, t in tensors.items():
        got, want = tensor(t), folded[names[name]]
        if name.endswith("attn_q.weight"):
            got = rotate_half_rows(got, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            got = rotate_half_rows(got, cfg.n_kv_head)
        assert got.shape == want.shape, name
        # 1-D gains are kept f32; matrices rounded once from the float32 fold (half an ulp: 2^-11, 2^-8)
        if want.dim() == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, want), name
        else:
            assert t.tensor_type.name == dtype.upper(), name
            torch.testing.assert_close(got, want, rtol=rtol, atol=2 ** -24, msg=name)


def llama_cpp_reference(reader, ids):
    """The logits llama.cpp's llama graph computes from the file, in float64 numpy: RMSNorm, GQA
    attention with RoPE on adjacent pairs (its LLAMA_ROPE_TYPE_NORM), SwiGLU, no multipliers."""
    T = {t.name: tensor(t).double().numpy() for t in reader.tensors}
    n_head, n_kv = value(reader, "llama.attention.head_count"), value(reader, "llama.attention.head_count_kv")
    eps, base = value(reader, "llama.attention.layer_norm_rms_epsilon"), value(reader, "llama.rope.freq_base")
    scale = 1 / value(reader, "llama.rope.scaling.factor")   # linear: llama.cpp's freq_scale
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g   # noqa: E731
    x = T["token_embd.weight"][ids]                                   # [T, d]
    n, d = x.shape
    hd = d // n_head
    angle = np.arange(n)[:, None] * scale * base ** (-np.arange(0, hd, 2) / hd)   # [T, hd/2]
    def rope(v):   # v [T, heads, hd]: pairs (v[2j], v[2j+1]) rotated by angle j
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(v.shape)
    for i in range(value(reader, "llama.block_count")):
        W = lambda k: T[f"blk.{i}.{k}.weight"]   # noqa: E731
        h = norm(x, W("attn_norm"))
        q, k = rope((h @ W("attn_q").T).reshape(n, n_head, hd)), rope((h @ W("attn_k").T).reshape(n, n_kv, hd))
        v = (h @ W("attn_v").T).reshape(n, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)   # each KV head serves a group
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        x = x + np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, d) @ W("attn_output").T
        h = norm(x, W("ffn_norm"))
        g = h @ W("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ W("ffn_up").T)) @ W("ffn_down").T
    return norm(x, T["output_norm.weight"]) @ T["output.weight"].T   # [T, V]


def test_the_file_computes_our_logits_with_llama_cpps_formulas(exported):
    model, _, readers = exported
    # a wrong row order, a missing multiplier or a swapped head count each change these logits
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))
    theirs = torch.from_numpy(llama_cpp_reference(readers["f32"], ids.numpy()))
    ours = copy.deepcopy(model).double()(ids[None])[0][0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


# ----------------------------------------------------------------------------- metadata

def test_metadata_is_what_llama_cpp_reads(exported):
    model, folder, readers = exported
    # the keys llama.cpp's loader reads for LLM_ARCH_LLAMA, with the values our config means; a key it
    # lacks falls back to a default (e.g. no add_bos_token: llama-bpe adds a BOS our model never saw)
    cfg, reader = model.config, readers["f32"]
    expected = {"general.architecture": "llama", "llama.context_length": cfg.block_size,
                "llama.embedding_length": cfg.n_embd, "llama.block_count": cfg.n_layer,
                "llama.feed_forward_length": cfg.ffn_dim, "llama.attention.head_count": cfg.n_head,
                "llama.attention.head_count_kv": cfg.n_kv_head, "llama.rope.dimension_count": cfg.n_embd // cfg.n_head,
                "llama.rope.freq_base": 5e5, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0,
                "llama.vocab_size": 300, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.bos_token_id": 299, "tokenizer.ggml.eos_token_id": 299,
                "tokenizer.ggml.add_bos_token": False, "general.file_type": 0}
    assert {k: value(reader, k) for k in expected} == expected
    assert value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-7)  # a float32
    assert value(readers["f16"], "general.file_type") == 1 and value(readers["bf16"], "general.file_type") == 32
    # the vocabulary against tokenizer.json, which AutoTokenizer reads to our ids (test_tokenizer.py)
    enc = tokenizer.load_tokenizer("bpe:300", str(folder / "tokenizer.tiktoken"))
    tokenizer.write_hf_tokenizer(str(folder / "hf"), enc)
    spec = json.loads((folder / "hf" / "tokenizer.json").read_text())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    assert value(reader, "tokenizer.ggml.tokens") == [vocab[i] for i in range(300)]
    assert value(reader, "tokenizer.ggml.token_type") == [1] * 299 + [3]   # normal, then <|endoftext|>: control
    assert value(reader, "tokenizer.ggml.merges") == spec["model"]["merges"]


def test_byte_tokenizer_and_untouched_rope(tmp_path):
    save_ckpt(tmp_path, vocab_size=257, spec="byte")
    assert export.main(["--ckpt", str(tmp_path), "--gguf", str(tmp_path / "byte.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "byte.gguf")
    spell = tokenizer.byte_unicode_map()
    assert value(reader, "tokenizer.ggml.tokens") == [spell[b] for b in range(256)] + ["<|endoftext|>"]
    # no merges: one that can never apply (GGUF has no empty arrays, and llama.cpp requires the key)
    assert value(reader, "tokenizer.ggml.merges") == ["ĠĠ ĠĠ"]
    assert "llama.rope.scaling.type" not in reader.fields and value(reader, "llama.rope.freq_base") == 10000.0


# ----------------------------------------------------------------------------- refusals

def test_refusals_are_one_line_and_write_nothing(exported, tmp_path, capsys):
    _, folder, _ = exported
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    moe = tmp_path / "moe"
    moe.mkdir()
    save_ckpt(moe, vocab_size=257, spec="byte", n_experts=4, top_k=2)
    capsys.readouterr()
    # each refusal names what to change, and comes before the file (or its temporary) is opened
    cases = [(["--ckpt", str(folder), "--gguf", str(tmp_path / "a.gguf"), "--gguf_dtype", "q8_0"], "--gguf_dtype"),
             (["--ckpt", str(folder), "--gguf", str(tmp_path)], "is a folder"),
             (["--ckpt", str(folder), "--gguf", str(tmp_path / "taken.gguf")], "--overwrite"),
             (["--ckpt", str(moe), "--gguf", str(tmp_path / "moe.gguf")], "no experts")]
    for argv, named in cases:
        assert export.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and named in err, err
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "taken.gguf"]   # nothing written


def test_unknown_pre_split_is_refused():
    # GPT-2's split ("gpt-2" in llama.cpp) differs from ours on digits and code: a wrong name would
    # tokenize differently without any error, so only the pattern known to match is named
    gpt2_split = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    with pytest.raises(UsageError, match="no llama.cpp pre-tokenizer") as e:
        export.gguf_pre(gpt2_split)
    assert "\n" not in str(e.value)
    assert export.gguf_pre(tokenizer.GPT4_SPLIT) == "llama-bpe"


def test_llama_cpp_check_downloads_nothing(exported, tmp_path, capsys):
    # tools/llama_cpp_check.py without a cached build: it names the one command that fetches the
    # sdist, and a file that is not one is refused; both before any build starts
    sys.path.insert(0, f"{ROOT}/tools")
    import llama_cpp_check
    _, folder, _ = exported
    (tmp_path / "not-an-sdist.tar.gz").write_bytes(b"plain bytes")
    capsys.readouterr()
    assert llama_cpp_check.main(["--ckpt", str(folder), "--cache", str(tmp_path / "cache")]) == 2
    assert "pip download llama-cpp-python==0.3.36" in capsys.readouterr().err
    assert llama_cpp_check.main(["--ckpt", str(folder), "--cache", str(tmp_path / "cache"),
                                 "--sdist", str(tmp_path / "not-an-sdist.tar.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a readable .tar.gz" in err


# ----------------------------------------------------------------------------- released tokenizers (SentencePiece-style)

# what a SentencePiece vocabulary meets: code, Chinese, characters it lacks (emoji, "ž": byte pieces),
# whitespace runs, tabs and newlines, digits, accents precomposed and combining, other scripts
SPM_SAMPLES = [
    'def main():\n    xs = [1, 22, 333, 4444]  # sum\n\treturn f"{sum(xs)!r}"\r\n', "中文文本测试。我们的模型很小，但是可以读中文。",
    "emoji 😀👍🏽 🇫🇷 and a family 👨\u200d👩\u200d👧, ž and ☃", "spaces:    four,  two\t\ttabs   \n\n\n  end  ",
    "digits 1234567890 3.14159 2026-12-04 007", "accents: café naïve Zürich résumé e\u0301te\u0301 Straße",
    "Привет, мир! Γειά σου κόσμε.", "self.assertEqual(config.vocab_size, 122753)", "x", "",
    "   leading spaces", " one leading space",
]


def spm_folder(folder, style):
    """A released-style folder (test_tokenizer.released_folder's layout: <unk> <s> </s>, 256 byte pieces,
    then pieces with "▁") whose merges are written as Hugging Face's SentencePiece converter writes them."""
    from test_tokenizer import CONTROL, released_folder
    released_folder(folder, style)
    # pieces learned on code and Chinese, of up to 12 characters, across spaces as SentencePiece allows
    trainer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    text = TEXT[:20000] + "中文文本测试。我们的模型很小，但是可以读中文。Café naïve résumé Zürich.\n" * 5
    trainer.train_from_iterator([text[i:i + 200] for i in range(0, len(text), 200)], tokenizers.trainers.BpeTrainer(
        vocab_size=700, special_tokens=CONTROL, max_token_length=12, show_progress=False))
    learned = json.loads(trainer.to_str())["model"]["vocab"]
    vocab = {p: i for i, p in enumerate(CONTROL + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned, key=learned.get):
        vocab.setdefault(piece, len(vocab))
    # the converter (transformers' SentencePieceExtractor): every split of every piece into two pieces,
    # pieces in score order (here: id order), a piece's splits by the ids of their halves
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"].update(vocab=vocab, merges=[f"{a} {b}" for a, b in merges])
    tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(folder / "tokenizer.json"))
    return folder


def save_released_ckpt(folder, style, pad=0):
    """A checkpoint whose tokenizer is a released folder's tokenizer.json (train.py --init_from's record)."""
    spm_folder(folder, style)
    n = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    net = perturbed(MiniCPM(small_config(vocab_size=n + pad, init_std=0.5, tie_word_embeddings=False)))
    record = dict(spec="tokenizer.json", rank_file="tokenizer.json", eot_id=2, vocab_size=n + pad)
    checkpoint.save(folder, "pretrain", net, step=0, tokenizer=record)
    return net.eval(), n


def llama_spm(reader, text):
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session::tokenize), naively, from the file alone: " " ->
    "▁" (one more in front with add_space_prefix), UTF-8 characters joined pair by pair, the pair whose
    concatenation is a token of the highest score first (leftmost on ties); leftovers as <0xXX> bytes."""
    tokens, scores = value(reader, "tokenizer.ggml.tokens"), value(reader, "tokenizer.ggml.scores")
    ids = {t: i for i, t in enumerate(tokens)}
    if text and value(reader, "tokenizer.ggml.add_space_prefix"):
        text = " " + text
    symbols = list(text.replace(" ", "▁"))
    while True:
        joinable = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not joinable:
            break
        i = -max(joinable)[1]   # the highest score; of equal ones, the smallest i (the leftmost)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def llama_spm_specials(reader, text):
    """llama_tokenize with parse_special: the texts of control, unknown and user-defined tokens cut out
    first (tokenizer_st_partition), then each text fragment tokenized alone, "▁" in front of each."""
    tokens, types = value(reader, "tokenizer.ggml.tokens"), value(reader, "tokenizer.ggml.token_type")
    specials = sorted((t for t, k in zip(tokens, types) if k in (2, 3, 4)), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    return [i for p in parts if p for i in ([tokens.index(p)] if p in specials else llama_spm(reader, p))]


@pytest.mark.parametrize("style", ["old", "new"])
def test_released_tokenizer_is_llama_cpps_spm_vocabulary(style, tmp_path, capsys):
    model, n = save_released_ckpt(tmp_path, style, pad=3)
    assert export.main(["--ckpt", str(tmp_path), "--gguf", str(tmp_path / "r.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "r.gguf")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = {i: p for p, i in spec["model"]["vocab"].items()}
    tokens = value(reader, "tokenizer.ggml.tokens")
    assert tokens == [vocab[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, n + 3)]
    # <unk>: unknown; <s>, </s>: control; <0x00>..<0xFF>: bytes; the padded rows: unused; the rest normal
    assert value(reader, "tokenizer.ggml.token_type") == [2, 3, 3] + [6] * 256 + [1] * (n - 259) + [5] * 3
    expected = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
                "tokenizer.ggml.add_space_prefix": True, "llama.vocab_size": n + 3}
    assert {k: value(reader, k) for k in expected} == expected
    assert "tokenizer.ggml.merges" not in reader.fields   # the "llama" model merges by scores
    # a piece's score: minus the rank of its first merge (the converter's merges of a piece are consecutive)
    scores, first = value(reader, "tokenizer.ggml.scores"), {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        first.setdefault("".join(merge), rank)   # tokenizers saves a merge as [left, right]
    assert all(scores[i] == -first[t] for i, t in enumerate(tokens) if t in first)
    assert all(scores[i] < -len(first) for i, t in enumerate(tokens) if t not in first)   # never a joined pair's
    # the tensors: the checkpoint's folded ones, as for our own tokenizers
    folded, names = hf.llama_state(model), llama_names(model.config.n_layer)
    for t in reader.tensors:
        got = tensor(t)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            got = rotate_half_rows(got, model.config.n_head if "attn_q" in t.name else model.config.n_kv_head)
        assert torch.equal(got, folded[names[t.name]]), t.name
    # the ids: llama.cpp's algorithm on the file's scores against the tokenizers package on tokenizer.json
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    windows = [TEXT[i:i + 120] for i in range(0, 40000, 1000)]   # code the vocabulary partly saw, and beyond
    for text in SPM_SAMPLES + windows:
        want = tok.encode(text, add_special_tokens=False).ids
        if style == "new" and text.startswith(" "):   # Metaspace adds no "▁" before a space; llama.cpp does
            assert llama_spm(reader, text) == tok.encode("▁" + text, add_special_tokens=False).ids, text
            continue
        assert llama_spm(reader, text) == want, text
    # special tokens typed in a text (sample.py's prompts, llama.cpp's by default): cut out by both; the
    # older layout's normalizer then puts a "▁" before each fragment, as llama.cpp does
    if style == "old":
        for text in ["a</s>more", "<s>x <unk>y</s>", "</s>", "x </s>\n<s>"]:
            assert llama_spm_specials(reader, text) == tok.encode(text, add_special_tokens=False).ids, text
    err = capsys.readouterr().err
    assert ("begins with a space" in err) == (style == "new")


def test_released_bos_rule_and_vocabulary_size(tmp_path, capsys):
    save_released_ckpt(tmp_path, "old")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert export.main(["--ckpt", str(tmp_path), "--gguf", str(tmp_path / "r.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "r.gguf")   # no BOS added, as the folder says; still named
    assert (value(reader, "tokenizer.ggml.add_bos_token"), value(reader, "tokenizer.ggml.bos_token_id")) == (False, 1)
    # a model with fewer embedding rows than the tokenizer has tokens: some ids would have no row
    with pytest.raises(UsageError, match="more than the model's 10 embedding rows") as e:
        gguf_spm.vocabulary(str(tmp_path / "tokenizer.json"), tokenizer.FolderTokenizer(str(tmp_path)), 10)
    assert "\n" not in str(e.value)


def test_released_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path, capsys):
    from test_tokenizer import released_folder
    model, _ = save_released_ckpt(tmp_path, "old")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())

    def refused(spec, change, named):
        changed = copy.deepcopy(spec)
        change(changed)
        (tmp_path / "tokenizer.json").write_text(json.dumps(changed, ensure_ascii=False))
        capsys.readouterr()
        assert export.main(["--ckpt", str(tmp_path), "--gguf", str(tmp_path / "r.gguf")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and named in err and not (tmp_path / "r.gguf").exists(), err

    merges = spec["model"]["merges"]
    # one piece made by two merges with another piece's merge between: one score cannot order both
    two = next(i for i in range(len(merges) - 1) if "".join(merges[i]) == "".join(merges[i + 1]))
    refused(spec, lambda s: s["model"]["merges"].insert(two + 1, merges[two - 1]), "with others between them")
    # a split of a piece that is no merge: llama.cpp would join it all the same
    refused(spec, lambda s: s["model"]["merges"].remove(merges[-1]), "does not merge")
    refused(spec, lambda s: s["model"].update(byte_fallback=False), "byte_fallback")
    refused(spec, lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer")
    # a tokenizer trained by the tokenizers package (one merge a piece), laid out as a release: refused
    released_folder((tmp_path / "trained").mkdir() or tmp_path / "trained", "old")
    trained = json.loads((tmp_path / "trained" / "tokenizer.json").read_text())
    trained["model"]["vocab"].update({f"<extra_{i}>": i for i in range(len(trained["model"]["vocab"]), model.config.vocab_size)})
    refused(trained, lambda s: None, "does not merge")
