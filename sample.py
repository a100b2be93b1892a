"""Generate text from a trained MiniCPM (a train.py run) or one in the released Hugging Face layout.

    python sample.py                                   # the default run's checkpoint, out/tiny
    python sample.py --ckpt out/wt-9m --prompt "def " --num_samples 3
    python sample.py --prompt @prompt.txt --temperature 0      # prompt read from a file; greedy
    python sample.py --hf export/                      # tokenizer from export/tokenizer_record.json
    python sample.py --hf export/ --tokenizer bpe:4096@export/tokenizer.tiktoken
    python sample.py --bench                           # tokens/s with and without the KV cache

Decoding uses the KV cache: one forward pass over the prompt (prefill), then one token per step;
--no_cache recomputes the whole sequence every step instead (the slow reference path). Sampling
order: temperature, then top-k, then top-p; temperature 0 is greedy. A sample stops at the
end-of-text token (not printed) or after --max_new_tokens; the prompt plus the new tokens must fit
the model's context (block_size), so --max_new_tokens is capped to fit, with a note on stderr.
An empty prompt starts a new document (the end-of-text token, which ends every training document).
Text is streamed to stdout as it is generated; a final line on stderr gives tokens/s.

HF folders exported by this project carry tokenizer_record.json: {"spec": "bpe:4096", "rank_file":
"tokenizer.tiktoken"} (rank_file relative to the folder, or null). --tokenizer SPEC[@RANK_FILE] gives
one instead (SPEC: bpe:N, byte, gpt2, cl100k_base, o200k_base; bpe:N needs its rank file). The
released MiniCPM's sentencepiece tokenizer.model is not supported here.
"""
import argparse
import codecs
import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, fields

import torch

import data
from minicpm import MiniCPM
from train import TrainError, flag, load_checkpoint, model_from_checkpoint, str2bool

BENCH_TOKENS = 512


@dataclass
class SampleConfig:
    ckpt: str = flag("out/tiny", "train.py checkpoint: ckpt.pt or the run folder holding it")
    hf: str = flag("", "sample from this Hugging Face layout folder instead of --ckpt")
    tokenizer: str = flag("", "SPEC[@RANK_FILE], e.g. byte, gpt2, bpe:4096@dir/tokenizer.tiktoken "
                              "(default: the checkpoint's own tokenizer record)")
    prompt: str = flag("", "text to continue, or @FILE to read it from a file ('': a new document)")
    num_samples: int = flag(1, "independent samples of the same prompt")
    max_new_tokens: int = flag(256, "new tokens per sample at most (capped to fit block_size)")
    temperature: float = flag(0.8, "softmax temperature; 0 = greedy (argmax)")
    top_k: int = flag(0, "sample only from the k most likely tokens (0: off)")
    top_p: float = flag(0.95, "nucleus sampling: the smallest set of tokens whose probability reaches p (1: off)")
    seed: int = flag(1337, "seed of the sampling random generator")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto (cuda when available)")
    dtype: str = flag("auto", "float32, bfloat16, float16, or auto (bfloat16 on CUDA, else float32)")
    no_cache: bool = flag(False, "recompute the full sequence every step (slow reference path)")
    bench: bool = flag(False, f"time {BENCH_TOKENS} greedy new tokens with and without the cache, then exit")


class SampleError(Exception):
    """A problem with the user's request: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- sampling

def top_p_filter(probs, p, tol=1e-6):
    """Keep the smallest set of most likely tokens whose total probability reaches p (within tol,
    so decimal inputs like 0.5 + 0.3 reach 0.8 despite rounding); zero the rest and renormalise.
    Ties are ordered by token id (a stable sort), so at the boundary the lower id is kept."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs        # mass of the more likely tokens
    keep_sorted = mass_before < p - tol                          # the first token is always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> next token ids [B]: greedy when temperature is 0, else temperature, top-k
    (exactly k tokens; ties broken by torch.topk) and top-p, then one draw from generator."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, ids, values)
    probs = top_p_filter(logits.softmax(-1), top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True, stop_id=None, on_token=None):
    """Continue prompt_ids (a list of ints); returns the new ids. Stops after max_new_tokens or when
    stop_id is drawn (stop_id is neither returned nor passed to on_token). on_token(id) is called
    for each new token as soon as it is drawn (for streaming)."""
    device = next(model.parameters()).device
    seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    step_input, new = seq, []
    for _ in range(max_new_tokens):
        # with the cache: the whole prompt once (prefill), then only the last token
        logits, _ = model(step_input if use_cache else seq, cache=cache)
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if token.item() == stop_id:
            break
        new.append(token.item())
        if on_token:
            on_token(new[-1])
        step_input = token.view(1, 1)
        if not use_cache:
            seq = torch.cat([seq, step_input], dim=1)
    return new


