"""Tests of moe.py against independent references: a naive per-token MoE written here (forward and
gradients, float64), the dense model for upcycling, the load-balancing loss computed by hand on
hand-made router outputs, the model loss recomputed from captured layer inputs, the checkpoint
layout, the paper's MiniCPM-MoE parameter counts (§7.3), and the Adam state carried over by
upcycling against a hand-written AdamW step (float64)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
import checkpoint
import hf
from minicpm import MiniCPM, get_config
from moe import MoE, upcycle, upcycle_optimizer_state


def make_moe(cfg):
    return MoE(cfg.n_embd, cfg.ffn_dim, cfg.n_experts, cfg.top_k)


def moe_config(**overrides):
    return small_config(**{"n_experts": 4, "top_k": 2, **overrides})


def random_moe(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = make_moe(cfg).to(dtype)
    for p in layer.parameters():            # O(1) router logits, so top-k is a real choice
        torch.nn.init.normal_(p, std=cfg.n_embd ** -0.5)
    return layer


# ----------------------------------------------------------------------------- references

def naive_moe(layer, x):
    """The MoE layer one token at a time, from §7.3: softmax over the experts, keep the top_k,
    renormalise them, sum the chosen experts' SwiGLU outputs. Also the Switch load-balancing loss
    with its counts kept in plain Python. Reads only the weight tensors of `layer`."""
    E, k = layer.n_experts, layer.top_k
    W = layer.gate.weight
    tokens = x.reshape(-1, x.shape[-1])
    outputs, counts, prob_sum = [], [0] * E, 0
    for t in tokens:
        logits = W @ t
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        prob_sum = prob_sum + p
        top = sorted(range(E), key=lambda e: -p[e].item())[:k]
        norm = sum(p[e] for e in top)
        y = 0
        for e in top:
            ex = layer.experts[e]
            g, u = ex.w1.weight @ t, ex.w3.weight @ t
            y = y + (p[e] / norm) * (ex.w2.weight @ (g * torch.sigmoid(g) * u))
            counts[e] += 1
        outputs.append(y)
    n = len(tokens)
    f = torch.tensor([c / (n * k) for c in counts], dtype=x.dtype)
    aux = E * (f * (prob_sum / n)).sum()
    return torch.stack(outputs).reshape(x.shape), aux, f


def set_identity_router(layer):
    """Router weight [I_E | 0], so a token's router logits are its first E coordinates."""
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, : layer.n_experts] = torch.eye(layer.n_experts)


def tokens_with_probs(probs, d, dtype=torch.float64):
    """Tokens whose router probabilities (under set_identity_router) are exactly `probs`."""
    probs = torch.tensor(probs, dtype=dtype)
    x = torch.zeros(len(probs), d, dtype=dtype)
    x[:, : probs.shape[1]] = probs.log()
    return x


# ----------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("n_experts,top_k,n_tokens", [(4, 2, 24), (4, 1, 24), (8, 3, 16), (4, 2, 1)])
def test_layer_equals_naive_per_token_reference(n_experts, top_k, n_tokens):
    cfg = moe_config(n_experts=n_experts, top_k=top_k)
    layer = random_moe(cfg)
    torch.manual_seed(1)
    x = torch.randn(1 if n_tokens == 1 else 2, max(n_tokens // 2, 1), cfg.n_embd, dtype=torch.float64)
    upstream = torch.randn_like(x)            # a random linear function of the output, so every
                                              # output element's gradient path is checked

    x1 = x.clone().requires_grad_()
    y = layer(x1)
    assert y.shape == x.shape
    ((y * upstream).sum() + 0.7 * layer.aux_loss).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)

    x2 = x.clone().requires_grad_()
    y_ref, aux_ref, f_ref = naive_moe(layer, x2)
    ((y_ref * upstream).sum() + 0.7 * aux_ref).backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.aux_loss, aux_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.expert_load, f_ref)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    for name, p in layer.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)   # unused experts: no gradient
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
    if n_tokens == 1:      # one token reaches top_k experts: the others are empty slices, zero gradient
        assert sum(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("w1.weight")) == top_k


def test_layer_state_dict_names():
    layer = make_moe(moe_config())
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    expected = {"gate.weight": (4, 64)}
    for j in range(4):
        expected.update({f"experts.{j}.w1.weight": (160, 64), f"experts.{j}.w3.weight": (160, 64),
                         f"experts.{j}.w2.weight": (64, 160)})
    assert shapes == expected


