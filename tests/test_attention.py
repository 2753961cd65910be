"""The attention layer: equal to the explicit step-by-step versions (within 1e-6), causal, GQA, KV
cache, RoPE, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.attention import CausalSelfAttention, KVCache
from minillm.embeddings import apply_rope, rope_cos_sin

TOL = dict(atol=1e-6, rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def loop_attention(m: CausalSelfAttention, x, rope=None):
    """The slowest, plainest causal multi-head attention, in float64: one query at a time, softmax
    by hand, the GQA key/ value head of query head h is h // (n_head / n_kv_head). Shares only the
    weights with the module."""
    B, T, C = x.shape
    W, b = m.c_attn.weight.double(), m.c_attn.bias.double() if m.c_attn.bias is not None else 0
    qkv = x.double() @ W.T + b
    q, k, v = qkv.split(m.sizes, dim=2)
    hs, group = m.head_dim, m.n_head // m.n_kv_head
    q = q.view(B, T, m.n_head, hs).transpose(1, 2)
    k = k.view(B, T, m.n_kv_head, hs).transpose(1, 2)
    v = v.view(B, T, m.n_kv_head, hs).transpose(1, 2)
    if rope is not None:
        q, k = (
            apply_rope(q, *(t.double() for t in rope)),
            apply_rope(k, *(t.double() for t in rope)),
        )
    y = torch.zeros(B, m.n_head, T, hs, dtype=torch.float64)
    for bi in range(B):
        for h in range(m.n_head):
            for i in range(T):
                s = torch.stack(
                    [q[bi, h, i] @ k[bi, h // group, j] / math.sqrt(hs) for j in range(i + 1)]
                )
                a = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                y[bi, h, i] = sum(a[j] * v[bi, h // group, j] for j in range(i + 1))
    y = y.transpose(1, 2).reshape(B, T, C)
    Wp, bp = m.c_proj.weight.double(), m.c_proj.bias.double() if m.c_proj.bias is not None else 0
    return (y @ Wp.T + bp).float()


def explicit_attention(m: CausalSelfAttention, x):
    """The chapter's `MultiHeadAttention` step: scores, -inf mask, softmax, weighted sum, with the
    module's weights."""
    B, T, C = x.shape
    q, k, v = m.c_attn(x).split(m.sizes, dim=2)
    heads = lambda t: t.view(B, T, -1, m.head_dim).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    k, v = (t.repeat_interleave(m.n_head // m.n_kv_head, dim=1) for t in (k, v))
    scores = q @ k.transpose(2, 3) / math.sqrt(m.head_dim)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    y = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
    return m.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.fixture
def x():
    return torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_kv_head,bias", [(4, True), (2, False), (1, True)])
def test_equals_loop_and_explicit_versions(x, n_kv_head, bias):
    torch.manual_seed(1)
    m = CausalSelfAttention(32, n_head=4, n_kv_head=n_kv_head, bias=bias).eval()
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, explicit_attention(m, x), **TOL)
        torch.testing.assert_close(y, loop_attention(m, x), **TOL)


def test_equals_sdpa_with_separate_projections(x):
    """The fused c_attn is three projections stacked: compare with F.scaled_dot_product_attention on
    separate q, k, v."""
    torch.manual_seed(2)
    m = CausalSelfAttention(32, n_head=4).eval()
    Wq, Wk, Wv = m.c_attn.weight.split(32)
    bq, bk, bv = m.c_attn.bias.split(32)
    heads = lambda t: t.view(2, 11, 4, 8).transpose(1, 2)
    with torch.no_grad():
        y = F.scaled_dot_product_attention(
            heads(x @ Wq.T + bq), heads(x @ Wk.T + bk), heads(x @ Wv.T + bv), is_causal=True
        )
        ref = m.c_proj(y.transpose(1, 2).reshape(2, 11, 32))
        torch.testing.assert_close(m(x), ref, **TOL)


def test_gqa_equals_mha_with_repeated_kv_heads(x):
    torch.manual_seed(3)
    gqa = CausalSelfAttention(32, n_head=4, n_kv_head=2).eval()
    mha = CausalSelfAttention(32, n_head=4).eval()
    assert gqa.c_attn.weight.shape == (32 + 2 * 16, 32)
    with torch.no_grad():
        q, k, v = gqa.c_attn.weight.split(gqa.sizes)
        rep = lambda t: t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
        mha.c_attn.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        qb, kb, vb = gqa.c_attn.bias.split(gqa.sizes)
        rep_b = lambda t: t.view(2, 8).repeat_interleave(2, dim=0).flatten()
        mha.c_attn.bias.copy_(torch.cat([qb, rep_b(kb), rep_b(vb)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
        torch.testing.assert_close(gqa(x), mha(x), **TOL)


def test_causal_future_does_not_change_the_past(x):
    torch.manual_seed(4)
    m = CausalSelfAttention(32, n_head=4).eval()
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 4, 32)
    with torch.no_grad():
        a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7], **TOL)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.parametrize("use_rope", [False, True])
def test_kv_cache_equals_full_forward(x, n_kv_head, use_rope):
    torch.manual_seed(5)
    m = CausalSelfAttention(32, n_head=4, n_kv_head=n_kv_head).eval()
    cos, sin = rope_cos_sin(64, 8)
    rope = lambda a, b: (cos[a:b], sin[a:b]) if use_rope else None
    with torch.no_grad():
        full = m(x, rope=rope(0, 11))
        cache = KVCache(2, n_kv_head, 16, 8)
        out = [m(x[:, :4], rope=rope(0, 4), cache=cache)]  # prefill
        # one token at a time
        out += [m(x[:, t : t + 1], rope=rope(t, t + 1), cache=cache) for t in range(4, 7)]
        # a chunk after a cached prefix: rectangular mask
        out += [m(x[:, 7:], rope=rope(7, 11), cache=cache)]
    assert cache.pos == 11 and cache.k.shape == (2, n_kv_head, 16, 8)
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)


