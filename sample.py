"""Generate text from a trained MiniCPM (a train.py run) or one in the released Hugging Face layout.

    python sample.py                                   # the default run's checkpoint, out/tiny
    python sample.py --ckpt out/wt-9m --prompt "def " --num_samples 3 --top_k 50
    python sample.py --prompt @prompt.txt --temperature 0      # prompt from a file; greedy
    python sample.py --hf export/                      # a folder written by export.py
    python sample.py --hf MiniCPM-2B-sft-bf16 --chat --prompt "山东省最高的山是哪座山?"   # released weights
    python sample.py --bench                           # tokens/s with and without the KV cache

KV-cache decoding: one forward pass over the prompt (prefill), then one token per step (--no_cache
recomputes the whole sequence each step: the slow reference). Sampling applies temperature, then
top-k, then top-p; temperature 0 is greedy. A sample ends at the end-of-text token (not printed) or
after --max_new_tokens, which is capped (with a note) so that prompt + new tokens fit block_size
(not with dynamic NTK RoPE scaling, which accepts any length, as the released 128k model does).
The tokenizer of an --hf folder: this project's tokenizer_record.json (export.py writes it), else
the folder's tokenizer.json, read with the `tokenizers` package (the released MiniCPM folders: a
sentencepiece-style BPE with byte fallback; BOS is prepended as the release does); --tokenizer
NAME[@RANK_FILE] gives a tiktoken one instead (NAME: bpe:N, byte, gpt2, cl100k_base, o200k_base).
Any checkpoint kind works (train.py's, dpo.py's); the attention is always sdpa here, whatever
implementation the run trained with (that is the running script's choice, not the model's).
"""
import codecs, sys, time
from dataclasses import dataclass

import torch

import chat
import cli
import data
from cli import UsageError, flag
# the loading and the decoding loop are shared with eval.py; imported by name, so sample.generate etc. still work
from generation import check_cache, context_length, generate, load, sample_next, top_p_filter  # noqa: F401

BENCH_TOKENS = 512   # long enough for the cache to show: a cached step attends over T, a recomputed one T^2


@dataclass
class SampleConfig:
    ckpt: str = flag("out/tiny", "train.py checkpoint: ckpt.pt or the run folder holding it")
    hf: str = flag("", "sample from this Hugging Face layout folder instead of --ckpt")
    tokenizer: str = flag("", "NAME[@RANK_FILE], e.g. byte, gpt2, bpe:4096@dir/tokenizer.tiktoken ('': the checkpoint's)")
    prompt: str = flag("", "text to continue, or @FILE to read it from a file ('': a new document, i.e. end-of-text)")
    chat: bool = flag(False, "wrap the prompt in the released chat models' format, <用户>PROMPT<AI>, and print only the reply")
    num_samples: int = flag(1, "independent samples of the same prompt")
    max_new_tokens: int = flag(256, "new tokens per sample at most (capped to fit block_size)")
    temperature: float = flag(0.8, "softmax temperature; 0 = greedy (argmax)")
    top_k: int = flag(0, "sample only from the k most likely tokens (0: off)")
    top_p: float = flag(0.95, "nucleus sampling: the smallest set of tokens whose probability reaches p (1: off)")
    seed: int = flag(1337, "seed of the sampling random generator")
    device: str = flag("auto", "cpu, cuda, cuda:N, mps, or auto")
    dtype: str = flag("auto", "float32, bfloat16, float16, or auto (bfloat16 on CUDA, else float32)")
    no_cache: bool = flag(False, "recompute the full sequence every step (slow reference path)")
    bench: bool = flag(False, f"time {BENCH_TOKENS} greedy new tokens with and without the cache, then exit")


# ----------------------------------------------------------------------------- streaming text

class TextStream:
    """Writes token bytes as text, holding back incomplete UTF-8 so characters are never split."""

    def __init__(self, enc, out):
        self.enc, self.out, self.utf8 = enc, out, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token):  # a token's bytes; an incomplete character waits for the next token
        self.write(self.utf8.decode(self.enc.decode_single_token_bytes(token)))

    def write(self, text):
        self.out.write(text)
        self.out.flush()   # stdout is block-buffered when piped: flush so each token appears at once

    def close(self):  # what is left of an incomplete character becomes U+FFFD
        self.write(self.utf8.decode(b"", final=True))