# ----------------------------------------------------------------------------- balancing loss

# Four tokens' router probabilities over 4 experts, top-2 by hand:
#   [.4 .3 .2 .1] -> {0, 1}   [.1 .1 .4 .4] -> {2, 3}   [.1 .6 .2 .1] -> {1, 2}   [.1 .5 .1 .3] -> {1, 3}
HAND_PROBS = [[.4, .3, .2, .1], [.1, .1, .4, .4], [.1, .6, .2, .1], [.1, .5, .1, .3]]
HAND_F = [1 / 8, 3 / 8, 2 / 8, 2 / 8]          # assignments per expert: 1, 3, 2, 2 of 8
HAND_P = [.175, .375, .225, .225]              # column means of HAND_PROBS
HAND_AUX = 4 * (1 / 8 * .175 + 3 / 8 * .375 + 2 / 8 * .225 + 2 / 8 * .225)   # = 1.1


def test_balancing_loss_hand_computed():
    assert HAND_AUX == pytest.approx(1.1)
    layer = make_moe(moe_config()).double()
    set_identity_router(layer)
    x = tokens_with_probs(HAND_PROBS, 64).view(2, 2, 64).requires_grad_()   # a [B, T, d] batch
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(HAND_AUX, abs=1e-12)
    assert layer.expert_load.tolist() == pytest.approx(HAND_F, abs=1e-12)
    assert not layer.expert_load.requires_grad
    # The gradient flows through P only (f is a count): d aux / d p_{t,i} = E * f_i / n_tokens.
    layer.aux_loss.backward()
    probs = torch.tensor(HAND_PROBS, dtype=torch.float64)
    dlogits = probs * (4 * torch.tensor(HAND_F, dtype=torch.float64) / 4)           # softmax Jacobian
    dlogits = dlogits - probs * dlogits.sum(-1, keepdim=True)                         # applied by hand
    torch.testing.assert_close(layer.gate.weight.grad[:, :4], dlogits.T @ probs.log())
    torch.testing.assert_close(x.grad.view(4, 64)[:, :4], dlogits)


def test_balancing_loss_is_one_when_balanced():
    layer = make_moe(moe_config()).double()
    # every expert chosen by exactly 2 of the 8 assignments (f uniform), P not uniform
    set_identity_router(layer)
    balanced = [[.4, .3, .2, .1], [.1, .1, .4, .4], [.1, .6, .2, .1], [.5, .1, .1, .3]]
    layer(tokens_with_probs(balanced, 64)[None])
    assert layer.expert_load.tolist() == [0.25] * 4
    assert torch.tensor(balanced).mean(0).tolist() != pytest.approx([0.25] * 4)
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-12)
    # a zero router: every probability 1/E (P uniform), whichever experts the ties send tokens to
    with torch.no_grad():
        layer.gate.weight.zero_()
    layer(torch.randn(1, 10, 64, dtype=torch.float64))
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-12)
    # and an unbalanced router scores above 1 (HAND_PROBS gives 1.1): the loss can tell them apart
    set_identity_router(layer)
    layer(tokens_with_probs(HAND_PROBS, 64)[None])
    assert layer.aux_loss.item() > 1.05


# ----------------------------------------------------------------------------- in the model

def test_model_loss_is_cross_entropy_the_trainer_adds_the_mean_aux_and_router_learns(monkeypatch):
    # forward's loss is the language-model loss alone; train.py's objective adds 0.01 x the layers' mean aux
    import contextlib, types
    import train
    torch.manual_seed(0)
    model = MiniCPM(moe_config())
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :3] = -100
    inputs = []                      # each MoE layer's input, to recompute its aux loss independently
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: inputs.append((m, args[0].detach())))
             for layer in model.model.layers]
    logits, loss = model(idx, targets)
    for h in hooks:
        h.remove()
    ce = F.cross_entropy(logits.double().reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
    aux = [naive_moe(m, x)[1].double() for m, x in inputs]
    assert len(aux) == 2 and all(a > 0.5 for a in aux)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert model.moe_stats["aux_loss"].item() == pytest.approx((sum(aux) / 2).item(), rel=1e-5)
    # the trainer's micro-batch on the same tokens (its data reader handed these ids)
    run = types.SimpleNamespace(batch=lambda micro: (idx, targets), mixtures=None, folder="",
                                dist=types.SimpleNamespace(device="cpu", rank=0), data_offset=0, step=0,
                                autocast=contextlib.nullcontext(), model=model, raw=model)
    objective, scalars, n = train.Pretrain.micro_loss(run, 0)
    assert objective.item() == pytest.approx((ce + 0.01 * sum(aux) / len(aux)).item(), rel=1e-5) and n == 32
    assert scalars["train_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    objective.backward()
    for layer in model.model.layers:   # the router learns: from the top-k weights and the aux loss
        assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0


def test_router_gets_gradient_from_the_language_loss_alone():
    torch.manual_seed(0)
    model = MiniCPM(moe_config(aux_loss_coef=0.0))
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)[1].backward()
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in model.model.layers)


