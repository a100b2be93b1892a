"""Tests for instruct.py: the same items on every run, the counts, no held-out answer in the training
conversations, the knowledge lines really frequent in the corpus, and exact-match grading by hand."""
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

import chat
import instruct

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_text():
    """Every training conversation's text, user and assistant, as one string."""
    return "\n".join(m["content"] for c in instruct.conversations("train") for m in c["messages"])


def test_same_items_in_another_process(tmp_path):
    # another interpreter with another hash seed: nothing may depend on set order or hash() salting
    out = tmp_path / "train.jsonl"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "instruct.py"), "--out", str(out)], check=True, env=env,
                   capture_output=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == instruct.conversations("train")


def test_counts_and_shapes():
    train, val = instruct.conversations("train"), instruct.conversations("val")
    count = lambda rows, fam: sum(r["family"] == fam for r in rows)   # noqa: E731
    assert count(val, "knowledge") == count(val, "skill") == instruct.N_HELD_OUT == 250
    # 40 x 40 calls less the 250 held out, and the 40 calls with no argument; ~950 cuts of frequent lines
    assert count(train, "skill") == 40 * 40 - 250 + 40 and 500 <= count(train, "knowledge") <= 2000 and len(train) >= 2000
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in train + val)
    exact = chat.instruct_items("val")
    assert len(exact) == len(val) and {e["family"] for e in exact} == {"knowledge", "skill"}
    for e, c in zip(exact, val):   # the prompt is MiniCPM's template around the question, written out here
        assert e["prompt"] == "<用户>" + c["messages"][0]["content"] + "<AI>" and e["answer"] == c["messages"][1]["content"]


def test_no_held_out_answer_in_training(train_text):
    for item in instruct.items("val"):
        if item["family"] == "skill":   # the call never seen in training; its two names each seen, in other calls
            name, arg = item["answer"].rstrip(")").split("(")
            assert item["answer"] not in train_text and f"{name}(" in train_text and f"({arg})" in train_text
        else:   # the whole held-out line is in no training conversation; its completion is pre-training's
            assert item["line"] not in train_text
    novel = [i for i in instruct.items("val") if i.get("novel")]
    trained_answers = {i["answer"] for i in instruct.items("train")}
    assert 150 <= len(novel) < 250 and not {i["answer"] for i in novel} & trained_answers
    held = {i["line"] for i in instruct.items("val") if i["family"] == "knowledge"}
    assert not held & {i["line"] for i in instruct.items("train") if i["family"] == "knowledge"}


def test_knowledge_lines_are_frequent_in_the_corpus_and_cut_in_two():
    # counted here again by a plain scan of the library's files, for a sample of held-out lines
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    sample = [i for i in instruct.items("val") if i["family"] == "knowledge"][:5]
    counts = dict.fromkeys((i["line"] for i in sample), 0)
    for path in root.rglob("*.py"):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
            if line.strip() in counts:
                counts[line.strip()] += 1
    for item in sample:
        assert counts[item["line"]] == item["count"] >= instruct.MIN_COUNT
        prefix = item["user"].removeprefix("Complete this line of Python: ")
        assert item["line"].replace(" ", "") == (prefix + item["answer"]).replace(" ", "") and item["answer"]


def test_skill_answers_are_the_call_asked_for():
    for item in instruct.items("train") + instruct.items("val"):
        if item["family"] == "skill":
            words = item["user"].rstrip(".").split()   # "... function NAME with no arguments" / "... argument ARG"
            want = f"{words[6]}()" if item["user"].endswith("no arguments.") else f"{words[6]}({words[-1]})"
            assert item["answer"] == want
    held = [i for i in instruct.items("val") if i["family"] == "skill"]
    assert all(i["user"].endswith(f"argument {i['answer'][:-1].split('(')[1]}.") for i in held)   # all with one argument


def test_grade_by_hand():
    items = [dict(family="skill", answer="f()"), dict(family="skill", answer="g(x)"),
             dict(family="knowledge", answer="self):", novel=False), dict(family="knowledge", answer="PIPE,", novel=True),
             dict(family="knowledge", answer="win32\":", novel=True)]
    outputs = ["  f()\n", "g(y)", "self):", "PIPE", 'win32":']   # stripped exact match: right, wrong, right, wrong, right
    assert instruct.grade(items, outputs) == {"skill": (1, 2), "knowledge": (2, 3), "all": (3, 5), "knowledge/novel": (1, 2)}
    with pytest.raises(ValueError):
        instruct.grade(items, outputs[:3])


def test_bad_split_is_one_line(tmp_path, capsys):
    assert instruct.main(["--out", str(tmp_path / "x.jsonl"), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("instruct.py: --split") and "\n" not in err and not (tmp_path / "x.jsonl").exists()
