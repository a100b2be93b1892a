"""Tests of hf.py: the RoPE variants of the released config.json (rope_theta, rope_scaling linear and
dynamic NTK) and the untied head against the float64 reference written from the formulas
(test_minicpm.reference_logits), keys we do not implement refused, and the --llama export against a
real library: transformers' LlamaForCausalLM, full forward and KV-cache decoding."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf
from cli import UsageError
from conftest import small_config
from minicpm import MiniCPM
from test_minicpm import perturbed, reference_logits

VARIANTS = [("none", 1.0), ("linear", 2.0), ("dynamic", 4.0)]


def model_of(scaling="none", factor=1.0, n_kv_head=2, tied=True, seed=0, **kw):
    """A small model with random norm gains (so a gain in the wrong place shows), block_size 32."""
    torch.manual_seed(seed)
    cfg = small_config(n_kv_head=n_kv_head, rope_scaling=scaling, rope_factor=factor, tie_word_embeddings=tied,
                       block_size=32, rope_theta=10000.0 if scaling == "none" else 5e5, **kw)
    return perturbed(MiniCPM(cfg)).eval()


def ids_for(model, T, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def length_for(scaling):
    # dynamic NTK only changes anything past max_position_embeddings (32): test it at 2.5x that
    return 80 if scaling == "dynamic" else 32


# ----------------------------------------------------------------------------- against float64

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("scaling,factor", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_rope_variants_equal_float64_reference(scaling, factor, n_kv_head, tied):
    model = model_of(scaling, factor, n_kv_head, tied).double()
    ids = ids_for(model, length_for(scaling))
    expected = reference_logits(model.state_dict(), hf.hf_config(model), ids)
    torch.testing.assert_close(model(ids)[0], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.float()(ids)[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_only_dynamic_scaling_accepts_sequences_past_max_position():
    for scaling, factor in VARIANTS[:2]:
        with pytest.raises(ValueError, match="longer than block_size"):
            model_of(scaling, factor)(ids_for(model_of(), 33))
    assert model_of("dynamic", 4.0)(ids_for(model_of(), 33))[0].shape == (2, 33, 97)


@pytest.mark.parametrize("scaling,factor", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_save_then_load_keeps_rope_and_untied_head(tmp_path, scaling, factor):
    model = model_of(scaling, factor, tied=False)
    hf.save_hf(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["rope_theta"] == model.config.rope_theta
    # the released 128k config's own form
    assert saved["rope_scaling"] == (None if scaling == "none" else {"type": scaling, "factor": factor})
    loaded = hf.load_hf(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    ids = ids_for(model, length_for(scaling))
    assert torch.equal(loaded(ids)[0], model(ids)[0])


@pytest.mark.parametrize("key,value,named", [
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "rope scaling"),
    ("rope_scaling", {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}, "rope scaling"),
    ("rope_scaling", {"type": "dynamic"}, "rope scaling"),              # no factor
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("head_dim", 8, "head_dim"),
    ("sliding_window", 16, "sliding_window"),                          # unknown: not silently ignored
    ("q_lora_rank", 8, "q_lora_rank"),                                 # MiniCPM3's attention
])
def test_numerics_keys_not_implemented_are_one_line_errors(tmp_path, key, value, named):
    hf.save_hf(model_of(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(UsageError, match=named) as e:
        hf.load_hf(tmp_path)
    assert "\n" not in str(e.value)


def test_use_mup_false_means_no_multipliers(tmp_path):
    hf.save_hf(model_of(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_mup": False}))
    loaded = hf.load_hf(tmp_path)
    expected = reference_logits(loaded.state_dict(), {**config, "scale_emb": 1, "scale_depth": 2 ** 0.5,
                                                      "dim_model_base": config["hidden_size"]}, ids_for(loaded, 16))
    torch.testing.assert_close(loaded(ids_for(loaded, 16))[0].double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- against transformers

def transformers_llama(folder, dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def assert_fp32_equal(theirs, ours, tol=1e-5):
    """Max |difference| <= tol x max |logit|: fp32 rounding is relative to the logits' scale (~15 here,
    after random gains and the muP head's 1/m = 4), and each side rounds its own way (the folded
    weights are rounded products, transformers' RoPE angles are fp32)."""
    err, scale = (theirs - ours).abs().max().item(), ours.abs().max().item()
    assert err <= tol * scale, f"max |difference| {err:.2e} > {tol} x max |logit| {scale:.1f}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("scaling,factor", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_llama_export_logits_equal_transformers(tmp_path, scaling, factor, n_kv_head, tied):
    model = model_of(scaling, factor, n_kv_head, tied)
    hf.save_hf(model, tmp_path, llama=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "scale_emb" not in config and config["tie_word_embeddings"] is False
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("model", "pytorch"))] == ["model.safetensors"]
    ids = ids_for(model, length_for(scaling))
    with torch.no_grad():
        theirs = transformers_llama(tmp_path)(ids).logits
    assert_fp32_equal(theirs, model(ids)[0])
    # and our loader reads the Llama folder back as multipliers of 1: the same function again
    assert_fp32_equal(hf.load_hf(tmp_path)(ids)[0], model(ids)[0])


