"""The model: config validation, both families, counts against the real model, KV cache, Hugging
Face interop."""

import json
import math
import os
import warnings
from dataclasses import asdict

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minillm.model import GPT, GPTConfig, flops_per_token, load_hf, memory_bytes, n_params, save_hf

os.environ["HF_HUB_OFFLINE"] = "1"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SMALL = dict(vocab_size=V, context_length=32, n_layer=2, n_head=4, n_embd=32)
CONFIGS = {
    "gpt2": GPTConfig(**SMALL),
    "gpt2-nobias-untied-exact": GPTConfig(
        **SMALL, bias=False, tie_weights=False, gelu="none", mlp_hidden=40
    ),
    "llama": GPTConfig(family="llama", **SMALL),
    "llama-gqa-tied-bias": GPTConfig(
        family="llama", **SMALL, n_kv_head=2, tie_weights=True, bias=True
    ),
    "llama-mqa": GPTConfig(family="llama", **SMALL, n_kv_head=1),
}


@pytest.fixture
def idx():
    return torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(family="mistral"), r"family='mistral' is unknown: expected one of 'gpt2', 'llama'"),
        (dict(n_embd=130, n_head=4), r"n_embd=130 is not divisible by n_head=4"),
        (dict(n_embd=96, n_head=6, n_kv_head=4), r"n_head=6 is not divisible by n_kv_head=4"),
        (dict(n_embd=96, n_head=6, n_kv_head=0), r"n_head=6 is not divisible by n_kv_head=0"),
        (dict(family="llama", n_embd=36, n_head=4), r"head_dim = n_embd / n_head = 9 must be even"),
        (dict(n_layer=0), r"n_layer=0: must be a positive integer"),
        (dict(vocab_size=10.0), r"vocab_size=10.0: must be a positive integer"),
        (dict(gelu="erf"), r"gelu='erf'"),
        (dict(dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
    ],
)
def test_config_refuses_bad_shapes_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_family_defaults():
    g, l = GPTConfig(n_embd=128, n_head=4), GPTConfig(family="llama", n_embd=128, n_head=4)
    assert (g.bias, g.tie_weights, g.mlp_hidden, g.n_kv_head) == (True, True, 512, 4)
    assert (l.bias, l.tie_weights, l.mlp_hidden, l.n_kv_head) == (False, False, 384, 4)
    # explicit values win
    assert GPTConfig(family="llama", bias=True, tie_weights=True).bias is True


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_shapes_and_loss_at_init_is_ln_vocab(name, idx):
    torch.manual_seed(0)
    model = GPT(CONFIGS[name])
    # not the inputs: a tied
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, targets)  # model starts out favouring the input token itself
    assert logits.shape == (2, 13, V) and loss.shape == ()
    assert abs(loss.item() - math.log(V)) < 0.05
    assert model(idx)[1] is None
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_weight_tying_and_families():
    g, l = GPT(CONFIGS["gpt2"]), GPT(CONFIGS["llama"])
    assert g.lm_head.weight is g.wte.weight and l.lm_head.weight is not l.wte.weight
    assert (
        g.wpe is not None
        and l.wpe is None
        and hasattr(l, "rope_cos")
        and "rope_cos" not in l.state_dict()
    )
    assert isinstance(g.h[0].ln_1, torch.nn.LayerNorm) and isinstance(l.h[0].ln_1, torch.nn.RMSNorm)
    assert l.h[0].attn.c_attn.bias is None and g.h[0].attn.c_attn.bias is not None


def test_targets_minus_one_are_ignored(idx):
    model = GPT(CONFIGS["gpt2"])
    logits, loss = model(idx, idx)
    t = idx.clone()
    t[:, :5] = -1
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].flatten(0, 1), idx[:, 5:].flatten())
    torch.testing.assert_close(model(idx, t)[1], ref)


def test_causal_at_the_model_level(idx):
    model = GPT(CONFIGS["llama-gqa-tied-bias"]).eval()
    other = idx.clone()
    other[:, 8:] = (other[:, 8:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][:, :8], model(other)[0][:, :8], atol=1e-6, rtol=0)


def test_longer_than_context_is_an_error():
    model = GPT(CONFIGS["gpt2"])
    with pytest.raises(ValueError, match="33 positions exceed context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_gives_the_same_logits(name, idx):
    torch.manual_seed(0)
    model = GPT(CONFIGS[name]).eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2)
        steps = [model(idx[:, :5], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 9)]
        steps += [model(idx[:, 9:], cache=cache)[0]]
    assert cache[0].pos == 13 and len(cache) == model.config.n_layer
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_token_decode_path_matches_the_general_path(name, idx):
    """A one-token step through the cache in eval mode takes `GPT._decode`; the general path (the
    same step in training mode, dropout 0) computes the same logits."""
    torch.manual_seed(0)
    model = GPT(CONFIGS[name])
    out = {}
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            cache = model.new_cache(batch_size=2)
            model(idx[:, :7], cache=cache)
            out[training] = torch.cat([model(idx[:, t : t + 1], cache=cache)[0] for t in (7, 8)], 1)
    assert out[False].shape == (2, 2, V)
    torch.testing.assert_close(out[False], out[True], atol=1e-6, rtol=0)


