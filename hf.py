"""The Hugging Face folder layouts, read and written exactly: MiniCPM's released one (config.json +
pytorch_model.bin or *.safetensors, the released parameter names), and the Llama one (config.json +
model.safetensors) that transformers' LlamaForCausalLM, vLLM and llama.cpp's converter load with no
custom code.

The two differ only in where MiniCPM's muP multipliers (§3.1, Table 7) live. The released code
applies them in the forward pass (h0 = embed * scale_emb, each branch x scale_depth / sqrt(L),
logits = head(h / m)); a Llama has none, so `llama_state` folds each into the weight it multiplies.
The function computed is the same, so the exported logits equal ours up to rounding.
"""
import json
import math
import os
from dataclasses import fields

import torch

from atomic import atomic_save, atomic_write_text
from cli import UsageError
from minicpm import MiniCPM, MiniCPMConfig

BOS_ID, EOS_ID = 1, 2     # special ids of the released tokenizers (their config.json)

# The released config.json's keys and the MiniCPMConfig fields they hold.
CONFIG_KEYS = dict(hidden_size="n_embd", intermediate_size="ffn_dim", num_hidden_layers="n_layer",
                   num_attention_heads="n_head", num_key_value_heads="n_kv_head", vocab_size="vocab_size",
                   rms_norm_eps="norm_eps", rope_theta="rope_theta", max_position_embeddings="block_size",
                   tie_word_embeddings="tie_word_embeddings", scale_emb="scale_emb", scale_depth="scale_depth",
                   dim_model_base="dim_model_base", initializer_range="init_std", num_experts="n_experts",
                   num_experts_per_tok="top_k")
# Keys that describe the file or the generation defaults, not the function the weights compute.
METADATA_KEYS = {"architectures", "auto_map", "model_type", "_name_or_path", "torch_dtype", "dtype",
                 "transformers_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id"}
# Keys the released code reads that change nothing only at these values (absent = the same).
NEUTRAL_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                  "pretraining_tp": 1, "use_mup": True}


# ----------------------------------------------------------------------------- config.json

def rope_settings(hf):
    """rope_theta, rope_scaling and rope_factor from a config.json: {"type": "dynamic", "factor": 4.0}."""
    # transformers 5 writes the same under "rope_parameters" (with "rope_type" and rope_theta inside)
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    out = {"rope_theta": params.pop("rope_theta")} if "rope_theta" in params else {}
    kind = params.pop("rope_type", params.pop("type", "default"))
    factor = params.pop("factor", None)
    # anything else (yarn's beta_fast, longrope's long_factor, llama3's low_freq_factor, ...) changes
    # the frequencies in a way this project does not compute: refused, never ignored
    if kind not in ("default", "linear", "dynamic") or params or (kind != "default" and factor is None):
        raise ValueError(f"rope scaling {hf.get('rope_parameters') or hf.get('rope_scaling')} is not implemented "
                         f"here (only 'linear' and 'dynamic' with a 'factor')")
    if kind != "default":
        out.update(rope_scaling=kind, rope_factor=float(factor))
    return out


def config_from_hf(hf: dict) -> MiniCPMConfig:
    """A released (or Llama) config.json, as a dict -> MiniCPMConfig; unknown numerics are an error."""
    known = CONFIG_KEYS.keys() | METADATA_KEYS | NEUTRAL_VALUES.keys() | {"rope_scaling", "rope_parameters", "head_dim"}
    unknown = sorted(set(hf) - known)
    if unknown:   # a key we would silently ignore may change the logits: the user must decide
        raise ValueError(f"key {unknown[0]!r} is not implemented by this project and may change the "
                         f"model's numerics (remove it from config.json if you know it does not)")
    # sizes first: a zero head count would divide by zero below, before MiniCPMConfig could name it
    # (the epsilon, the rope base and the flag are MiniCPMConfig's to check; 0 experts is a dense model)
    sizes = [k for k in CONFIG_KEYS if hf.get(k) is not None and k not in ("rms_norm_eps", "rope_theta", "tie_word_embeddings")]
    counts = {f.name for f in fields(MiniCPMConfig) if f.type in (int, "int")}   # layers, heads, widths: integers
    bad = [k for k in sizes if isinstance(hf[k], bool) or not isinstance(hf[k], int if CONFIG_KEYS[k] in counts else (int, float))
           or not math.isfinite(hf[k]) or hf[k] < 0 or (hf[k] == 0 and k != "num_experts")]
    if bad:
        raise ValueError(f"{bad[0]}={hf[bad[0]]!r} must be a positive {'integer' if CONFIG_KEYS[bad[0]] in counts else 'number'}")
    for key, neutral in NEUTRAL_VALUES.items():
        if key in hf and key != "use_mup" and hf[key] != neutral:
            raise ValueError(f"{key}={hf[key]!r} is not implemented (only {neutral!r})")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads (not implemented)")
    # absent multipliers mean a plain Llama (1, and scale_depth = sqrt(L) makes the residual factor 1);
    # absent rope_theta means 10000, absent num_key_value_heads means no GQA
    dims = {name: hf[key] for key, name in CONFIG_KEYS.items() if hf.get(key) is not None}
    dims = {"scale_emb": 1.0, "scale_depth": math.sqrt(dims["n_layer"]), "dim_model_base": dims["n_embd"],
            "n_kv_head": dims["n_head"], **dims, **rope_settings(hf), "mup": hf.get("use_mup", True)}
    return MiniCPMConfig(**dims)