def test_kv_cache_overflow_is_an_error(x):
    m = CausalSelfAttention(32, n_head=4).eval()
    cache = KVCache(2, 4, 8, 8)
    with pytest.raises(
        ValueError, match=r"KV cache full: 0 cached \+ 11 new positions > max_len=8"
    ):
        m(x, cache=cache)


def test_dropout_only_in_training(x):
    torch.manual_seed(6)
    m = CausalSelfAttention(32, n_head=4, dropout=0.5)
    ref = CausalSelfAttention(32, n_head=4)
    ref.load_state_dict(m.state_dict())
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x), ref(x), **TOL)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(0)
    b = m(x)
    torch.manual_seed(1)
    c = m(x)
    torch.testing.assert_close(a, b)  # dropout follows the seed
    assert (a - c).abs().max() > 1e-3 and (a - ref(x)).abs().max() > 1e-3


def test_gradients_flow_through_all_projections(x):
    m = CausalSelfAttention(32, n_head=4, n_kv_head=2)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_shapes_have_clear_messages():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        CausalSelfAttention(30, n_head=4)
    with pytest.raises(ValueError, match="n_head=6 is not divisible by n_kv_head=4"):
        CausalSelfAttention(36, n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="n_kv_head=0"):
        CausalSelfAttention(32, n_head=4, n_kv_head=0)


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.parametrize("use_rope", [False, True])
def test_decode_path_equals_general_path(x, n_kv_head, use_rope):
    "One new token with no mask takes `_decode`; a mask that hides nothing forces the general path."
    torch.manual_seed(7)
    m = CausalSelfAttention(32, n_head=4, n_kv_head=n_kv_head).eval()
    cos, sin = rope_cos_sin(64, 8)
    rope = (cos[10:11], sin[10:11]) if use_rope else None
    with torch.no_grad():
        caches = [KVCache(2, n_kv_head, 16, 8) for _ in range(2)]
        for c in caches:
            m(x[:, :10], rope=(cos[:10], sin[:10]) if use_rope else None, cache=c)
        fast = m(x[:, 10:11], rope=rope, cache=caches[0])
        slow = m(x[:, 10:11], rope=rope, cache=caches[1], mask=torch.ones(1, 11, dtype=torch.bool))
    torch.testing.assert_close(fast, slow, **TOL)
    assert caches[0].pos == caches[1].pos == 11
    torch.testing.assert_close(caches[0].kv, caches[1].kv, **TOL)
    assert caches[0].k.data_ptr() == caches[0].kv.data_ptr()  # k and v are views of one buffer
    caches[0].pos = 16  # full: the decode path refuses too
    with pytest.raises(
        ValueError, match=r"KV cache full: 16 cached \+ 1 new positions > max_len=16"
    ):
        m(x[:, :1], cache=caches[0])