def test_dropout_zero_is_skipped_and_draws_no_random_numbers(idx):
    "With dropout 0 a training-mode forward equals eval mode exactly and leaves the RNG alone."
    torch.manual_seed(0)
    model = GPT(CONFIGS["gpt2"])
    rng = torch.get_rng_state()
    loss_train = model.train()(idx, idx)[1]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(loss_train, model.eval()(idx, idx)[1])
    torch.manual_seed(0)
    dropped = GPT(GPTConfig(**SMALL, dropout=0.5)).train()
    assert not torch.equal(dropped(idx)[0], dropped(idx)[0])  # p > 0 in training: masks differ


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize("name", CONFIGS)
def test_counts_match_the_real_model(name, idx):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(cfg)
    B, T = idx.shape
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    lookup = (0 if cfg.tie_weights else cfg.vocab_size * cfg.n_embd) + (
        cfg.context_length * cfg.n_embd if cfg.family == "gpt2" else 0
    )
    assert n_params(cfg, non_embedding=True) == n_params(cfg) - lookup
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = model(idx, idx)
    assert fc.get_total_flops() == flops_per_token(cfg, T) * B * T
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss.backward()
    assert fc.get_total_flops() == 2 * flops_per_token(cfg, T) * B * T
    assert flops_per_token(cfg, T, training=True) == 3 * flops_per_token(cfg, T)
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    mem = memory_bytes(cfg, batch_size=3, T=20)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    assert (
        mem["weights"]
        == mem["gradients"]
        == nbytes(model.parameters())
        == nbytes(p.grad for p in model.parameters())
    )
    assert mem["adamw"] == nbytes(
        t for s in opt.state.values() for k, t in s.items() if k != "step"
    )
    assert mem["kv_cache"] == nbytes(t for c in model.new_cache(3, max_len=20) for t in (c.k, c.v))


def test_counts_of_published_models():
    assert n_params(GPTConfig()) == 124_439_808  # GPT-2 small
    assert n_params(GPTConfig(n_layer=24, n_head=16, n_embd=1024)) == 354_823_168  # GPT-2 medium
    llama2_7b = GPTConfig(
        family="llama",
        vocab_size=32000,
        context_length=4096,
        n_layer=32,
        n_head=32,
        n_embd=4096,
        mlp_hidden=11008,
    )
    assert n_params(llama2_7b) == 6_738_415_616
    llama3_8b = GPTConfig(
        family="llama",
        vocab_size=128256,
        context_length=8192,
        n_layer=32,
        n_head=32,
        n_embd=4096,
        n_kv_head=8,
        mlp_hidden=14336,
    )
    assert n_params(llama3_8b) == 8_030_261_248


# ---------------------------------------------------------------- Hugging Face
def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


HF_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "gpt2-gelu-n_inner": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=40,
            activation_function="gelu",
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "llama-gqa": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            max_position_embeddings=32,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "llama-tied-bias": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            max_position_embeddings=32,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name, make in HF_MODELS.items():
        torch.manual_seed(0)
        model = _perturbed(make())
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


@pytest.mark.parametrize("name", HF_MODELS)
def test_load_hf_matches_transformers_and_round_trips(name, hf_dirs, idx, tmp_path):
    hf, d = hf_dirs[name]
    ours = load_hf(d).eval()
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], ref, atol=1e-4, rtol=0)
        save_hf(ours, tmp_path / "back")
        back = type(hf).from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(back(idx).logits, ref, atol=1e-4, rtol=0)
    again = load_hf(tmp_path / "back")
    assert again.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["gpt2-nobias-untied-exact", "llama-mqa", "llama-gqa-tied-bias"])
def test_save_hf_of_our_models_loads_in_transformers(name, idx, tmp_path):
    torch.manual_seed(0)
    ours = GPT(CONFIGS[name]).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    save_hf(ours, tmp_path)
    cls = GPT2LMHeadModel if ours.config.family == "gpt2" else LlamaForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


def test_save_hf_refuses_gqa_in_gpt2_format(tmp_path):
    with pytest.raises(ValueError, match="GPT-2's format has no grouped-query attention"):
        save_hf(GPT(GPTConfig(**SMALL, n_kv_head=2)), tmp_path)


