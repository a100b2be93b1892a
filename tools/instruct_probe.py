"""Does instruct.py's instruction set teach a tiny model at CPU scale? Held-out exact match, per family, as
training goes on (§5's decay-phase mixture: pre-training text with the SFT conversations mixed in).

    OMP_NUM_THREADS=1 nice -n 10 python tools/instruct_probe.py --work /tmp/probe --steps 150,300,600

Builds WORK/src/ (the stdlib's .py files + the training conversations as chat-template text, repeated
--repeat times, one document each), trains train.py's tiny model on it with --tokenizer byte in segments
(--stop_at), and after each segment scores instruct.exact_items with greedy decoding (KV cache, stop at
EOS, stripped exact match). --drop_held_out removes the held-out knowledge lines from the corpus: the
control for the knowledge family (--no_corpus leaves the stdlib out altogether).
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atomic  # noqa: E402
import checkpoint  # noqa: E402
import chat  # noqa: E402
import data  # noqa: E402
import instruct  # noqa: E402
import sample  # noqa: E402


def build_source(src: pathlib.Path, repeat: int, corpus: bool, drop_held_out: bool = False):
    """WORK/src: the corpus files and one .jsonl of conversations rendered as plain text."""
    if src.exists():   # a rerun (another --steps) trains on the same text: the dataset is reused
        return
    src.mkdir(parents=True)
    # the control run drops every line that is a held-out knowledge answer's line: what is left of
    # that family's accuracy is syntax the model can guess, not recall from pre-training
    held = {i["line"] for i in instruct.items("val") if i["family"] == "knowledge"} if drop_held_out else set()
    if corpus:   # the stdlib as data.py reads it: one document per file
        for i, text in enumerate(instruct.stdlib_texts()):
            kept = "\n".join(line for line in text.split("\n") if line.strip() not in held)
            (src / f"{i:05d}.py").write_text(kept, errors="replace")
    # our tokenizers: no BOS, the reply ends with the EOT that data.py puts after every document
    lines = [json.dumps({"text": chat.render_prompt(c["messages"][0]["content"]) + c["messages"][1]["content"]},
                        ensure_ascii=False) for c in instruct.conversations("train")]
    (src / "instruct.jsonl").write_text("".join(line + "\n" for line in lines * repeat))


def score(ckpt_dir, split, limit):
    """{family: accuracy} of greedy replies to the split's exact items (the first `limit`)."""
    # the run's own tokenizer record: the rank file beside the checkpoint, as sample.py reads it
    ckpt = checkpoint.load(str(ckpt_dir))
    model = checkpoint.build_model(ckpt, "cpu").eval()
    enc = data.load_tokenizer(ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt))
    items = chat.instruct_items(split)[:limit]
    outputs, by_kind = [], {}
    for item in items:
        ids = [enc.eot_token] + enc.encode_ordinary(item["prompt"])   # chat.prompt_ids, from the prompt text
        # greedy and stopped at EOS, as an eval script would; 64 tokens is past every answer's length
        new = sample.generate(model, ids, 64, temperature=0, stop_id=enc.eot_token)
        outputs.append(enc.decode(new))
    for item, out in zip(items, outputs):   # the skill family by its two questions
        kind = item["family"] + ("/noarg" if "no arguments" in item["prompt"] else "/arg" if item["family"] == "skill" else "")
        ok, n = by_kind.get(kind, (0, 0))
        by_kind[kind] = (ok + (out.strip() == item["answer"]), n + 1)
    graded = {**instruct.grade(items, outputs), **by_kind}
    return {k: round(ok / n, 3) for k, (ok, n) in sorted(graded.items())}, list(zip(items[:6], outputs[:6]))


