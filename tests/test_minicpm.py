"""Tests of minicpm.py against independent references: the paper's parameter counts, a float64
re-implementation of the released MiniCPM forward pass written here from §2, Table 2-2, a naive
causality check, cache decoding, a muP coordinate check, and the Hugging Face layout."""
import json
import math
import os

import pytest
import torch

from conftest import small_config
import checkpoint
import hf
import plan
from cli import UsageError
from minicpm import MiniCPM, MiniCPMConfig, PRESETS, get_config


# ----------------------------------------------------------------------------- references

def reference_logits(state, hfc, ids):
    """The released MiniCPM forward pass in float64, from a state dict with the released names and
    a released-style config.json dict. Written independently of minicpm.py: explicit einsum
    attention, its own RoPE tables, every scaling spelled out (§2, Table 2-2)."""
    w = {k: v.double() for k, v in state.items()}
    d, L = hfc["hidden_size"], hfc["num_hidden_layers"]
    nq, nkv = hfc["num_attention_heads"], hfc["num_key_value_heads"]
    hd, eps = d // nq, hfc["rms_norm_eps"]
    B, T = ids.shape

    def rmsnorm(x, gain):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    # RoPE, rotate-half layout: dimension i and i + hd/2 share frequency theta^(-2i/hd); rope_scaling
    # "linear" divides the positions by its factor, "dynamic" (NTK) raises the base past max_position:
    # theta * (factor * T / max_pos - (factor - 1)) ^ (hd / (hd - 2))
    theta, positions = hfc.get("rope_theta", 10000.0), torch.arange(T, dtype=torch.float64)
    scaling, max_pos = hfc.get("rope_scaling") or {}, hfc["max_position_embeddings"]
    if scaling.get("type") == "linear":
        positions = positions / scaling["factor"]
    elif scaling.get("type") == "dynamic" and T > max_pos:
        theta = theta * (scaling["factor"] * T / max_pos - (scaling["factor"] - 1)) ** (hd / (hd - 2))
    freq = theta ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    angle = positions[:, None] * freq[None, :]      # [T, hd/2]
    cos, sin = angle.cos(), angle.sin()

    def rope(x):  # [B, H, T, hd]
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    residual_scale = hfc["scale_depth"] / math.sqrt(L)
    x = w["model.embed_tokens.weight"][ids] * hfc["scale_emb"]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        q = torch.einsum("btd,od->bto", h, w[p + "self_attn.q_proj.weight"]).view(B, T, nq, hd).transpose(1, 2)
        k = torch.einsum("btd,od->bto", h, w[p + "self_attn.k_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        v = torch.einsum("btd,od->bto", h, w[p + "self_attn.v_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        kv_of_head = torch.arange(nq) // (nq // nkv)            # query head -> its KV head
        scores = torch.einsum("bhqe,bhke->bhqk", q, k[:, kv_of_head]) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bhke->bqhe", probs, v[:, kv_of_head]).reshape(B, T, nq * hd)
        x = x + torch.einsum("bti,oi->bto", o, w[p + "self_attn.o_proj.weight"]) * residual_scale
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.einsum("btd,fd->btf", h, w[p + "mlp.gate_proj.weight"])
        up = torch.einsum("btd,fd->btf", h, w[p + "mlp.up_proj.weight"])
        x = x + torch.einsum("btf,df->btd", gate * torch.sigmoid(gate) * up, w[p + "mlp.down_proj.weight"]) * residual_scale
    x = rmsnorm(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return torch.einsum("btd,vd->btv", x / (d / hfc["dim_model_base"]), head)


def spec_names_and_shapes(cfg):
    """the released config.json's weight names with [out_features, in_features] shapes."""
    d, hd, f = cfg.n_embd, cfg.head_dim, cfg.ffn_dim
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
           "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (cfg.n_head * hd, d), p + "self_attn.k_proj.weight": (cfg.n_kv_head * hd, d),
                p + "self_attn.v_proj.weight": (cfg.n_kv_head * hd, d), p + "self_attn.o_proj.weight": (d, cfg.n_head * hd),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    return out


def random_ids(cfg, B=2, T=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def perturbed(model, seed=1):
    """Norm gains are 1 at init, which would hide a gain applied in the wrong place: randomise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- tests

def test_paper_non_embedding_parameter_counts():
    def spec_formula(c):  # §2, Table 2
        h = c.head_dim
        return c.n_layer * (2 * c.n_embd * c.n_head * h + 2 * c.n_embd * c.n_kv_head * h + 3 * c.n_embd * c.ffn_dim
                            + 2 * c.n_embd) + c.n_embd
    for name, expected in [("minicpm-1.2b", 1_247_442_432), ("minicpm-2.4b", 2_442_057_984)]:
        cfg = get_config(name)
        with torch.device("meta"):
            model = MiniCPM(cfg)
        assert model.num_params(non_embedding=True) == expected == spec_formula(cfg)
        assert model.num_params(non_embedding=False) == expected + cfg.vocab_size * cfg.n_embd


def test_wind_tunnel_presets_match_table_8():
    table8 = {"wt-9m": 0.009, "wt-30m": 0.036, "wt-70m": 0.066, "wt-0.1b": 0.109,
              "wt-0.17b": 0.166, "wt-0.2b": 0.241, "wt-0.5b": 0.499}   # N in billions
    for name, n_billions in table8.items():
        cfg = get_config(name)
        assert cfg.head_dim == 64 and cfg.ffn_dim == 5 * cfg.n_embd // 2
        with torch.device("meta"):
            assert round(MiniCPM(cfg).num_params() / 1e9, 3) == n_billions, name


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_logits_equal_float64_reference(n_kv_head, attn_impl):
    torch.manual_seed(0)
    cfg = small_config(n_kv_head=n_kv_head)
    model = perturbed(MiniCPM(cfg, attn_impl=attn_impl)).double()
    ids = random_ids(cfg)
    logits, _ = model(ids)
    expected = reference_logits(model.state_dict(), hf.hf_config(model), ids)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    # and the fp32 model against the same float64 reference
    logits32, _ = model.float()(ids)
    torch.testing.assert_close(logits32.double(), expected, rtol=1e-4, atol=1e-4)


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    torch.manual_seed(0)
    cfg = small_config()
    model = MiniCPM(cfg)
    ids = random_ids(cfg, B=2, T=10)
    targets = random_ids(cfg, B=2, T=10, seed=5)
    targets[0, :4] = -100
    logits, loss = model(ids, targets)
    logp = logits.double().log_softmax(-1)
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


def test_causality():
    torch.manual_seed(0)
    cfg = small_config()
    model = MiniCPM(cfg)
    ids = random_ids(cfg, B=1, T=20)
    t = 11
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % cfg.vocab_size
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4   # every later position does see it


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
def test_kv_cache_decoding_matches_full_forward(attn_impl, n_kv_head):
    torch.manual_seed(0)
    # m = 1 here: with d 64 below d_base 256 the head would multiply fp32 rounding by 4
    cfg = small_config(n_kv_head=n_kv_head, dim_model_base=64)
    model = MiniCPM(cfg, attn_impl=attn_impl).eval()
    ids = random_ids(cfg, B=2, T=30)
    full, _ = model(ids)
    cache = model.new_cache(batch_size=2, max_len=40)
    prefill = 12
    pieces = [model(ids[:, :prefill], cache=cache)[0]]
    for t in range(prefill, 30):
        pieces.append(model(ids[:, t:t + 1], cache=cache)[0])
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def _coordinate_check(width, mup, seeds=(0, 1), steps=4):
    """RMS of the logits at init, and RMS change of the last hidden state (the final norm's input)
    after `steps` Adam steps with the model's lr groups at lr 0.01, at fixed depth 2."""
    logit_rms, change = 0.0, 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        cfg = MiniCPMConfig(vocab_size=256, n_layer=2, n_embd=width, n_head=width // 32, n_kv_head=width // 32,
                            ffn_dim=5 * width // 2, block_size=32, mup=mup, dim_model_base=64)
        model = MiniCPM(cfg)
        g = torch.Generator().manual_seed(100 + seed)
        x, y = torch.randint(0, 256, (8, 32), generator=g), torch.randint(0, 256, (8, 32), generator=g)
        seen = {}
        model.model.norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", inp[0].detach()))
        logits, _ = model(x)
        h_before = seen["h"]
        opt = torch.optim.Adam(model.param_groups(lr=0.01, weight_decay=0.0))
        for _ in range(steps):
            opt.zero_grad()
            model(x, y)[1].backward()
            opt.step()
        model(x)
        logit_rms += logits.detach().pow(2).mean().sqrt().item() / len(seeds)
        change += (seen["h"] - h_before).pow(2).mean().sqrt().item() / len(seeds)
    return logit_rms, change


def test_mup_coordinate_check():
    widths = [64, 128, 256, 512]
    mup = [_coordinate_check(w, mup=True) for w in widths]
    logits, change = [r[0] for r in mup], [r[1] for r in mup]
    # muP: both stay O(1) across an 8x range of width. (The logits at init shrink a little with
    # width: the tied embedding's uncorrelated part goes as 1/sqrt(d); muP forbids growth only.)
    assert max(logits) / min(logits) < 2.0, logits
    assert max(change) / min(change) < 2.0, change
    assert logits[-1] <= logits[0] * 1.1
    sp = [_coordinate_check(w, mup=False) for w in widths]
    sp_change = [r[1] for r in sp]
    # standard parameterisation: the same Adam step moves the hidden state more at every width
    assert all(b > 1.5 * a for a, b in zip(sp_change, sp_change[1:])), sp_change
    assert sp_change[-1] / sp_change[0] > 8, sp_change


def test_mup_init_and_lr_groups():
    torch.manual_seed(0)
    cfg = MiniCPMConfig(vocab_size=512, n_layer=2, n_embd=1024, n_head=16, n_kv_head=4, ffn_dim=2560)
    model = MiniCPM(cfg)
    m = 1024 / 256
    sd = dict(model.named_parameters())
    assert abs(sd["model.embed_tokens.weight"].std().item() - 0.1) < 0.002        # embedding: init_std
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]:
        assert abs(sd[name].std().item() - 0.1 / math.sqrt(m)) < 0.002, name      # matrices: init_std/sqrt(m)
    assert torch.all(sd["model.norm.weight"] == 1)
    groups = model.param_groups(lr=0.01, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == len(list(model.parameters())) == sum(len(g["params"]) for g in groups)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name != "model.embed_tokens.weight":
            assert lr_of[id(p)] == pytest.approx(0.01 / m) and wd_of[id(p)] == 0.1, name
        elif p.dim() == 2:
            assert lr_of[id(p)] == pytest.approx(0.01) and wd_of[id(p)] == 0.1
        else:
            assert lr_of[id(p)] == pytest.approx(0.01) and wd_of[id(p)] == 0.0, name
    # standard parameterisation: one lr, plain init
    sp = MiniCPM(replace_cfg(cfg, mup=False))
    assert {g["lr"] for g in sp.param_groups(lr=0.01, weight_decay=0.1)} == {0.01}
    assert abs(dict(sp.named_parameters())["model.layers.0.mlp.up_proj.weight"].std().item() - 0.1) < 0.002


def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


def test_flops_per_token_hand_computed():
    cfg = small_config()           # L 2, d 64, 4 heads of 16, 2 KV heads, ffn 160, vocab 97
    with torch.device("meta"):
        model = MiniCPM(cfg)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160          # q, k+v, o, gate+up+down
    expected = 6 * (2 * per_layer + 97 * 64) + 12 * 2 * 64 * 100
    assert model.flops_per_token(100) == expected


def test_save_hf_then_from_hf(tmp_path):
    torch.manual_seed(0)
    cfg = small_config()
    model = perturbed(MiniCPM(cfg))
    hf.save_hf(model, tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    expected = spec_names_and_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    hfc = json.loads((tmp_path / "config.json").read_text())
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                "scale_emb", "dim_model_base", "scale_depth"]:
        assert key in hfc, key
    assert (hfc["scale_emb"], hfc["scale_depth"], hfc["dim_model_base"]) == (12.0, 1.4, 256)
    loaded = hf.load_hf(tmp_path)
    ids = random_ids(cfg)
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def released_style_checkpoint(path, cfg, seed=0):
    """What the released MiniCPM Hugging Face code writes with save_pretrained: bf16 tensors, the
    tied lm_head.weight left out, and its config.json keys (auto_map and all)."""
    torch.manual_seed(seed)
    state = {k: (torch.randn(s) * 0.1 + (1 if len(s) == 1 else 0)).to(torch.bfloat16)
             for k, s in spec_names_and_shapes(cfg).items() if k != "lm_head.weight"}
    hfc = {"architectures": ["MiniCPMForCausalLM"], "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
          "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}, "bos_token_id": 1, "eos_token_id": 2,
          "hidden_act": "silu", "hidden_size": cfg.n_embd, "initializer_range": 0.1, "intermediate_size": cfg.ffn_dim,
          "max_position_embeddings": cfg.block_size, "model_type": "minicpm", "num_attention_heads": cfg.n_head,
          "num_hidden_layers": cfg.n_layer, "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": 1e-05,
          "rope_scaling": None, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
          "vocab_size": cfg.vocab_size, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4}
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hfc, f)
    return state, hfc


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["MHA", "GQA"])
def test_loads_released_checkpoint_layout(tmp_path, n_kv_head):
    cfg = small_config(n_kv_head=n_kv_head)
    state, hfc = released_style_checkpoint(tmp_path, cfg)
    model = hf.load_hf(tmp_path)
    assert "rope_theta" not in hfc and model.config.rope_theta == 10000.0      # absent means 10000
    ids = random_ids(cfg)
    expected = reference_logits(state, hfc, ids)
    torch.testing.assert_close(model(ids)[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_safetensors_checkpoint_needs_the_package(tmp_path):
    cfg = small_config()
    released_style_checkpoint(tmp_path, cfg)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    os.remove(tmp_path / "pytorch_model.bin")
    try:
        from safetensors.torch import save_file
    except ImportError:
        (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
        with pytest.raises(UsageError, match="pip install safetensors"):
            hf.load_hf(tmp_path)
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
        ids = random_ids(cfg)
        ref = reference_logits(state, json.loads((tmp_path / "config.json").read_text()), ids)
        torch.testing.assert_close(hf.load_hf(tmp_path)(ids)[0].double(), ref, rtol=1e-4, atol=1e-4)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    cfg = small_config()
    hf.save_hf(MiniCPM(cfg), tmp_path / "ok")
    with pytest.raises(UsageError, match="no config.json"):
        hf.load_hf(tmp_path)
    # config says 3 layers, weights have 2
    hfc = json.loads((tmp_path / "ok" / "config.json").read_text())
    hfc["num_hidden_layers"] = 3
    (tmp_path / "ok" / "config.json").write_text(json.dumps(hfc))
    with pytest.raises(UsageError, match="does not fit its config.json"):
        hf.load_hf(tmp_path / "ok")
    hfc["num_hidden_layers"] = 2
    (tmp_path / "ok" / "config.json").write_text(json.dumps(hfc))
    (tmp_path / "ok" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        hf.load_hf(tmp_path / "ok")


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="n_head=5 does not divide n_embd=64"):
        small_config(n_head=5, n_kv_head=5)
    with pytest.raises(ValueError, match="n_kv_head=3 does not divide n_head=4"):
        small_config(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown preset 'minicpm-7b'.*tiny.*minicpm-2.4b"):
        get_config("minicpm-7b")
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        MiniCPM(small_config(), attn_impl="flash")
    model = MiniCPM(small_config())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="longer than block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            model = MiniCPM(get_config(name))
        assert model.num_params() > 0 and model.flops_per_token(4096) > 6 * model.num_params(active=True)


def test_train_memory_counts_weights_grads_and_adam():
    with torch.device("meta"):
        model = MiniCPM(get_config("minicpm-2.4b"))
    n = model.num_params(non_embedding=False)
    mem = plan.train_memory(model, seq_len=4096)
    assert (mem["weights"], mem["grads"], mem["adam"]) == (4 * n, 4 * n, 8 * n)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert plan.train_memory(model, seq_len=4096, grad_ckpt=True)["activations"] < mem["activations"] / 2
    assert 40 * 2**30 < mem["total"] < 80 * 2**30        # fits one 80 GB GPU, as the paper trained it


def test_preset_table_runs(repo_root):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "plan.py"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2,442,057,984" in out.stdout and "1,247,442,432" in out.stdout
