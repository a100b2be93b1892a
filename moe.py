"""MiniCPM-MoE's feed-forward layer (paper §7.3): a router and n SwiGLU experts per layer.

Each token's router logits `gate(x)` go through a softmax over the n experts (in fp32); the token
is sent to its top_k experts, whose outputs are summed with the k kept probabilities renormalised
to sum to 1. A Switch-Transformer load-balancing loss `n * sum_i f_i * P_i` (f_i the share of the
routed assignments that expert i receives, P_i its mean router probability) is left on the layer
as `aux_loss` (and each expert's share as `expert_load`); minicpm.MiniCPM.forward averages both over
layers into its `moe_stats`, and the trainer adds aux_loss_coef (0.01) times aux_loss to its objective. This file does not import
minicpm.py: the model imports its layers, never the other way round.

MiniCPM-MoE was not trained from scratch but "sparse-upcycled" from the dense 2.4B: every expert
starts as a copy of the dense MLP, the router as N(0, 0.1). `upcycle` does that, and
`upcycle_optimizer_state` carries the dense run's Adam moments into every expert copy.

Parameter names are the released checkpoint's: `mlp.gate.weight` (router, [n, d]) and
`mlp.experts.{j}.w1` (gate, d->ffn), `w3` (up, d->ffn), `w2` (down, ffn->d).

The layer's speed against a dense MLP of equal FLOPs: python tools/moe_bench.py
"""
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

