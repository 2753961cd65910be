"""Generation: the sampling policy, the loop with and without the KV cache, seeds, stop tokens,
cropping, streaming."""

import pytest
import torch
import torch.nn.functional as F

from minillm.generate import generate, generate_text, sample_next, stream, stream_text
from minillm.model import GPT, GPTConfig

V = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(family="gpt2", context_length=64, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(
            family=family,
            vocab_size=V,
            context_length=context_length,
            n_layer=2,
            n_head=4,
            n_embd=32,
            **kw,
        )
    ).eval()


@torch.no_grad()
def naive_greedy(model, idx, n):
    "nanoGPT's loop: crop to the context, run everything, take the argmax of the last position."
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.context_length :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.fixture
def prompt():
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- sample_next
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def _freq(n=40_000, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample_next(LOGITS.expand(n, -1), generator=g, **kw)[:, 0]
    return torch.bincount(draws, minlength=6) / n


def test_greedy_and_degenerate_filters_are_argmax():
    assert sample_next(LOGITS, temperature=0).item() == 0
    assert sample_next(LOGITS, top_k=1, generator=torch.Generator().manual_seed(1)).item() == 0
    assert sample_next(LOGITS, top_p=1e-6, generator=torch.Generator().manual_seed(1)).item() == 0


def test_temperature_top_k_top_p_draw_from_the_right_distribution():
    p = F.softmax(LOGITS[0], -1)
    assert (_freq() - p).abs().max() < 0.01
    assert (_freq(temperature=2.0) - F.softmax(LOGITS[0] / 2, -1)).abs().max() < 0.01
    k3 = torch.cat([p[:3] / p[:3].sum(), torch.zeros(3)])
    assert (_freq(top_k=3) - k3).abs().max() < 0.01
    # top_p=0.75: p = .561, .206, .125, ... -> the first two reach .767 >= .75, so two tokens are
    # kept
    assert p[:1].sum() < 0.75 <= p[:2].sum()
    assert (_freq(top_p=0.75) - torch.cat([p[:2] / p[:2].sum(), torch.zeros(4)])).abs().max() < 0.01
    # both filters: top_k first, then top_p on what is left (renormalised)
    assert (_freq(top_k=2, top_p=0.5) - torch.tensor([1.0, 0, 0, 0, 0, 0])).abs().max() < 1e-9


def test_no_op_filters_change_nothing():
    g = lambda: torch.Generator().manual_seed(5)
    plain = sample_next(LOGITS.expand(100, -1), generator=g())
    assert torch.equal(sample_next(LOGITS.expand(100, -1), top_k=6, generator=g()), plain)
    assert torch.equal(sample_next(LOGITS.expand(100, -1), top_k=600, generator=g()), plain)
    assert torch.equal(sample_next(LOGITS.expand(100, -1), top_p=1.0, generator=g()), plain)


# ---------------------------------------------------------------- the loop
@pytest.mark.parametrize("family,kw", [("gpt2", {}), ("llama", dict(n_kv_head=2))])
def test_greedy_with_and_without_cache_equals_the_naive_loop(family, kw, prompt):
    model = _model(family, **kw)
    ref = naive_greedy(model, prompt, 40)
    assert torch.equal(generate(model, prompt, 40, temperature=0), ref)
    assert torch.equal(generate(model, prompt, 40, temperature=0, use_cache=False), ref)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampling_with_and_without_cache_is_identical(family, prompt):
    model = _model(family)
    for kw in (
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=10),
        dict(temperature=1.3, top_p=0.9),
    ):
        a = generate(model, prompt, 50, seed=3, **kw)
        b = generate(model, prompt, 50, seed=3, use_cache=False, **kw)
        assert torch.equal(a, b), kw
        assert len(set(a[0, 7:].tolist())) > 5  # sampling, not a collapse into one token


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beyond_the_context_the_window_slides_identically(family):
    "Prompt + new tokens > context_length: cached and uncached agree with nanoGPT's cropping loop."
    model = _model(family, context_length=16)
    p = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(1))
    ref = naive_greedy(model, p, 30)
    assert torch.equal(generate(model, p, 30, temperature=0), ref)
    assert torch.equal(generate(model, p, 30, temperature=0, use_cache=False), ref)
    a = generate(model, p, 30, temperature=1.0, seed=0)
    assert torch.equal(a, generate(model, p, 30, temperature=1.0, seed=0, use_cache=False))


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end():
    model = _model(context_length=16)
    long = torch.randint(0, V, (2, 50), generator=torch.Generator().manual_seed(2))
    out = generate(model, long, 5, temperature=1.0, seed=1)
    assert out.shape == (2, 55) and torch.equal(out[:, :50], long)  # the whole prompt is returned
    assert torch.equal(
        out[:, 50:], generate(model, long[:, -16:], 5, temperature=1.0, seed=1)[:, 16:]
    )


def test_seed_reproducible_and_global_rng_untouched(prompt):
    model = _model()
    state = torch.get_rng_state()
    a = generate(model, prompt, 30, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(generate(model, prompt, 30, seed=11), a)
    assert not torch.equal(generate(model, prompt, 30, seed=12), a)


def test_stop_tokens():
    model = _model()
    p = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(3))
    free = generate(model, p, 60, temperature=1.0, seed=4)
    stops = free[0, 5:8].tolist()  # tokens row 0 is sure to emit early
    out = generate(model, p, 60, temperature=1.0, seed=4, stop_tokens=stops)
    assert out.shape[1] <= 65
    for row, ref in zip(out[:, 5:].tolist(), free[:, 5:].tolist()):
        hits = [i for i, t in enumerate(row) if t in stops]
        assert hits, "every row stopped"
        i = hits[0]
        assert row[: i + 1] == ref[: i + 1]  # the same text up to the stop token
        assert all(t == row[i] for t in row[i:])  # then the stop token, repeated
    # it ended when the last row stopped
    assert any(row[-2] not in stops for row in out[:, 5:].tolist())


