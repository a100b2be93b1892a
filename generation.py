"""What sample.py and eval.py share: a model and its tokenizer loaded from a train.py checkpoint (ckpt.pt
or a sharded one) or a Hugging Face layout folder (export.py's, or a released MiniCPM one), and the
decoding loop (KV cache; temperature, top-k and top-p sampling, or greedy).

Nothing here parses flags or prints: the entry scripts do, each with its own error messages.
"""
import torch

import checkpoint
import cli
import data
import hf
import tokenizer
from cli import UsageError


def load(ckpt="", hf_dir="", tokenizer_spec="", device="cpu", dtype=torch.float32):
    """-> (model in eval mode, tokenizer) from a Hugging Face folder (hf_dir) or else a checkpoint (ckpt)."""
    ckpt = None if hf_dir else checkpoint.load(ckpt)   # any kind: pretrain or dpo, ckpt.pt or sharded
    # the model file, then the weights: either layout; sdpa attention runs on every device
    model = hf.load_hf(hf_dir, device, dtype) if hf_dir else checkpoint.build_model(ckpt, device).to(dtype)
    # the tokenizer: NAME[@RANK_FILE] when given, else the checkpoint's own record
    if tokenizer_spec:
        spec, _, rank_file = tokenizer_spec.partition("@")   # "bpe:4096@dir/tokenizer.tiktoken"
        enc = data.load_tokenizer(spec, rank_file or None)
    elif hf_dir:   # this project's tokenizer record, else the folder's tokenizer.json (the released ones)
        enc = tokenizer.load_folder_tokenizer(hf_dir)
    else:
        enc = data.load_tokenizer(ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt))
    if enc.n_vocab != model.config.vocab_size:   # a wrong tokenizer would index past the embedding or print noise
        raise UsageError(f"the tokenizer has {enc.n_vocab} tokens, the model {model.config.vocab_size}: wrong --tokenizer?")
    return model.eval(), enc


def context_length(model):
    """The longest sequence the model accepts: block_size, or unbounded with dynamic NTK RoPE scaling."""
    # dynamic NTK scaling (the released 128k) accepts any length: block_size is where its scaling starts
    return model.config.block_size if model.config.rope_scaling != "dynamic" else 2**62


def check_cache(model, positions, flag):
    """UsageError when a KV cache of `positions` positions cannot fit the model's device at all."""
    # below block_size a cache always fits; dynamic NTK accepts any length, so a huge --max_new_tokens
    # would ask torch for the whole cache at once (a petabyte) and die in a traceback
    cfg, w = model.config, next(model.parameters())
    per_position = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * w.element_size()   # keys and values, every layer
    cli.check_memory(positions * per_position, str(w.device), f"{flag}: a KV cache of {positions:,} positions "
                     f"({per_position:,} bytes each)", f"lower {flag}")


def top_p_filter(probs, p, tol=1e-6):
    """Keep the smallest set of most likely tokens whose total probability reaches p; renormalise."""
    # within tol, so decimal inputs like 0.5 + 0.3 reach 0.8 despite rounding
    if p >= 1.0:
        return probs
    # ties ordered by token id (a stable sort): at the boundary the lower id is kept, reproducibly
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)   # [B, V] each
    mass_before = sorted_probs.cumsum(-1) - sorted_probs        # mass of the more likely tokens
    keep_sorted = mass_before < p - tol                          # the first token is always kept
    kept = probs * torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)   # the mask back in id order
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> next token ids [B]: greedy, or temperature, top-k and top-p, then one draw."""
    # bf16 logits would round away the differences between the likely tokens; float64 stays float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature   # before the filters: temperature changes which tokens top-p keeps
    # exactly k tokens (ties broken by torch.topk); the rest get -inf, i.e. probability 0
    if 0 < top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, ids, values)
    probs = top_p_filter(logits.softmax(-1), top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # own generator: --seed fixes the samples


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True, stop_id=None, on_token=None, stop=None):
    """Continue prompt_ids (list of ints) -> the new ids, each also passed to on_token as it is drawn."""
    # stops after max_new_tokens, or when stop_id is drawn (stop_id is neither returned nor passed on),
    # or once stop(new ids so far) is true: eval.py's stop sequences, which are text, not single tokens
    device = next(model.parameters()).device
    seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)   # [1, T], one sample at a time
    # the cache is allocated once for the longest sequence, so no step reallocates it
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    new = []
    while len(new) < max_new_tokens:
        # with the cache: the whole prompt once (prefill), then only the newest token; without: everything
        logits, _ = model(seq[:, -1:] if use_cache and new else seq, cache=cache)
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)   # [1]: from the last position
        if token.item() == stop_id:
            break
        new.append(token.item())
        if on_token:   # streamed as drawn: a slow CPU sample is readable while it runs
            on_token(new[-1])
        if stop and stop(new):
            break
        seq = torch.cat([seq, token.view(1, 1)], dim=1)
    return new