def test_decoding_past_max_position_matches_transformers_cache(tmp_path):
    # dynamic NTK with a cache: each new token is rotated with the base of the current length and the
    # cached keys keep theirs, in both implementations (transformers re-derives the base per step)
    model = model_of("dynamic", 4.0)
    hf.save_hf(model, tmp_path, llama=True)
    theirs = transformers_llama(tmp_path)
    ids = ids_for(model, 48)[:1]
    cache, past = model.new_cache(1, 48), None
    with torch.no_grad():
        ours, out = model(ids[:, :24], cache=cache)[0], theirs(ids[:, :24], use_cache=True)
        assert_fp32_equal(out.logits, ours)
        past = out.past_key_values
        for t in range(24, 48):   # one token at a time, through position 32 (max_position) and past it
            ours = model(ids[:, t:t + 1], cache=cache)[0]
            out = theirs(ids[:, t:t + 1], cache=past, use_cache=True)
            assert_fp32_equal(out.logits, ours)
            past = out.past_key_values


def test_loads_a_folder_written_by_transformers(tmp_path):
    # transformers 5 writes its own config form (rope_parameters) and safetensors: read as a plain Llama
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=32, rope_theta=5e5,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False)
    theirs = LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = hf.load_hf(tmp_path)
    assert (ours.config.rope_scaling, ours.config.rope_factor, ours.config.rope_theta) == ("linear", 2.0, 5e5)
    ids = ids_for(ours, 32)
    with torch.no_grad():
        assert_fp32_equal(theirs(ids).logits, ours(ids)[0])


def test_overwriting_one_layout_with_the_other_keeps_one_set_of_weights(tmp_path):
    # a reader takes safetensors first (transformers) or .bin first (ours): two sets would disagree
    model = model_of()
    hf.save_hf(model, tmp_path)
    hf.save_hf(model, tmp_path, llama=True)
    assert not (tmp_path / "pytorch_model.bin").exists() and (tmp_path / "model.safetensors").exists()
    hf.save_hf(model, tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()


def test_moe_has_no_llama_layout(tmp_path):
    with pytest.raises(UsageError, match="MoE"):
        hf.save_hf(MiniCPM(small_config(n_experts=4, top_k=2)), tmp_path, llama=True)
    assert not list(tmp_path.iterdir())   # refused before anything was written


@pytest.mark.parametrize("scaling,factor", VARIANTS[:2], ids=["abf", "linear"])
def test_decoding_past_the_old_block_size_equals_the_full_forward(scaling, factor):
    # a model trained at 32 tokens, extended to 96 (§7.2): ABF's larger base, or positions / factor.
    # With settings that do not depend on the length, the cache must reproduce the full forward
    model = model_of(scaling, factor).double()
    model.config.block_size, model.config.rope_theta = 96, 5e5 if scaling == "none" else model.config.rope_theta
    ids = ids_for(model, 96)[:1]
    full = model(ids)[0]
    cache = model.new_cache(1)
    steps = [model(ids[:, :20], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(20, 96)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    # and the full forward is the float64 reference's, with the new settings
    torch.testing.assert_close(full, reference_logits(model.state_dict(), hf.hf_config(model), ids), rtol=1e-10, atol=1e-10)
