"""Windows, loaders and position encodings: shapes, shifts, determinism, errors, and RoPE against
Hugging Face Llama."""

import math

import numpy as np
import pytest
import torch

from minillm.embeddings import (
    TokenDataset,
    apply_rope,
    check_positive_int,
    make_loader,
    random_batch,
    rope_cos_sin,
    rotate_half,
    sinusoidal_positions,
)

# --- windows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "memmap", "torch"])
def test_windows_shift_and_stride(kind, tmp_path):
    a = np.arange(100, 121, dtype=np.uint16)  # 21 tokens: 100..120
    if kind == "memmap":
        a.tofile(tmp_path / "t.bin")
        a = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    tokens = torch.from_numpy(a.astype(np.int32)) if kind == "torch" else a
    ds = TokenDataset(tokens, context_length=4, stride=3)
    assert len(ds) == (21 - 5) // 3 + 1 == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4,)
        assert x.tolist() == list(range(100 + 3 * i, 104 + 3 * i))
        assert y.tolist() == list(range(101 + 3 * i, 105 + 3 * i))  # the next token of each input
    # last window: 115..118 -> 116..119 (120 would need a 7th window)
    assert ds[-1][1][-1].item() == 119
    with pytest.raises(IndexError, match="6 windows"):
        ds[6]


def test_default_stride_is_context_length_and_windows_cover_the_tokens():
    tokens = np.arange(33, dtype=np.int64)
    ds = TokenDataset(tokens, 8)
    assert ds.stride == 8 and len(ds) == 4  # 4 windows of 8 inputs use 32 + 1 tokens
    xs = torch.cat([ds[i][0] for i in range(len(ds))])
    assert xs.tolist() == list(range(32))  # non-overlapping: each token an input exactly once
    assert (
        len(TokenDataset(np.arange(9), 8)) == 1
        and len(TokenDataset(np.arange(9), 8, stride=1)) == 1
    )
    assert len(TokenDataset(np.arange(12), 8, stride=1)) == 4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(context_length=0), "context_length=0"),
        (dict(context_length=-3), "context_length=-3"),
        (dict(context_length=2.0), "context_length=2.0"),
        (dict(context_length=4, stride=0), "stride=0"),
        (dict(context_length=4, stride=-1), "stride=-1"),
        (dict(context_length=10), r"10 tokens are too few for context_length=10.*11"),
    ],
)
def test_bad_arguments_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        TokenDataset(np.arange(10), **kw)


@pytest.mark.parametrize(
    "tokens",
    [
        np.zeros((3, 4), dtype=np.int64),
        np.linspace(0, 1, 20),
        [1, 2, 3] * 10,
        torch.rand(20),
        torch.zeros(20, dtype=torch.bool),
    ],
)
def test_tokens_must_be_a_1d_integer_array(tokens):
    with pytest.raises(TypeError, match="1-D integer"):
        TokenDataset(tokens, 4)


# --- loaders
# ------------------------------------------------------------------------------------------


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_shapes_and_drop_last():
    tokens = np.arange(1000, dtype=np.uint16)
    # (1000 - 17) // 16 + 1 = 62 windows -> 7 full batches
    ld = make_loader(tokens, batch_size=8, context_length=16)
    bs = _batches(ld)
    assert len(bs) == len(ld) == 7 and all(x.shape == y.shape == (8, 16) for x, y in bs)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in bs)
    assert len(_batches(make_loader(tokens, 8, 16, drop_last=False))) == 8
    with pytest.raises(ValueError, match=r"batch_size=100: the tokens give only 62 windows"):
        make_loader(tokens, 100, 16)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(tokens, 0, 16)


def test_loader_is_deterministic_given_seed_and_independent_of_global_rng():
    tokens = np.arange(2001, dtype=np.int64)  # 200 windows of 10: 50 full batches of 4
    torch.manual_seed(1)
    a = _batches(make_loader(tokens, 4, 10, seed=7))
    torch.manual_seed(2)
    torch.rand(5)  # the global generator is in a different state: must not matter
    b = _batches(make_loader(tokens, 4, 10, seed=7))
    c = _batches(make_loader(tokens, 4, 10, seed=8))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    # shuffled: not in order, but the same windows
    starts = sorted(x[0].item() for xb, _ in a for x in xb)
    assert starts == list(range(0, 2000, 10)) and [x[0].item() for x in a[0][0]] != starts[:4]
    ordered = _batches(make_loader(tokens, 4, 10, shuffle=False))
    assert [x[0].item() for x in ordered[0][0]] == [0, 10, 20, 30]