def test_padding_mask_hides_left_padding(x):
    """A row left-padded by 3 positions, with a mask that hides the pads (each pad query sees only
    itself), gives the unpadded row's outputs at its real positions, with RoPE positions counted
    from the first real token."""
    torch.manual_seed(8)
    m = CausalSelfAttention(32, n_head=4, n_kv_head=2).eval()
    cos, sin = rope_cos_sin(64, 8)
    T, pad = x.shape[1], 3
    with torch.no_grad():
        alone = m(x[:1], rope=(cos[:T], sin[:T]))
        padded = torch.cat([torch.randn(1, pad, 32), x[:1]], dim=1)  # (1, pad + T, C)
        real = torch.arange(pad + T) >= pad
        pos = (real.cumsum(0) - 1).clamp(min=0)
        causal = torch.ones(pad + T, pad + T, dtype=torch.bool).tril()
        mask = causal & (real[None, :] | torch.eye(pad + T, dtype=torch.bool))
        out = m(padded, rope=(cos[pos], sin[pos]), mask=mask)
        unmasked = m(padded, rope=(cos[pos], sin[pos]), mask=causal)
    torch.testing.assert_close(out[:, pad:], alone, **TOL)
    assert (unmasked[:, pad:] - alone).abs().max() > 1e-3  # without the mask the pads leak in


class AttentionCalls(TorchDispatchMode):
    "Records the dtype of q at every attention kernel that runs under it."

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.calls.append((func.__name__, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_kv_head,use_rope", [(4, False), (2, True)])
def test_bf16_training_on_cpu_runs_attention_in_float32(n_kv_head, use_rope):
    """Training under bf16 autocast on a CPU, the attention kernel gets float32 q, k and v (with
    RoPE, whose float32 tables already make q float32, and with GQA too) and returns bf16, as the
    kernel would; inference keeps bf16. Outputs and gradients equal float32's to bf16 rounding."""
    torch.manual_seed(9)
    m = CausalSelfAttention(64, n_head=4, n_kv_head=n_kv_head)
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(1))
    rope = rope_cos_sin(40, 16) if use_rope else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with AttentionCalls() as seen:
            y16 = m(x, rope=rope)
        assert y16.dtype == torch.bfloat16
        assert seen.calls and all(dtype == torch.float32 for _, dtype in seen.calls), seen.calls
        with torch.no_grad(), AttentionCalls() as seen:
            m(x, rope=rope)
        assert seen.calls and all(dtype == torch.bfloat16 for _, dtype in seen.calls), seen.calls
        g16 = torch.autograd.grad(y16.float().square().sum(), m.c_attn.weight)[0]
    y32 = m(x, rope=rope)
    g32 = torch.autograd.grad(y32.square().sum(), m.c_attn.weight)[0]
    assert (y16.float() - y32).norm() / y32.norm() < 2e-2
    assert (g16 - g32).norm() / g32.norm() < 2e-2