def hf_config(model, eos_id=EOS_ID, bos_id=BOS_ID):
    """The released config.json of a model, MiniCPM's own keys (its modeling code reads them)."""
    cfg = model.config
    hf = {key: getattr(cfg, name) for key, name in CONFIG_KEYS.items()}
    if not cfg.mup:   # multipliers that make the released code's formulas the identity
        hf.update(scale_emb=1.0, scale_depth=math.sqrt(cfg.n_layer), dim_model_base=cfg.n_embd)
    if not cfg.n_experts:   # a dense config.json looks exactly like the released dense ones
        del hf["num_experts"], hf["num_experts_per_tok"]
    # the released 128k config's form: {"type": "dynamic", "factor": 4.0}; null without scaling
    hf["rope_scaling"] = None if cfg.rope_scaling == "none" else dict(type=cfg.rope_scaling, factor=cfg.rope_factor)
    return dict(architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_act="silu", **hf,
                bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=dtype_name(model))


def dtype_name(model):
    return str(model.lm_head.weight.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the Llama layout

def check_llama(config):
    # Mixtral's layout could hold MiniCPM-MoE (the same softmax, top-k, renormalised routing), but that
    # export is not written: the released MiniCPM-MoE layout is what this project exports for MoE
    if config.n_experts:
        raise UsageError("a MoE model has no Llama layout (LlamaForCausalLM has no experts): export it without "
                         "--llama, in MiniCPM-MoE's released layout (its modeling code: trust_remote_code)")


def import_safetensors():
    """safetensors' save_file, which writes the Llama layout's weights; a one-line error without it."""
    try:
        from safetensors.torch import save_file   # installed with transformers
    except ImportError:
        raise UsageError("--llama writes model.safetensors, which needs the safetensors package: pip install safetensors") from None
    return save_file


def llama_state(model):
    """Our state dict with the muP multipliers folded into the weights (the function is unchanged)."""
    # embedding x scale_emb: h0 = embed[ids] * scale_emb becomes a plain lookup
    # o_proj, down_proj x scale_depth / sqrt(L): the only matrices whose outputs join the residual
    # lm_head / m: logits = head(norm(h) / m); tied, the head is the embedding before its x scale_emb,
    #   so the two folded matrices differ and the export is untied (the paper's m = d / 256 and 12)
    cfg = model.config
    check_llama(cfg)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] / cfg.width_mult   # before the embedding is scaled
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * cfg.emb_mult
    for name in state:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[name] = state[name] * cfg.residual_mult
    return state


def llama_config(model, eos_id, bos_id=None):
    """config.json for transformers' LlamaForCausalLM: the model's shapes and RoPE, no multipliers."""
    cfg = model.config
    rope = None if cfg.rope_scaling == "none" else {"rope_type": cfg.rope_scaling, "type": cfg.rope_scaling,
                                                    "factor": cfg.rope_factor}   # "type": older readers
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.block_size,
                rope_theta=cfg.rope_theta, rope_scaling=rope, tie_word_embeddings=False, attention_bias=False,
                mlp_bias=False, initializer_range=cfg.init_std, bos_token_id=bos_id, eos_token_id=eos_id,
                torch_dtype=dtype_name(model))


# ----------------------------------------------------------------------------- folders