def test_random_batch():
    tokens = np.arange(50, dtype=np.uint16)
    x, y = random_batch(tokens, 64, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()  # so that y.view(-1) works in a loss
    assert torch.equal(y, x + 1) and torch.equal(x - x[:, :1], torch.arange(8).expand(64, 8))
    # every offset possible, up to the last
    assert x.min() >= 0 and y.max() <= 49 and len(set(x[:, 0].tolist())) > 20
    x2, y2 = random_batch(tokens, 64, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xs, _ = random_batch(np.arange(9), 200, 8, torch.Generator().manual_seed(0))
    assert (xs[:, 0] == 0).all()  # exactly one window fits
    with pytest.raises(ValueError, match="context_length=9"):
        random_batch(np.arange(9), 2, 9, torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        random_batch(tokens, 2, 4, 0)


# --- sinusoidal
# ------------------------------------------------------------------------------------------


def test_sinusoidal_matches_the_formula():
    T, C = 50, 16
    pe = sinusoidal_positions(T, C)
    assert pe.shape == (T, C) and pe.dtype == torch.float32
    for p in (0, 1, 7, 49):
        for i in range(C // 2):
            angle = p / 10000 ** (2 * i / C)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * (C // 2)))
    with pytest.raises(ValueError, match="d_model=7"):
        sinusoidal_positions(8, 7)
    with pytest.raises(ValueError, match="context_length=0"):
        sinusoidal_positions(0, 8)


# --- RoPE
# ------------------------------------------------------------------------------------------


def _llama(head_dim, theta, T):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        max_position_embeddings=T,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (8, 500.0), (64, 1e6)])
def test_rope_tables_and_rotation_match_hf_llama(head_dim, theta):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

    T, B, nh = 37, 2, 3
    hf_cos, hf_sin = _llama(head_dim, theta, T)(torch.zeros(1), torch.arange(T)[None])  # (1, T, hs)
    cos, sin = rope_cos_sin(T, head_dim, theta)
    assert cos.shape == sin.shape == (T, head_dim) and cos.dtype == torch.float32
    # the same float32 arithmetic: bit for bit
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(B, nh, T, head_dim, generator=g),
        torch.randn(B, nh, T, head_dim, generator=g),
    )
    # HF: cos (B, T, hs), unsqueezed to (B, 1, T, hs)
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_rope(q, cos, sin), hq) and torch.equal(apply_rope(k, cos, sin), hk)
    assert torch.equal(rotate_half(q), hf_rotate_half(q))


def test_rope_dtype_and_device_arguments():
    cos, sin = rope_cos_sin(5, 4, dtype=torch.bfloat16, device="cpu")
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.device.type == "cpu"
    assert torch.equal(cos[0], torch.ones(4, dtype=torch.bfloat16)) and torch.equal(
        sin[0], torch.zeros(4, dtype=torch.bfloat16)
    )


def test_rope_preserves_norms_and_is_identity_at_position_zero():
    T, hs = 64, 32
    cos, sin = rope_cos_sin(T, hs)
    x = torch.randn(2, 4, T, hs, generator=torch.Generator().manual_seed(1))
    r = apply_rope(x, cos, sin)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    # each pair (i, i + hs/2) keeps its own length: a rotation in its plane
    pair_norm = lambda t: t[..., : hs // 2] ** 2 + t[..., hs // 2 :] ** 2
    torch.testing.assert_close(pair_norm(r), pair_norm(x), rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_the_offset():
    "q at position m, k at position n: q·k after RoPE is a function of m - n alone."
    T, hs = 40, 16
    cos, sin = rope_cos_sin(T, hs)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)
    rq = apply_rope(q.expand(1, 1, T, hs), cos, sin)[0, 0]  # (T, hs): q placed at every position
    rk = apply_rope(k.expand(1, 1, T, hs), cos, sin)[0, 0]
    scores = rq @ rk.T  # (T, T): scores[m, n] = q at m · k at n
    for off in (-20, -3, 0, 1, 5, 30):
        diag = torch.diagonal(scores, offset=-off)  # entries with m - n = off
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=0, atol=1e-4)
    assert not torch.allclose(
        torch.diagonal(scores, 0)[:1], torch.diagonal(scores, -5)[:1], atol=1e-2
    )
    # and the same for a batch of random vectors: shifting both positions by s changes nothing
    q, k = torch.randn(3, 5, 1, hs, generator=g), torch.randn(3, 5, 1, hs, generator=g)

    def score(m, n):
        return (
            apply_rope(q, cos[m : m + 1], sin[m : m + 1])
            * apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        ).sum(-1)

    for m, n, s in [(3, 1, 10), (0, 7, 25), (12, 12, 3)]:
        torch.testing.assert_close(score(m, n), score(m + s, n + s), rtol=0, atol=1e-4)


def test_rope_bad_inputs():
    with pytest.raises(ValueError, match="head_dim=7"):
        rope_cos_sin(8, 7)
    with pytest.raises(ValueError, match="context_length=0"):
        rope_cos_sin(0, 8)
    with pytest.raises(ValueError, match="theta=0"):
        rope_cos_sin(8, 8, theta=0)
    cos, sin = rope_cos_sin(16, 8)
    with pytest.raises(ValueError, match=r"slice the tables"):
        apply_rope(torch.zeros(1, 2, 10, 8), cos, sin)  # tables for 16 positions, x has 10
    apply_rope(torch.zeros(1, 2, 10, 8), cos[:10], sin[:10])


def test_check_positive_int():
    assert check_positive_int("n", 3) == 3 and check_positive_int("n", 5, at_most=5) == 5
    assert check_positive_int("n", np.int64(2)) == 2  # a NumPy integer is an integer
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="must be a positive integer"):
            check_positive_int("n", bad)
    with pytest.raises(ValueError, match=r"r=9: must be an integer in \[1, 8\]"):
        check_positive_int("r", 9, at_most=8)
