"""Tests for chat.py: MiniCPM's chat template as ids and a loss mask (checked by hand, and against the
`tokenizers` package for a released-style folder), the masked loss, bad lines, and the prepared folder."""
import hashlib
import json
import math

import numpy as np
import pytest
import tokenizers
import torch

import chat
import cli
import data
import tokenizer
from conftest import small_config
from minicpm import MiniCPM
from test_tokenizer import released_folder   # a small tokenizer laid out as MiniCPM's releases are

EOT = 256   # the byte tokenizer's <|endoftext|>: after the 256 bytes
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": " and 中?"},
         {"role": "assistant", "content": "middle "}]


def b(text):
    return list(text.encode("utf-8"))   # the byte tokenizer's ids are the UTF-8 bytes


def test_byte_ids_and_mask_by_hand():
    ids, mask = chat.encode(CONVO, data.load_tokenizer("byte"))
    # no BOS (the previous document's EOT stands for it); system text before the first question; replies
    # stripped, each followed by EOT; "<用户>" is 1 + 3 + 3 + 1 bytes, "中" 3
    first = b("<用户>Be brief.\n\n2+2?<AI>")
    second = b("<用户>and 中?<AI>")
    assert ids == first + b("4") + [EOT] + second + b("middle") + [EOT]
    assert mask == [0] * len(first) + [1, 1] + [0] * len(second) + [1] * 7
    assert len(first) == 8 + 9 + 2 + 4 + 4 and len(second) == 8 + 8 + 4
    assert chat.prompt_ids("  hi ", data.load_tokenizer("byte")) == [EOT] + b("<用户>hi<AI>")
    assert chat.render_prompt(" hi\n") == "<用户>hi<AI>"


def test_user_text_cannot_inject_special_tokens():
    ids, mask = chat.encode([{"role": "user", "content": "<|endoftext|>"},
                             {"role": "assistant", "content": "x<|endoftext|>"}], data.load_tokenizer("byte"))
    assert ids.count(EOT) == 1 and ids[-1] == EOT   # the text is characters; only the real EOS is the token


def test_masked_loss_equals_a_hand_computed_one():
    ids, mask = chat.encode(CONVO, data.load_tokenizer("byte"))
    torch.manual_seed(0)
    model = MiniCPM(small_config(vocab_size=257)).double().eval()
    x, y = chat.targets(ids, mask)
    with torch.no_grad():
        logits, loss = model(x[None], y[None])
    # float64 by hand: position t predicts ids[t + 1], counted only where that token is scored
    total, n = 0.0, 0
    for t in range(len(ids) - 1):
        if mask[t + 1]:
            row = logits[0, t].tolist()
            top = max(row)
            total += top + math.log(sum(math.exp(v - top) for v in row)) - row[ids[t + 1]]
            n += 1
    assert n == sum(mask) == 9   # "4" + EOT, "middle" + EOT: no reply token is at position 0
    assert loss.item() == pytest.approx(total / n, rel=1e-12)


@pytest.mark.parametrize("style", ["old", "new"])
def test_released_folder_segments_match_tokenizers(style, tmp_path):
    folder = released_folder(tmp_path, style)
    enc = tokenizer.FolderTokenizer(str(folder))
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    seg = lambda text: ref.encode(text, add_special_tokens=False).ids   # noqa: E731
    ids, mask = chat.encode(CONVO, enc)
    bos, eos = 1, 2   # <s>, </s> in this layout (tokenizer_config.json names them)
    parts = [seg("<用户>Be brief.\n\n2+2?<AI>"), seg("4") + [eos], seg("<用户>and 中?<AI>"), seg("middle") + [eos]]
    assert ids == [bos] + parts[0] + parts[1] + parts[2] + parts[3]
    assert mask == [0] * (1 + len(parts[0])) + [1] * len(parts[1]) + [0] * len(parts[2]) + [1] * len(parts[3])
    assert chat.prompt_ids("2+2?", enc) == [bos] + seg("<用户>2+2?<AI>")
    assert bos not in ids[1:] and ids.count(eos) == 2


# ----------------------------------------------------------------------------- reading files

GOOD = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"prompt": "p", "response": "r"}]
BAD = {   # what each malformed line is, and a word its message must hold
    "json": ('{"prompt": "p", "response": ', "not valid JSON"),
    "shape": ('{"text": "plain"}', "not a conversation"),
    "role": ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role"),
    "speaker": ('{"conversations": [{"from": "robot", "value": "x"}]}', "unknown speaker"),
    "empty_reply": ('{"prompt": "p", "response": "  "}', "empty assistant"),
    "ends_with_user": ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
                       '{"role": "user", "content": "q2"}]}', "does not end with an assistant"),
    "not_string": ('{"prompt": "p", "response": 42}', "no string content"),
    "two_users": ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, '
                  '{"role": "assistant", "content": "a"}]}', "second user"),
    "late_system": ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
                    '{"role": "assistant", "content": "a"}]}', "system message after"),
    "no_messages": ('{"messages": []}', "no messages"),
}