def save_hf(model, out_dir, tokenizer_record=None, llama=False, eos_id=EOS_ID):
    """config.json + weights, written atomically: MiniCPM's released layout (pytorch_model.bin), or
    Llama's (model.safetensors, what every Llama reader takes first and which holds no code)."""
    # with a tokenizer record, tokenizer_record.json too (sample.py --hf reads it)
    # the state first: a model that has no such layout is refused before anything is written
    if llama:   # our end-of-text is BOS too: the documents' separator, and the only one a model saw
        state, config, save_file = llama_state(model), llama_config(model, eos_id, bos_id=eos_id), import_safetensors()
    else:
        state, config = model.state_dict(), hf_config(model, eos_id)
    os.makedirs(out_dir, exist_ok=True)
    # on the CPU and contiguous: loadable on a machine without a GPU, and no views of bigger storages
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    weights, other = ("model.safetensors", "pytorch_model.bin") if llama else ("pytorch_model.bin", "model.safetensors")
    if llama:   # to a temporary name, then renamed (as atomic_save): "format": "pt" is what transformers checks
        tmp = os.path.join(out_dir, ".tmp-" + weights)
        try:
            save_file(state, tmp, metadata={"format": "pt"})   # from the tensors: no second copy in memory
            os.replace(tmp, os.path.join(out_dir, weights))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        atomic_save(state, os.path.join(out_dir, weights))
    if os.path.exists(os.path.join(out_dir, other)):   # an --overwrite of the other layout: one set of weights
        os.unlink(os.path.join(out_dir, other))
    atomic_write_text(json.dumps(config, indent=2) + "\n", os.path.join(out_dir, "config.json"))
    if tokenizer_record:
        atomic_write_text(json.dumps(tokenizer_record, indent=2) + "\n", os.path.join(out_dir, "tokenizer_record.json"))


def read_config(ckpt_dir):
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isdir(ckpt_dir):
        raise UsageError(f"{ckpt_dir} is not a folder: give a Hugging Face checkpoint folder (config.json + weights)")
    if not os.path.isfile(path):
        raise UsageError(f"{ckpt_dir} has no config.json: not a Hugging Face checkpoint folder")
    try:
        with open(path) as f:
            hf = json.load(f)
        if not isinstance(hf, dict):   # a list or a number parses as JSON too: config_from_hf would misread it
            raise ValueError(f"a JSON {type(hf).__name__}, not an object of settings")
        return config_from_hf(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a usable config.json ({type(e).__name__}: {e})") from None


def load_hf(ckpt_dir, device="cpu", dtype=torch.float32, **runtime):
    """A model in a Hugging Face layout: ours, MiniCPM's own, or a Llama (read as multipliers of 1)."""
    # MiniCPM's own: pytorch_model.bin, sharded .bin with an index, or *.safetensors (needs that package)
    config = read_config(ckpt_dir)
    with torch.device("meta"):   # no memory and no random init for weights about to be replaced (GBs for the 2.4B)
        model = MiniCPM(config, **runtime)
    state = read_hf_weights(ckpt_dir)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)    # tied: the embedding is the head
    expected = {k: v.shape for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    # every mismatch checked before loading, reported as one line: load_state_dict's error is a page long
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise UsageError(f"checkpoint {ckpt_dir} does not fit its config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model = model.to_empty(device=device).to(dtype)   # allocated, uninitialised: load_state_dict fills it
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)   # strict=False: the tied head
    if config.tie_word_embeddings:   # to_empty untied them
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def read_hf_weights(ckpt_dir):
    """Every weight file of the folder merged into one state dict (shards hold disjoint keys)."""
    names = sorted(os.listdir(ckpt_dir))
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    safetensors = [n for n in names if n.endswith(".safetensors")]
    state = {}
    if bins:   # preferred when both exist: torch can always read them
        for n in bins:
            try:
                state.update(torch.load(os.path.join(ckpt_dir, n), map_location="cpu", weights_only=True))
            except Exception as e:
                raise UsageError(f"cannot read {os.path.join(ckpt_dir, n)} ({type(e).__name__}): corrupt or not a PyTorch file") from None
    elif safetensors:   # --llama exports, released checkpoints, transformers' save_pretrained
        try:
            from safetensors.torch import load_file   # comes with transformers; optional otherwise
        except ImportError:
            raise UsageError(f"{ckpt_dir} holds *.safetensors weights; reading them needs the 'safetensors' "
                             "package: pip install safetensors") from None
        for n in safetensors:
            try:
                state.update(load_file(os.path.join(ckpt_dir, n)))
            except Exception as e:   # safetensors raises its own error types, with long messages
                raise UsageError(f"cannot read {os.path.join(ckpt_dir, n)} ({type(e).__name__}): corrupt or not a safetensors file") from None
    else:
        raise UsageError(f"{ckpt_dir} has neither pytorch_model*.bin nor *.safetensors weights")
    return state