def test_activation_checkpointing_gives_the_same_gradients():
    """With train.py --grad_ckpt each layer's forward runs again in the backward; the aux loss the
    layer left behind must still carry its gradient to the router."""
    torch.manual_seed(0)
    model = MiniCPM(moe_config()).double()
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)[1].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.grad_ckpt = True
    model.train()
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-10, atol=1e-12, msg=n)


# ----------------------------------------------------------------------------- upcycling

@pytest.mark.parametrize("mup", [True, False])
def test_upcycled_model_computes_the_dense_function(mup):
    torch.manual_seed(0)
    dense = MiniCPM(small_config(mup=mup))
    moe_model = upcycle(dense, n_experts=4, top_k=2)
    assert moe_model.config.n_experts == 4 and moe_model.config.top_k == 2
    assert moe_model.lm_head.weight is moe_model.model.embed_tokens.weight
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = dense(idx)[0]
        torch.testing.assert_close(moe_model(idx)[0], ref, rtol=1e-5, atol=1e-5)
        for layer in moe_model.model.layers:       # any router: the experts are all the same MLP
            layer.mlp.gate.weight.normal_(0, 3.0)
        torch.testing.assert_close(moe_model(idx)[0], ref, rtol=1e-5, atol=1e-5)
    # the routers were really used: a perturbed expert changes the output
    with torch.no_grad():
        moe_model.model.layers[0].mlp.experts[1].w2.weight.add_(0.5)
        assert (moe_model(idx)[0] - ref).abs().max() > 1e-3


def test_upcycle_copies_weights_and_inits_router():
    torch.manual_seed(0)
    dense = MiniCPM(small_config(n_embd=256, n_head=4, n_kv_head=4, ffn_dim=640))
    moe_model = upcycle(dense, n_experts=8, top_k=2)
    assert moe_model.config.n_experts == 8 and moe_model.config.top_k == 2
    d_state, m_state = dense.state_dict(), moe_model.state_dict()
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        for j in range(8):
            for old, new in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                a, b = d_state[p + old + ".weight"], m_state[f"{p}experts.{j}.{new}.weight"]
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()   # a copy, not an alias
        router = m_state[p + "gate.weight"]
        assert router.shape == (8, 256)
        assert router.mean().abs() < 0.01 and 0.09 < router.std() < 0.11        # N(0, 0.1), 2048 draws
    for name, t in d_state.items():
        if ".mlp." not in name:
            assert torch.equal(m_state[name], t)
    # training the upcycled model leaves the dense one alone
    moe_model.model.layers[0].mlp.experts[0].w1.weight.data.add_(1.0)
    assert torch.equal(dense.model.layers[0].mlp.gate_proj.weight, d_state["model.layers.0.mlp.gate_proj.weight"])


# ----------------------------------------------------------------------------- upcycling: Adam state

LR, WD, BETAS, EPS = 0.01, 0.1, (0.9, 0.95), 1e-8
PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}   # expert name -> dense MLP name


def adamw(model):
    return torch.optim.AdamW(model.param_groups(LR, WD), lr=LR, betas=BETAS, eps=EPS)