def test_load_hf_gpt2_saved_without_prefix_and_sharded(hf_dirs, idx, tmp_path):
    """The original GPT-2 files name tensors without `transformer.` (saved from GPT2Model); large
    models come in shards."""
    from safetensors.torch import load_file, save_file

    hf, d = hf_dirs["gpt2"]
    tensors = load_file(d / "model.safetensors")
    (tmp_path / "plain").mkdir()
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()},
        tmp_path / "plain" / "model.safetensors",
    )
    (tmp_path / "plain" / "config.json").write_text((d / "config.json").read_text())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        for sub in ("plain", "sharded"):
            torch.testing.assert_close(
                load_hf(tmp_path / sub).eval()(idx)[0], hf(idx).logits, atol=1e-4, rtol=0
            )


def test_load_hf_dtype(hf_dirs):
    m = load_hf(hf_dirs["llama-gqa"][1], dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16 and m.rope_cos.dtype == torch.bfloat16


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_hf_spends_no_random_init_and_keeps_ties(name, dtype, hf_dirs):
    """Built on the meta device, the file's tensors assigned: the global RNG is untouched, tied
    weights are one Parameter."""
    state = torch.get_rng_state()
    m = load_hf(hf_dirs[name][1], dtype=dtype)
    assert torch.equal(torch.get_rng_state(), state)  # no random initialisation drew from it
    cfg = m.config
    assert (m.lm_head.weight is m.wte.weight) == cfg.tie_weights
    assert sum(p.numel() for p in m.parameters()) == n_params(cfg)  # a tied embedding counted once
    tensors = [*m.parameters(), *m.buffers()]
    assert not any(t.is_meta for t in tensors) and all(t.dtype == dtype for t in tensors)
    assert all(p.requires_grad and p.is_contiguous() for p in m.parameters())
    # computed, not loaded: the same tables as a model built the ordinary way
    if cfg.family == "llama":
        ref = GPT(cfg).to(dtype)
        assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)


def _edit(src, dst, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    t = load_file(src / "model.safetensors")
    save_file(tensors(t) if tensors else t, dst / "model.safetensors")
    return dst


def test_load_hf_errors_name_the_tensor_and_both_shapes(hf_dirs, tmp_path):
    _, d = hf_dirs["llama-gqa"]
    bad = _edit(d, tmp_path / "heads", config=lambda c: c | {"num_key_value_heads": 4})
    with pytest.raises(
        ValueError,
        match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\), "
        r"but config.json's model needs \(32, 32\)",
    ):
        load_hf(bad)
    missing = _edit(
        d,
        tmp_path / "missing",
        tensors=lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k},
    )
    with pytest.raises(
        ValueError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'.*shape \(48, 32\)"
    ):
        load_hf(missing)
    extra = _edit(
        d,
        tmp_path / "extra",
        tensors=lambda t: t | {"model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)},
    )
    with pytest.raises(ValueError, match=r"no place for: model.layers.2.mlp.up_proj.weight"):
        load_hf(extra)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c | {"model_type": "mistral"}, r"model_type='mistral' is not supported"),
        (
            lambda c: c | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
            r"rope_type='llama3' is not supported",
        ),
        (lambda c: c | {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        (lambda c: c | {"attention_bias": True}, r"mlp_bias=False is not supported"),
    ],
)
def test_load_hf_refuses_what_it_cannot_represent(hf_dirs, tmp_path, edit, message):
    bad = _edit(hf_dirs["llama-gqa"][1], tmp_path / "bad", config=edit)
    with pytest.raises(ValueError, match=message):
        load_hf(bad)


def test_own_checkpoint_of_another_shape_is_refused_naming_what_differs(tmp_path):
    """Our checkpoint loader (`minillm.train.load_checkpoint`, which the chapter uses) refuses a
    checkpoint of another model before loading anything: by its config when the checkpoint records
    one, else by the first tensor whose shape differs, with both shapes."""
    from minillm.train import load_checkpoint, save_checkpoint

    src, other = GPT(CONFIGS["gpt2"]), GPT(GPTConfig(**SMALL | {"n_embd": 64}))
    opt = torch.optim.AdamW(src.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    save_checkpoint(tmp_path / "a", src, opt, {"step": 0, "model_config": asdict(src.config)})
    with pytest.raises(ValueError, match=r"checkpoint of another model; differs in n_embd=32 "):
        load_checkpoint(tmp_path / "a", other)
    save_checkpoint(tmp_path / "b", src, opt, {"step": 0})  # no config recorded: shapes decide
    with pytest.raises(ValueError, match=r"tensor \S+ has shape \(96,\), the model's is \(192,\)"):
        load_checkpoint(tmp_path / "b", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
