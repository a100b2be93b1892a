"""Tests for kernels.py, the Triton fused attention, against an independent float64 reference.

Without CUDA they run on CPU through Triton's interpreter in fp32, which must be switched on before
kernels.py is imported (hence the environment variable at the very top). With CUDA the same small
cases run compiled in bf16, and the real-size tests at the bottom run too.
"""
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads this when its own modules are imported, so nothing may have imported triton yet
    # (conftest.py sets it first, as transformers imports triton at collection).
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/test_kernels.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import kernels  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32   # bf16 dot products are wrong under the interpreter
TOL = 1e-2 if CUDA else 1e-5                        # relative error, ||x - ref|| / ||ref||


def reference(q, k, v, causal=True):
    """float64 attention written out: repeat the KV heads, scores, bottom-right causal mask, softmax."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)   # j <= i + Tk - Tq
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def inputs(B, Hq, Hkv, Tq, Tk, D, device=DEVICE, dtype=DTYPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda H, T: torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_()
    return make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk)


def check_against_reference(q, k, v, causal=True, backward=True, tol=TOL):
    out = kernels.flash_attention(q, k, v, causal=causal)
    ref = reference(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol, f"forward: {rel_err(out, ref):.2e}"
    if not backward:
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.shape == want.shape
        assert rel_err(got, want.double()) < tol, f"{name}: {rel_err(got, want.double()):.2e}"


# Interpreter tiles are 32 x 16 (forward, dQ) and 16 x 32 (dK, dV): 64 is a multiple of both, 50 and
# 33 of neither; heads 4/2 and 6/2 are GQA with 2 and 3 query heads per KV head.
@pytest.mark.parametrize("B,Hq,Hkv,T,D", [
    (1, 2, 2, 64, 32),     # MHA, T a multiple of the blocks
    (2, 2, 2, 50, 32),     # MHA, masked tails
    (1, 4, 2, 64, 32),     # GQA
    (2, 4, 2, 50, 32),     # GQA, masked tails
    (1, 6, 2, 33, 64),     # GQA 3:1, head dim 64
    (1, 2, 1, 20, 128),    # head dim 128, a single partial block
])
def test_causal_forward_and_gradients(B, Hq, Hkv, T, D):
    check_against_reference(*inputs(B, Hq, Hkv, T, T, D))


@pytest.mark.parametrize("Tq,Tk", [(1, 37), (7, 64), (20, 45), (20, 34), (40, 57)])
def test_fewer_queries_than_keys_is_bottom_right_causal(Tq, Tk):
    """Decoding with a KV cache: the Tq queries are the last Tq positions. The gradients are checked
    too, though the model only needs them for Tq == Tk. Offsets Tk - Tq of 36, 57, 25, 14 and 17 put the
    diagonal at different places inside the 16- and 32-wide tiles."""
    check_against_reference(*inputs(1, 4, 2, Tq, Tk, 32))


def test_not_causal():
    check_against_reference(*inputs(1, 4, 2, 40, 40, 32), causal=False)


def test_causal_mask_matters():
    """The same inputs give a clearly different answer without the mask, so the tests above can tell."""
    q, k, v = inputs(1, 2, 2, 40, 40, 32)
    out = kernels.flash_attention(q, k, v, causal=True)
    assert rel_err(out, reference(q, k, v, causal=False)) > 0.1


def test_strided_inputs_and_scale():
    """The model hands over q, k, v as [B, T, H, D] buffers viewed as [B, H, T, D]; an explicit scale."""
    B, T, Hq, Hkv, D = 2, 40, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE, DTYPE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE, DTYPE).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE, DTYPE).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    out = kernels.flash_attention(q, k, v, sm_scale=0.3)
    ref = reference(q * (0.3 * D ** 0.5), k, v)   # the reference scales by 1/sqrt(D)
    assert rel_err(out, ref) < TOL
    check_against_reference(q, k, v)


@pytest.mark.skipif(CUDA, reason="checks the CPU interpreter's refusals")
def test_check_supported_refuses_clearly():
    ok = torch.zeros(1, 2, 4, 32)
    kernels.check_supported(ok)
    for bad, words in ((ok.double(), "float32"), (ok.bfloat16(), "float32"), (torch.zeros(1, 2, 4, 48), "head dim")):
        with pytest.raises(RuntimeError, match=words):
            kernels.check_supported(bad)
    with pytest.raises(ValueError, match="more queries"):
        kernels.flash_attention(ok, ok[:, :, :2], ok[:, :, :2])


# --------------------------------------------------------------------------- real sizes, CUDA only

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (24, 8)])
def test_real_size_on_cuda(Hq, Hkv, D, dtype):
    q, k, v = inputs(1, Hq, Hkv, 4096, 4096, D, device="cuda", dtype=dtype)
    check_against_reference(q, k, v, tol=1e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_decode_step_on_cuda():
    check_against_reference(*inputs(2, 24, 8, 1, 3001, 64, device="cuda", dtype=torch.bfloat16), backward=False)


def test_minicpm_attention_choice_uses_the_kernel():
    """minicpm.attention(..., "triton") goes through the kernel and agrees with "eager", prefill and decode."""
    import minicpm
    for Tq, Tk in ((24, 24), (1, 24)):
        q, k, v = inputs(1, 4, 2, Tq, Tk, 32, seed=5)
        got = minicpm.attention(q, k, v, "triton")
        assert rel_err(got, minicpm.attention(q, k, v, "eager")) < TOL