def sft(run_dir, work, steps, lr, seq_len=128, batch_size=16):
    """SFT after the mixture (§5): the masked loss on chat.prepare's instruct folder, same tokenizer."""
    # a plain loop, not train.py: only the replies are scored (chat.get_batch puts -100 elsewhere)
    ckpt = checkpoint.load(str(run_dir))
    model = checkpoint.build_model(ckpt, "cpu").train()
    rank = checkpoint.rank_file_path(ckpt)
    folder = chat.prepare("instruct", ckpt["tokenizer"]["spec"], str(work / "data"), rank_file=rank, quiet=True)
    # the model's muP groups (§3.1), no weight decay: a few hundred steps on a small set
    opt = torch.optim.AdamW(model.param_groups(lr, 0.0), lr=lr, betas=(0.9, 0.95))
    base = [g["lr"] for g in opt.param_groups]
    for step in range(steps):
        x, y = chat.get_batch(folder / "train.bin", batch_size, seq_len, seed=1, step=step)
        _, loss = model(x, y)
        for g, b in zip(opt.param_groups, base):   # warmup 10 steps, then a linear decay to 10%
            g["lr"] = b * min(1, (step + 1) / 10) * (1 - 0.9 * step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    out = work / "sft"
    out.mkdir(exist_ok=True)
    # saved as the run was (kind, config, tokenizer record), so score() and sample.py read it alike
    atomic.atomic_save({**ckpt, "model": model.state_dict(), "optimizer": None}, str(out / "ckpt.pt"))
    if rank:
        shutil.copyfile(rank, out / os.path.basename(rank))
    return out, loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/instruct_probe")
    p.add_argument("--steps", default="150,300,600")
    p.add_argument("--repeat", type=int, default=32)
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--no_corpus", action="store_true")
    p.add_argument("--drop_held_out", action="store_true", help="the control: the corpus without the held-out lines")
    p.add_argument("--train_limit", type=int, default=200)
    p.add_argument("--sft_steps", type=int, default=0, help="then SFT this many steps on the instruct folder (masked)")
    p.add_argument("--sft_lr", type=float, default=0.003)
    p.add_argument("--sft_only", action="store_true", help="skip the mixture run: SFT from WORK/run as it is")
    a = p.parse_args()
    work = pathlib.Path(a.work)
    build_source(work / "src", a.repeat, not a.no_corpus, a.drop_held_out)
    steps = [int(s) for s in a.steps.split(",")]
    out = work / "run"
    base = [sys.executable, str(ROOT / "train.py"), "--tokenizer", a.tokenizer, "--max_steps", str(steps[-1]),
            "--eval_interval", "100", "--eval_tokens", "16384", "--log_interval", "25", "--device", "cpu"]
    # segments of one run (--stop_at, then --resume): the schedule is max_steps', whatever the stop
    for i, step in enumerate([] if a.sft_only else steps):
        t = time.time()
        flags = (["--resume", str(out)] if i else ["--source", str(work / "src"), "--data_dir", str(work / "data"),
                                                    "--out_dir", str(out), "--overwrite"]) + ["--stop_at", str(step)]
        subprocess.run(base + flags, check=True, stdout=subprocess.DEVNULL)
        train_s = time.time() - t
        # held out: what the report is about; training items: whether the format was learned at all
        held, examples = score(out, "val", 10**9)
        seen, _ = score(out, "train", a.train_limit)
        print(json.dumps(dict(step=step, train_s=round(train_s), held_out=held, train_items=seen)), flush=True)
        for item, output in examples:
            print(f"   {item['prompt']!r} -> {output!r} (want {item['answer']!r})", flush=True)
    if a.sft_steps:
        t = time.time()
        folder, loss = sft(out, work, a.sft_steps, a.sft_lr)
        held, examples = score(folder, "val", 10**9)
        seen, _ = score(folder, "train", a.train_limit)
        print(json.dumps(dict(sft_steps=a.sft_steps, sft_s=round(time.time() - t), sft_loss=round(loss, 3),
                              held_out=held, train_items=seen)), flush=True)
        for item, output in examples:
            print(f"   {item['prompt']!r} -> {output!r} (want {item['answer']!r})", flush=True)


if __name__ == "__main__":
    main()