def trained_dense_and_optimizer(steps=3):
    """A float64 dense model after a few AdamW steps on random tokens: non-trivial moments, step 3."""
    torch.manual_seed(0)
    dense = MiniCPM(small_config()).double()        # n_embd 64: muP width multiplier m = 64 / 256
    opt = adamw(dense)
    for _ in range(steps):
        idx = torch.randint(0, 97, (2, 16))
        dense(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dense, opt


def carried_over(n_experts=4):
    dense, dense_opt = trained_dense_and_optimizer()
    moe_model = upcycle(dense, n_experts=n_experts, top_k=2, generator=torch.Generator().manual_seed(1))
    moe_opt = adamw(moe_model)
    # through a state_dict, as train.py reads it from the checkpoint
    info = upcycle_optimizer_state(dense, dense_opt.state_dict(), moe_model, moe_opt)
    return dense, dense_opt, moe_model, moe_opt, info


def expert_params(moe_model, n_experts=4):
    """(dense parameter name, expert j, expert parameter) for every expert weight."""
    params = dict(moe_model.named_parameters())
    return [(f"model.layers.{i}.mlp.{dense_name}.weight", j, params[f"model.layers.{i}.mlp.experts.{j}.{w}.weight"])
            for i in range(2) for j in range(n_experts) for w, dense_name in PROJ.items()]


def test_every_expert_copy_starts_with_the_dense_mlps_adam_state_and_the_router_fresh():
    dense, dense_opt, moe_model, moe_opt, info = carried_over()
    dense_params = dict(dense.named_parameters())
    seen = set()
    for dense_name, j, p in expert_params(moe_model):
        ref, got = dense_opt.state[dense_params[dense_name]], moe_opt.state[p]
        assert set(got) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(got["step"]) == 3.0                       # the dense run's 3 steps
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key], ref[key])             # exactly equal, for every copy j
            assert got[key].abs().sum() > 0
            assert got[key].data_ptr() not in seen and got[key].data_ptr() != ref[key].data_ptr()
            seen.add(got[key].data_ptr())                      # each copy its own storage
    moe_params = dict(moe_model.named_parameters())
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    for name in routers:                                      # the router: no state, Adam starts at step 0
        assert len(moe_opt.state[moe_params[name]]) == 0
    for name, p in dense_params.items():                      # embedding, attention, norms: kept
        if ".mlp." not in name:
            assert torch.equal(moe_opt.state[moe_params[name]]["exp_avg_sq"], dense_opt.state[p]["exp_avg_sq"])
            assert float(moe_opt.state[moe_params[name]]["step"]) == 3.0
    assert info["fresh"] == routers and info["carried"] == len(moe_params) - 2


def test_lr_groups_follow_mup_for_the_upcycled_tensors():
    _, _, moe_model, moe_opt, _ = carried_over()
    group_of = {id(p): g for g in moe_opt.param_groups for p in g["params"]}
    params = dict(moe_model.named_parameters())
    # by hand: m = 64 / 256 = 1/4, so matrices (experts, router, attention) get lr / m = 0.04
    for _, _, p in expert_params(moe_model):
        assert group_of[id(p)]["lr"] == pytest.approx(0.04) and group_of[id(p)]["weight_decay"] == WD
    for i in range(2):
        router = group_of[id(params[f"model.layers.{i}.mlp.gate.weight"])]
        assert router["lr"] == pytest.approx(0.04) and router["weight_decay"] == WD
        assert group_of[id(params[f"model.layers.{i}.self_attn.q_proj.weight"])]["lr"] == pytest.approx(0.04)
    assert group_of[id(params["model.embed_tokens.weight"])]["lr"] == pytest.approx(0.01)
    norm = group_of[id(params["model.layers.0.input_layernorm.weight"])]
    assert norm["lr"] == pytest.approx(0.01) and norm["weight_decay"] == 0.0


def hand_adamw_step(p, g, m, v, step, lr, wd):
    """One AdamW update written out (Loshchilov & Hutter; torch's bias-corrected form), float64."""
    t = step + 1
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + EPS)