UPCYCLE_ROUTER_STD = 0.1   # §7.3: the upcycled router starts from N(0, 0.1)
# upcycling: the dense MLP's projection -> the expert's name for it (the released checkpoint's)
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class Expert(nn.Module):  # one SwiGLU MLP, the released names: w2(silu(w1(x)) * w3(x))
    def __init__(self, d, ffn):
        super().__init__()
        self.w1 = nn.Linear(d, ffn, bias=False)   # gate
        self.w3 = nn.Linear(d, ffn, bias=False)   # up
        self.w2 = nn.Linear(ffn, d, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, d, ffn, n_experts, top_k):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(d, n_experts, bias=False)   # the router
        self.experts = nn.ModuleList(Expert(d, ffn) for _ in range(n_experts))
        self.aux_loss = None      # load-balancing loss of the last forward (unweighted, differentiable)
        self.expert_load = None   # f: share of the last forward's assignments per expert (detached)

    def forward(self, x):  # x [B, T, d] -> [B, T, d]
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # [N, d], N tokens
        N, E, k = x.shape[0], self.n_experts, self.top_k

        # Routing. The softmax runs in (at least) fp32: under bf16 autocast the logits are bf16, and
        # the small differences between experts' probabilities decide both top-k and the weights.
        logits = self.gate(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(k, dim=-1)                        # [N, k] each
        weights = weights / weights.sum(dim=-1, keepdim=True)          # the k weights sum to 1

        # Dispatch. The N*k (token, slot) assignments are sorted by expert once, so each expert's
        # tokens form one contiguous slice: one matmul per expert, no per-expert mask over all N
        # tokens. A stable sort keeps tokens in order within an expert (reproducible results).
        flat_expert = chosen.reshape(-1)                               # [N*k], assignment a = token*k + slot
        order = flat_expert.argsort(stable=True)
        token_of = order // k                                          # token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=E)              # tokens per expert
        # index_select rather than x[token_of]: its backward is a plain index_add_ (a little faster)
        x_sorted = x.index_select(0, token_of)                         # [N*k, d]
        y_sorted = torch.cat([expert(chunk) for expert, chunk
                              in zip(self.experts, x_sorted.split(counts.tolist()))])
        # Combine: weight each expert output by its routing weight and add it back to its token.
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        out = torch.zeros_like(x, dtype=y_sorted.dtype).index_add_(0, token_of, y_sorted)

        # Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4): f is a count, so it has no
        # gradient; the loss pushes the router through P towards experts that are under-used.
        # It equals 1 when the routing is balanced (every f_i = 1/E, or every P_i = 1/E).
        f = counts.to(probs.dtype) / (N * k)
        P = probs.mean(dim=0)
        self.aux_loss = E * (f * P).sum()
        self.expert_load = f.detach()
        return out.reshape(shape)          # in the experts' dtype, as minicpm.MLP under autocast


# ----------------------------------------------------------------------------- sparse upcycling

@torch.no_grad()
def upcycle(dense_model, n_experts=8, top_k=2, router_std=UPCYCLE_ROUTER_STD, generator=None):
    """A new MiniCPM-MoE model from a dense one (Komatsuzaki et al. 2022 "sparse upcycling", as in
    MiniCPM-MoE, §7.3): each of the n_experts experts of layer i is a copy of the dense layer i
    MLP (gate_proj -> w1, up_proj -> w3, down_proj -> w2), each router is N(0, router_std), and
    everything else (embedding, attention, norms) is copied. Because the experts are identical and
    the top_k weights sum to 1, the new model computes exactly the dense model's function, whatever
    the router (up to rounding): training then lets the experts drift apart.

    router_std is the paper's 0.1, not the muP init_std / sqrt(m) a from-scratch MoE model gets."""
    if dense_model.config.n_experts:
        raise ValueError("upcycle needs a dense model (config.n_experts == 0)")
    cfg = replace(dense_model.config, n_experts=n_experts, top_k=top_k)
    ref = dense_model.lm_head.weight
    with torch.device("meta"):          # no random init of 8x the MLP weights only to overwrite them
        moe_model = type(dense_model)(cfg, attn_impl=dense_model.attn_impl, grad_ckpt=dense_model.grad_ckpt)
    moe_model = moe_model.to_empty(device=ref.device).to(ref.dtype)
    if cfg.tie_word_embeddings:         # to_empty / .to untie lm_head from the embedding: tie again
        moe_model.lm_head.weight = moe_model.model.embed_tokens.weight

    state = {}
    for name, tensor in dense_model.state_dict().items():
        if ".mlp." in name:             # model.layers.{i}.mlp.{gate,up,down}_proj.weight
            layer, proj = name.split(".mlp.")
            proj, suffix = proj.split(".", 1)
            for j in range(n_experts):
                state[f"{layer}.mlp.experts.{j}.{EXPERT_NAMES[proj]}.{suffix}"] = tensor
        else:
            state[name] = tensor
    for i in range(cfg.n_layer):
        # drawn on the CPU (generator: an optional CPU torch.Generator); load_state_dict moves it
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(n_experts, cfg.n_embd, generator=generator) * router_std
    moe_model.load_state_dict(state, strict=True)   # copies (load_state_dict never aliases)
    moe_model.train(dense_model.training)
    return moe_model


def _dense_name(moe_name):
    """The dense parameter an upcycled one was copied from: experts.{j}.w1 -> gate_proj (any j),
    the same name outside the MLP, None for the router (new, nothing to copy)."""
    if ".mlp.gate." in moe_name:
        return None
    if ".mlp.experts." in moe_name:          # model.layers.{i}.mlp.experts.{j}.{w1,w3,w2}.weight
        layer, rest = moe_name.split(".mlp.experts.")
        proj, suffix = rest.split(".", 1)[1].split(".", 1)
        dense_proj = next(d for d, e in EXPERT_NAMES.items() if e == proj)
        return f"{layer}.mlp.{dense_proj}.{suffix}"
    return moe_name


def _state_by_name(model, optimizer_state, param_groups):
    """{parameter name: its per-parameter optimizer state} from an optimizer state_dict, whose
    parameters are numbered in the order of the groups the optimizer was built from (param_groups,
    here the model's own muP groups: train.py builds its AdamW from model.param_groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer_state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in param_groups] or \
            [g.get("name") for g in saved] != [g.get("name") for g in param_groups]:
        raise ValueError("the dense optimizer state does not match the dense model's parameter groups: "
                         "was it saved by train.py for this checkpoint's model?")
    out = {}
    for saved_group, group in zip(saved, param_groups):
        for index, p in zip(saved_group["params"], group["params"]):
            if index in optimizer_state["state"]:
                out[names[id(p)]] = optimizer_state["state"][index]
    return out


@torch.no_grad()
def upcycle_optimizer_state(dense_model, dense_optimizer_state, moe_model, moe_optimizer):
    """Carry the dense run's Adam state into the optimizer of the model upcycle() made from it.

    dense_optimizer_state is the dense optimizer's state_dict() (train.py saves it in ckpt.pt), for
    an optimizer built from dense_model.param_groups(...); moe_optimizer is a new optimizer of
    moe_model, built from moe_model.param_groups(...), whose state is replaced here:
      - every expert copy j of layer i gets its own copy of the dense layer-i MLP's exp_avg,
        exp_avg_sq and step (w1 <- gate_proj, w3 <- up_proj, w2 <- down_proj);
      - the router has no dense counterpart: it gets no state, so Adam starts it at step 0;
      - every other parameter (embedding, attention, norms) keeps its state.
    Why: the weights carry on from the dense run, so should the optimizer (§7.3 continues training
    the upcycled model). A fresh Adam divides its first updates by the square root of a one-sample
    second moment, full-size sign-like steps on weights that are already trained; with the dense
    moments, each expert starts with exactly the update the dense MLP was about to make.

    The lr groups are moe_optimizer's own (so are lr, betas, weight decay): the model's muP rule
    puts every 2-D tensor except the embedding in the lr / m group. The experts are the dense MLP's
    matrices, so they keep its lr / m. The router [n_experts, d] is a matrix whose fan-in is the
    width d, the muP "output-like" case: under Adam an update of size eta per entry moves each
    router logit by O(eta * d) (the update correlates with the input across all d coordinates),
    so keeping the logits' change independent of the width needs eta ~ 1/d, i.e. lr / m, like the
    hidden matrices (Yang et al. 2022, Tensor Programs V, Table 3: 1/fan_in for hidden and output
    weights under Adam). Only its initial std stays the paper's fixed 0.1 (see upcycle).

    Returns {"carried": number of parameters given dense state, "fresh": names left without}."""
    if not dense_optimizer_state or "state" not in dense_optimizer_state:
        raise ValueError("the dense checkpoint has no optimizer state to carry over "
                         "(train.py: pass --upcycle_fresh_adam to start Adam afresh)")
    dense_state = _state_by_name(dense_model, dense_optimizer_state, dense_model.param_groups(0.0, 0.0))
    names = {id(p): n for n, p in moe_model.named_parameters()}
    new_state, fresh, index = {}, [], 0
    # the live optimizer's own numbering: parameters counted through its groups in order, as
    # torch.optim.Optimizer.state_dict() numbers them
    for group in moe_optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            source = _dense_name(name)
            if source is None or source not in dense_state:
                fresh.append(name)
            else:
                state = dense_state[source]
                if state["exp_avg"].shape != p.shape:
                    raise ValueError(f"dense optimizer state for {source} has shape {tuple(state['exp_avg'].shape)}, "
                                     f"the upcycled {name} {tuple(p.shape)}")
                # clones: the copies must not share storage (Adam updates its moments in place)
                new_state[index] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            index += 1
    # load_state_dict moves each tensor to its parameter's device (and keeps `step` where Adam wants it)
    moe_optimizer.load_state_dict(dict(state=new_state, param_groups=moe_optimizer.state_dict()["param_groups"]))
    return dict(carried=len(new_state), fresh=fresh)