def test_stream_yields_one_token_per_step_lazily(prompt):
    model = _model()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    it = stream(model, prompt, 100, temperature=0)
    first = next(it)
    assert first.shape == (2,) and len(calls) == 1 and calls[0] == (2, 7)  # the prompt, once
    second = next(it)
    assert len(calls) == 2 and calls[1] == (2, 1)  # then one token per step
    assert torch.equal(
        torch.stack([first, second], 1), generate(model, prompt, 2, temperature=0)[:, 7:]
    )


def test_inference_mode_inside_the_steps_not_in_the_caller(prompt):
    """`stream` runs each step in inference mode and leaves it before handing the token over;
    `generate` enters it once for the whole loop and gives the same tokens."""
    model = _model()
    modes = []
    model.register_forward_hook(lambda m, i, o: modes.append(torch.is_inference_mode_enabled()))
    got = []
    for t in stream(model, prompt, 5, temperature=0, seed=0):
        assert not torch.is_inference_mode_enabled()  # the caller's code between two steps
        got.append(t)
    assert modes == [True] * 5
    assert torch.equal(torch.stack(got, 1), generate(model, prompt, 5, temperature=0)[:, 7:])
    assert not torch.is_inference_mode_enabled()


def test_onednn_off_inside_the_model_calls_of_a_float32_cpu_model_only(prompt):
    """The model runs with oneDNN off (its GELU is slow on one token), float32 on a CPU only (bf16
    matmuls need it), and the flag is back on in the caller's code between steps."""
    assert torch.backends.mkldnn.enabled
    for dtype, inside in ((torch.float32, False), (torch.bfloat16, True)):
        model = _model().to(dtype)
        seen = []
        model.register_forward_hook(lambda m, i, o: seen.append(torch.backends.mkldnn.enabled))
        for _ in stream(model, prompt, 3, temperature=0):
            assert torch.backends.mkldnn.enabled  # the caller's code between two steps
        assert seen == [inside] * 3
    assert torch.backends.mkldnn.enabled


def test_prompt_forms_and_zero_tokens():
    model = _model()
    assert generate(model, [1, 2, 3], 4, temperature=0).shape == (1, 7)
    assert torch.equal(
        generate(model, torch.tensor([1, 2, 3]), 4, temperature=0),
        generate(model, [[1, 2, 3]], 4, temperature=0),
    )
    assert torch.equal(generate(model, [[1, 2, 3]], 0), torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(temperature=-0.5), r"temperature=-0.5: must be >= 0"),
        (dict(temperature=float("nan")), r"temperature=nan"),
        (dict(top_k=0), r"top_k=0: must be a positive integer"),
        (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
        (dict(max_new_tokens=2.5), r"max_new_tokens=2.5: must be a non-negative integer"),
    ],
)
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        generate(_model(), [1, 2], **({"max_new_tokens": 3} | kw))


def test_bad_prompts():
    with pytest.raises(
        ValueError,
        match=r"prompt: expected token ids of shape \(T,\) or \(B, T\) with T >= 1, got \(1, 0\)",
    ):
        generate(_model(), torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"got \(2,\) torch.float32"):
        generate(_model(), torch.tensor([1.0, 2.0]), 3)


# ---------------------------------------------------------------- text
class Chars:
    """A character tokenizer over a fixed alphabet (the library's CharTokenizer lives in the
    tokenizer chapter)."""

    def __init__(self, alphabet):
        self.alphabet = alphabet

    def encode(self, s):
        return [self.alphabet.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


class Bytes:
    "Byte-level: every UTF-8 byte is a token, so a character can span several tokens."

    def encode(self, s):
        return list(s.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_pieces_join_to_the_text_and_stop_before_the_stop_token():
    tok = Chars("abcdefghijklmnopqrstuvwxyz .,;:!?'\"-ABCDEFGHIJKLMN")
    assert len(tok.alphabet) == V
    model = _model()
    pieces = list(stream_text(model, tok, "it is", 40, temperature=1.0, seed=2))
    assert len(pieces) == 40 and all(len(p) == 1 for p in pieces)
    full = generate(model, tok.encode("it is"), 40, temperature=1.0, seed=2)[0, 5:].tolist()
    assert (
        "".join(pieces)
        == tok.decode(full)
        == generate_text(model, tok, "it is", 40, temperature=1.0, seed=2)
    )
    stop = full[10]
    cut = generate_text(model, tok, "it is", 40, temperature=1.0, seed=2, stop_tokens=[stop])
    assert cut == tok.decode(full[: full.index(stop)])


def test_stream_text_never_splits_a_character():
    """A model that always continues with the bytes of 'é€' (2 + 3 bytes): pieces are whole
    characters."""

    class Script(torch.nn.Module):
        config = GPTConfig(vocab_size=256, context_length=64, n_layer=1, n_head=1, n_embd=8)
        lm_head = torch.nn.Linear(8, 256, bias=False)
        seq = list("é€".encode("utf-8")) * 10

        def new_cache(self, *a, **k):
            return None

        def forward(self, idx, cache=None, last_only=False):
            logits = torch.full((idx.shape[0], 1, 256), -1e9)
            logits[:, 0, self.seq[idx.shape[1] - 1]] = 0.0  # the next scripted byte
            return logits, None

    pieces = list(stream_text(Script(), Bytes(), "a", 10, temperature=0, use_cache=False))
    assert pieces == ["é", "€", "é", "€"]
    # 9 bytes: the last character cut in two
    assert generate_text(Script(), Bytes(), "a", 9, temperature=0, use_cache=False) == "é€é\ufffd"