class TextStream:
    """Writes token bytes as text, holding back incomplete UTF-8 so characters are never split."""

    def __init__(self, enc, out):
        self.enc, self.out = enc, out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token):
        self.write(self.decoder.decode(self.enc.decode_single_token_bytes(token)))

    def write(self, text):
        self.out.write(text)
        self.out.flush()

    def close(self):  # whatever is left of an incomplete character becomes U+FFFD
        self.write(self.decoder.decode(b"", final=True))


# ----------------------------------------------------------------------------- loading

def parse_tokenizer_flag(text):
    spec, _, rank_file = text.partition("@")
    return data.load_tokenizer(spec, rank_file or None)


def hf_tokenizer(folder):
    record = os.path.join(folder, "tokenizer_record.json")
    if os.path.isfile(record):
        try:
            rec = json.load(open(record))
            spec, rank_file = rec["spec"], rec["rank_file"]
        except (ValueError, KeyError, TypeError) as e:
            raise SampleError(f"{record} is not a tokenizer record ({type(e).__name__}): expected "
                              '{"spec": ..., "rank_file": ...}') from None
        return data.load_tokenizer(spec, rank_file and os.path.join(folder, rank_file))
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise SampleError(f"{folder} holds a sentencepiece tokenizer.model, which is not supported here: "
                          "pass --tokenizer SPEC[@RANK_FILE] with a tiktoken tokenizer matching the model")
    raise SampleError(f"{folder} has no tokenizer_record.json: pass --tokenizer SPEC[@RANK_FILE]")


def load(cfg, device, dtype):
    """-> (model in eval mode, tiktoken Encoding) from --hf or --ckpt."""
    if cfg.hf:
        try:
            model = MiniCPM.from_hf(cfg.hf, device, dtype, attn_impl="sdpa")
        except (FileNotFoundError, ImportError) as e:
            raise SampleError(str(e)) from None
        enc = parse_tokenizer_flag(cfg.tokenizer) if cfg.tokenizer else hf_tokenizer(cfg.hf)
    else:
        ckpt = load_checkpoint(cfg.ckpt, "cpu")
        model = model_from_checkpoint(ckpt, device, attn_impl="sdpa").to(dtype)
        tok = ckpt["tokenizer"]
        rank_file = tok["rank_file"] and os.path.join(os.path.dirname(ckpt["path"]), tok["rank_file"])
        enc = parse_tokenizer_flag(cfg.tokenizer) if cfg.tokenizer else data.load_tokenizer(tok["spec"], rank_file)
    if enc.n_vocab != model.config.vocab_size:
        raise SampleError(f"the tokenizer has {enc.n_vocab} tokens but the model's vocabulary is "
                          f"{model.config.vocab_size}: wrong --tokenizer?")
    return model.eval(), enc