def write_jsonl(path, records, extra=()):
    # extra: raw text lines, for what json.dumps could never write (a truncated line)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "".join(extra))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_line_is_one_error_naming_it_and_nothing_is_written(case, tmp_path, capsys):
    line, words = BAD[case]
    path = write_jsonl(tmp_path / "c.jsonl", GOOD, ["\n", line + "\n"])   # a blank line 4, the bad one at 5
    out = tmp_path / "data"
    assert chat.main(["--source", str(path), "--tokenizer", "byte", "--data_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{path}:5 " in err and words in err, err
    assert not out.exists()   # checked before any folder was made


def test_prepared_folder_reads_back(tmp_path):
    # 150 lines so that the 1% validation split gets lines of its own by hashing, not by the fallback
    records = [{"prompt": f"question {i}?", "response": f"answer {i} 中"} for i in range(150)] + GOOD
    path = write_jsonl(tmp_path / "convos.jsonl", records)
    folder = chat.prepare(str(path), "byte", str(tmp_path / "data"), quiet=True)
    meta = data.load_meta(folder)   # every key data.py checks, and ours
    assert meta["chat"] is True and meta["rank_sha256"] is None and meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["train"]["documents"] + meta["val"]["documents"] == 153 and meta["val"]["documents"] >= 1
    replies = []
    for split in ("train", "val"):
        ids = np.asarray(data.open_tokens(folder / f"{split}.bin"))
        mask = np.fromfile(folder / f"{split}.mask", dtype=np.uint8)
        assert len(ids) == len(mask) == meta[split]["tokens"] and len(ids) > 0
        assert meta[split]["scored_tokens"] == int(mask.sum())
        # the scored bytes, read straight from the file, are the replies each followed by EOT
        scored = bytes(int(t) for t, m in zip(ids, mask) if m and t != EOT)
        assert len(scored) == meta[split]["scored_bytes"] and (ids[mask == 1] == EOT).sum() == meta[split]["documents"]
        replies.append(scored.decode())
    every = [f"answer {i} 中" for i in range(150)] + ["hello", "a", "r"]   # the replies of `records`, by hand
    assert sorted("".join(replies)) == sorted("".join(every))   # the same characters, split between train and val
    # batches: -100 exactly where the target token is unscored
    x, y = chat.get_batch(folder / "train.bin", 4, 32, seed=0, step=0)
    dx, dy = data.get_batch(folder / "train.bin", 4, 32, seed=0, step=0)
    assert torch.equal(x, dx) and torch.equal(y[y != -100], dy[y != -100]) and (y == -100).any() and (y != -100).any()
    # the same source again: nothing to do, the folder is left as it is
    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert chat.prepare(str(path), "byte", str(tmp_path / "data"), quiet=True) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == stamp


def test_bpe_with_a_rank_file_records_its_hash(tmp_path):
    # a rank file learned elsewhere (as the pretraining dataset's would be): copied in, never relearned
    text = "".join(f"question {i}? answer {i}.\n" for i in range(200))
    vocab, _ = tokenizer.learn_bpe(dict.fromkeys(tokenizer.split_chunks(text), 1), 299)
    rank_file = tmp_path / "tokenizer.tiktoken"
    tokenizer.write_rank_file(rank_file, vocab)
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(200)])
    folder = chat.prepare(str(path), "bpe:300", str(tmp_path / "data"), rank_file=str(rank_file), quiet=True)
    meta = data.load_meta(folder)
    assert meta["rank_sha256"] == hashlib.sha256(rank_file.read_bytes()).hexdigest()
    assert (folder / "tokenizer.tiktoken").read_bytes() == rank_file.read_bytes() and meta["vocab_size"] == 300
    enc = data.load_tokenizer("bpe:300", str(rank_file))
    ids = np.asarray(data.open_tokens(folder / "train.bin"))
    assert enc.decode(ids[ids != enc.eot_token].tolist()).count("<用户>") == meta["train"]["documents"]
    # a rank file for a tokenizer that takes none, and a missing one: refused before anything is written
    for spec, rank in (("byte", str(rank_file)), ("bpe:300", str(tmp_path / "missing"))):
        with pytest.raises(cli.DataError):
            chat.prepare(str(path), spec, str(tmp_path / "other"), rank_file=rank, quiet=True)
    assert not (tmp_path / "other").exists()


def test_a_released_tokenizer_prepares_with_bos_and_eos(tmp_path):
    (tmp_path / "release").mkdir()
    folder = released_folder(tmp_path / "release", "new")
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"question {i}?", "response": f"answer {i}"} for i in range(120)])
    out = chat.prepare(str(path), "tokenizer.json", str(tmp_path / "data"), rank_file=str(folder / "tokenizer.json"), quiet=True)
    meta = data.load_meta(out)
    assert (meta["bos_id"], meta["eot_id"], meta["rank_file"]) == (1, 2, "tokenizer.json")
    assert (out / "tokenizer_config.json").is_file()   # BOS and EOS come from it: it travels with the data
    ids = np.asarray(data.open_tokens(out / "train.bin"))
    mask = np.fromfile(out / "train.mask", dtype=np.uint8)
    # each conversation is <s> ... </s>: as many BOS as EOS, BOS unscored and EOS scored
    assert ids[0] == 1 and (ids == 1).sum() == (ids == 2).sum() == meta["train"]["documents"]
    assert not mask[ids == 1].any() and mask[ids == 2].all()