def test_one_step_after_carry_over_moves_every_expert_as_the_dense_mlp_would():
    """Give every expert copy the dense MLP's gradient: after one AdamW step each copy equals the
    dense MLP stepped by the dense optimizer, and the hand-written AdamW update of the dense
    moments. A fresh Adam (the contrast) moves it differently."""
    dense, dense_opt, moe_model, moe_opt, _ = carried_over()
    dense_params, moe_params = dict(dense.named_parameters()), dict(moe_model.named_parameters())
    before = {n: p.detach().clone() for n, p in dense_params.items()}
    moments = {n: {k: v.clone() for k, v in dense_opt.state[p].items()} for n, p in dense_params.items()}
    torch.manual_seed(2)
    grads = {n: torch.randn_like(p) for n, p in dense_params.items()}
    for n, p in dense_params.items():
        p.grad = grads[n].clone()
    for n, p in moe_params.items():          # the router: any gradient (it has no dense twin)
        p.grad = torch.randn_like(p) if ".mlp.gate." in n else None
    for dense_name, _, p in expert_params(moe_model):
        p.grad = grads[dense_name].clone()
    for n, p in moe_params.items():
        if ".mlp." not in n:
            p.grad = grads[n].clone()
    fresh_model = upcycle(dense, n_experts=4, top_k=2)     # the contrast: same weights, fresh Adam
    fresh_opt = adamw(fresh_model)
    for (_, _, p), (_, _, q) in zip(expert_params(moe_model), expert_params(fresh_model)):
        q.grad = p.grad.clone()
    dense_opt.step()
    moe_opt.step()
    fresh_opt.step()
    for (dense_name, _, p), (_, _, q) in zip(expert_params(moe_model), expert_params(fresh_model)):
        s = moments[dense_name]
        hand = hand_adamw_step(before[dense_name], grads[dense_name], s["exp_avg"], s["exp_avg_sq"],
                               float(s["step"]), LR / 0.25, WD)
        torch.testing.assert_close(p.detach(), dense_params[dense_name].detach(), rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), hand, rtol=1e-12, atol=1e-15)
        assert (q - hand).abs().max() > 1e-4          # fresh Adam: a different first step
    for n, p in dense_params.items():
        if ".mlp." not in n:
            torch.testing.assert_close(moe_params[n].detach(), p.detach(), rtol=0, atol=0)
    for i in range(2):       # the router took a fresh Adam's first step: bias-corrected, step 1
        assert float(moe_opt.state[moe_params[f"model.layers.{i}.mlp.gate.weight"]]["step"]) == 1.0


def test_carry_over_refuses_an_optimizer_state_of_another_model():
    dense, dense_opt = trained_dense_and_optimizer(steps=1)
    moe_model = upcycle(dense, n_experts=4, top_k=2)
    other = MiniCPM(small_config(mup=False, tie_word_embeddings=False)).double()
    with pytest.raises(ValueError, match="parameter groups"):
        upcycle_optimizer_state(other, dense_opt.state_dict(), moe_model, adamw(moe_model))
    with pytest.raises(ValueError, match="no optimizer state"):
        upcycle_optimizer_state(dense, None, moe_model, adamw(moe_model))


# ----------------------------------------------------------------------------- checkpoint layout

def test_save_hf_then_from_hf(tmp_path):
    torch.manual_seed(0)
    model = MiniCPM(moe_config())
    hf.save_hf(model, tmp_path)
    hfc = json.loads((tmp_path / "config.json").read_text())
    assert hfc["num_experts"] == 4 and hfc["num_experts_per_tok"] == 2
    state = torch.load(os.path.join(tmp_path, "pytorch_model.bin"), weights_only=True)
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        assert state[p + "gate.weight"].shape == (4, 64)
        for j in range(4):
            assert state[f"{p}experts.{j}.w1.weight"].shape == (160, 64)
            assert state[f"{p}experts.{j}.w3.weight"].shape == (160, 64)
            assert state[f"{p}experts.{j}.w2.weight"].shape == (64, 160)
        assert not any(k.startswith(p + "gate_proj") or k.startswith(p + "up_proj") for k in state)
    assert len([k for k in state if ".mlp." in k]) == 2 * (1 + 4 * 3)
    loaded = hf.load_hf(tmp_path)
    assert loaded.config.n_experts == 4 and loaded.config.top_k == 2
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- parameter counts

def test_minicpm_moe_parameter_counts():
    """§7.3: 13.6B non-embedding parameters, about 4B activated per token."""
    cfg = get_config("minicpm-2.4b", n_experts=8, top_k=2)
    with torch.device("meta"):
        model = MiniCPM(cfg)
    L, d, f, E, k = 40, 2304, 5760, 8, 2
    attention = 4 * d * d                  # 36 query and 36 KV heads of 64: q, k, v, o are d x d
    norms = 2 * d
    expert = 3 * d * f
    router = E * d
    total = L * (attention + norms + E * expert + router) + d
    active = L * (attention + norms + k * expert + router) + d
    assert total == 13_590_468_864 and active == 4_035_320_064
    assert model.num_params(non_embedding=True) == total
    assert model.num_params(non_embedding=True, active=True) == active
    assert round(total / 1e9, 1) == 13.6
    assert round(active / 1e9, 1) == 4.0
    # the dense 2.4B plus 7 more experts and a router per layer
    assert total - 2_442_057_984 == L * ((E - 1) * expert + router)