def prompt_ids(cfg, enc, block_size):
    text = cfg.prompt
    if text.startswith("@"):
        try:
            text = open(text[1:], encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read the prompt file {text[1:]} ({type(e).__name__})") from None
    ids = enc.encode(text, allowed_special={data.EOT}) if text else [enc.eot_token]
    if len(ids) >= block_size:
        raise SampleError(f"the prompt is {len(ids)} tokens; the model's context (block_size) is {block_size}, "
                          "which leaves no room for new tokens: shorten the prompt")
    return text, ids


# ----------------------------------------------------------------------------- command line

def parse_flags(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    for f in fields(SampleConfig):
        kw = dict(type=str2bool, nargs="?", const=True) if f.type in (bool, "bool") else dict(type=type(f.default))
        p.add_argument(f"--{f.name}", default=f.default, help=f"{f.metadata['help']} (default: {f.default!r})", **kw)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]
        close = difflib.get_close_matches(bad, [f"--{f.name}" for f in fields(SampleConfig)], n=1, cutoff=0.5)
        raise SampleError(f"unknown flag {bad}" + (f"; did you mean {close[0]}?" if close else "; see --help"))
    cfg = SampleConfig(**vars(args))
    problems = [msg for bad, msg in [
        (cfg.num_samples < 1, "--num_samples must be at least 1"),
        (cfg.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
        (cfg.temperature < 0, "--temperature must be >= 0"),
        (cfg.top_k < 0, "--top_k must be >= 0"),
        (not 0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
        (cfg.dtype not in ("auto", "float32", "bfloat16", "float16"), "--dtype must be auto, float32, bfloat16 or float16"),
    ] if bad]
    if problems:
        raise SampleError("; ".join(problems))
    return cfg


def bench(model, ids, device, dtype):
    """Greedy BENCH_TOKENS new tokens with and without the cache (no end-of-text stop)."""
    if len(ids) + BENCH_TOKENS > model.config.block_size:
        raise SampleError(f"--bench needs prompt + {BENCH_TOKENS} tokens to fit block_size {model.config.block_size}")
    generate(model, ids, 8)                         # warm-up
    results = {}
    for use_cache in (True, False):
        t = time.perf_counter()
        out = generate(model, ids, BENCH_TOKENS, temperature=0, use_cache=use_cache)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        results[use_cache] = (out, BENCH_TOKENS / (time.perf_counter() - t))
    (cached, fast), (full, slow) = results[True], results[False]
    print(f"bench: {BENCH_TOKENS} new tokens, greedy, {device} {str(dtype).removeprefix('torch.')}: "
          f"KV cache {fast:,.1f} tokens/s, no cache {slow:,.1f} tokens/s, ratio {fast / slow:.1f}x; "
          f"same tokens: {'yes' if cached == full else 'no'}")


def run(cfg):
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = auto if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    default_ckpt = cfg.ckpt == SampleConfig.ckpt and not cfg.hf
    if cfg.bench and default_ckpt and not os.path.exists(os.path.join(cfg.ckpt, "ckpt.pt")):
        from minicpm import get_config
        print(f"sample.py: no checkpoint in {cfg.ckpt}: benchmarking the tiny preset with random weights "
              "(speed does not depend on the weights)", file=sys.stderr)
        torch.manual_seed(cfg.seed)
        model, enc = MiniCPM(get_config("tiny")).to(device, dtype).eval(), data.load_tokenizer("byte")
    else:
        model, enc = load(cfg, device, dtype)
    block_size = model.config.block_size
    text, ids = prompt_ids(cfg, enc, block_size)
    if cfg.bench:
        return bench(model, ids, device, dtype)
    max_new = min(cfg.max_new_tokens, block_size - len(ids))
    if max_new < cfg.max_new_tokens:
        print(f"sample.py: note: --max_new_tokens capped to {max_new} so that the prompt ({len(ids)} tokens) "
              f"and the new tokens fit block_size {block_size}", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    n_tokens, t = 0, time.perf_counter()
    for i in range(cfg.num_samples):
        if i:
            sys.stdout.write("\n---------------\n")
        stream = TextStream(enc, sys.stdout)
        stream.write(text)
        n_tokens += len(generate(model, ids, max_new, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                 use_cache=not cfg.no_cache, stop_id=enc.eot_token, on_token=stream))
        stream.close()
    sys.stdout.write("\n")
    seconds = time.perf_counter() - t
    print(f"sample.py: {n_tokens} new tokens in {seconds:.2f} s: {n_tokens / seconds:,.1f} tokens/s "
          f"({'no cache' if cfg.no_cache else 'KV cache'}, {device}, {str(dtype).removeprefix('torch.')})",
          file=sys.stderr)


def main(argv=None):
    try:
        run(parse_flags(sys.argv[1:] if argv is None else argv))
    except (SampleError, TrainError, data.DataError, ValueError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