def prompt_ids(cfg, enc, block_size):
    """-> (the prompt text, its token ids); an empty prompt starts a new document."""
    text = cfg.prompt
    if text.startswith("@"):
        try:
            text = open(text[1:], encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the prompt file {text[1:]} ({type(e).__name__})") from None
    # end-of-text may be written in the prompt (to separate documents); training data uses the same token.
    # A released tokenizer prepends BOS itself, as the release does; an empty prompt is BOS alone there
    bos = getattr(enc, "bos_token", None)   # our tiktoken encodings have none
    ids = enc.encode(text, allowed_special={data.EOT}) if text else [enc.eot_token if bos is None else bos]
    if cfg.chat:   # MiniCPM-2B-sft/dpo's template: one user turn, the reply follows <AI>, framed as SFT saw it
        text = chat.render_prompt(text)
        ids = chat.framed_ids(text, enc)
    if len(ids) >= block_size:   # at least one new token must fit: positions beyond block_size were never trained
        raise UsageError(f"the prompt is {len(ids)} tokens, too long for the model's context (block_size {block_size})")
    return text, ids


# ----------------------------------------------------------------------------- command line

def parse_flags(argv):
    """The flags, every range checked before anything is loaded."""
    cfg = cli.dataclass_flags(SampleConfig, __doc__, argv)
    cli.check([(min(cfg.num_samples, cfg.max_new_tokens) < 1, "--num_samples and --max_new_tokens must be >= 1"),
               (min(cfg.temperature, cfg.top_k) < 0, "--temperature and --top_k must be >= 0"),
               (not 0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
               (cfg.dtype not in cli.DTYPES, f"--dtype must be one of {', '.join(cli.DTYPES)}")])
    return cfg


def bench(model, ids, n, where):
    """n greedy new tokens with the cache and without (no end-of-text stop)."""
    # each step reads its token with .item(), so the clock includes all the device's (async) work
    generate(model, ids, 8)                                     # warm-up: kernels and allocator caches
    outputs, speeds = [], []
    for use_cache in (True, False):
        t = time.perf_counter()
        outputs.append(generate(model, ids, n, temperature=0, use_cache=use_cache))   # greedy: comparable outputs
        speeds.append(n / (time.perf_counter() - t))
    print(f"bench: {n} new tokens, greedy, {where}: KV cache {speeds[0]:,.1f} tokens/s, no cache "
          f"{speeds[1]:,.1f} tokens/s, ratio {speeds[0] / speeds[1]:.1f}x; same tokens: {outputs[0] == outputs[1]}")


def run(argv):
    """Flags -> model and tokenizer -> prompt -> samples streamed to stdout (or --bench)."""
    cfg = parse_flags(argv)
    device = cli.pick_device(cfg.device)
    dtype = cli.pick_dtype(cfg.dtype, device)   # here the weights' dtype: no autocast when sampling
    where = f"{device}, {str(dtype).removeprefix('torch.')}"
    model, enc = load(cfg.ckpt, cfg.hf, cfg.tokenizer, device, dtype)
    block_size = context_length(model)   # unbounded with dynamic NTK RoPE scaling
    text, ids = prompt_ids(cfg, enc, block_size)
    wanted = BENCH_TOKENS if cfg.bench else cfg.max_new_tokens
    max_new = min(wanted, block_size - len(ids))   # the model refuses sequences past block_size
    check_cache(model, len(ids) + max_new, "--max_new_tokens")   # dynamic NTK: no cap, so the memory is the limit
    if max_new < wanted:   # capped, not refused: the user still gets a sample
        print(f"sample.py: note: {max_new} new tokens instead of {wanted}, so that the prompt ({len(ids)} tokens) "
              f"and the new tokens fit block_size {block_size}", file=sys.stderr)
    if cfg.bench:
        return bench(model, ids, max_new, where)
    generator = torch.Generator(device).manual_seed(cfg.seed)   # one stream: sample i differs from sample i-1
    n_tokens, t = 0, time.perf_counter()
    for i in range(cfg.num_samples):
        if i:
            sys.stdout.write("\n---------------\n")
        stream = TextStream(enc, sys.stdout)
        stream.write("" if cfg.chat else text)   # the prompt first, so each sample reads as one text
        n_tokens += len(generate(model, ids, max_new, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                 use_cache=not cfg.no_cache, stop_id=enc.eot_token, on_token=stream))
        stream.close()
    sys.stdout.write("\n")
    # the speed goes to stderr: stdout holds only the samples, so `> out.txt` captures clean text
    seconds = time.perf_counter() - t
    print(f"sample.py: {n_tokens} new tokens in {seconds:.2f} s: {n_tokens / seconds:,.1f} tokens/s "
          f"({'no cache' if cfg.no_cache else 'KV cache'}, {where})", file=sys.stderr)


def main(argv=None):
    return cli.main("sample.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
