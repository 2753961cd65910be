"""minillm.compute: the cost arithmetic, checked against the real model and optimizer."""

import math

import numpy as np
import pytest
import torch

from minillm.compute import (
    CHINCHILLA_FIT,
    activation_bytes,
    chinchilla_loss,
    chinchilla_tokens,
    compute_optimal,
    cost,
    fit_loss_surface,
    fit_power_law,
    gpu_hours,
    isoflop_minimum,
    measure_peak_flops,
    mfu,
    training_flops,
    training_memory,
)
from minillm.model import GPT, GPTConfig, flops_per_token, memory_bytes, n_params
from minillm.train import TrainConfig, configure_optimizer

SMALL = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32)


def test_flops_and_tokens():
    assert training_flops(175e9, 300e9) == pytest.approx(3.15e23)
    assert abs(training_flops(175e9, 300e9) / 3.14e23 - 1) < 0.005  # GPT-3's reported compute
    assert (
        chinchilla_tokens(70e9) == pytest.approx(1.4e12)
        and chinchilla_tokens(10, tokens_per_param=5) == 50
    )


def test_six_n_matches_the_count_for_a_wide_model():
    gpt3 = GPTConfig(vocab_size=50257, context_length=2048, n_layer=96, n_head=96, n_embd=12288)
    r = flops_per_token(gpt3, 2048, training=True) / training_flops(n_params(gpt3), 1)
    assert 1.0 < r < 1.04
    narrow = GPTConfig(vocab_size=1024, context_length=1024, n_layer=4, n_head=4, n_embd=64)
    # attention dominates
    assert flops_per_token(narrow, 1024, training=True) / training_flops(n_params(narrow), 1) > 2


def test_training_memory_breakdown():
    m = training_memory(1000)
    assert (m["weights"], m["gradients"], m["optimizer"], m["master"], m["total"]) == (
        4000,
        4000,
        8000,
        0,
        16000,
    )
    b = training_memory(1000, bytes_weights=2, activations=123)
    assert (b["weights"], b["master"], b["activations"], b["total"]) == (2000, 4000, 123, 16123)
    assert training_memory(1000, bytes_weights=2, master_weights=False)["total"] == 12000
    assert training_memory(1000, optimizer="sgd")["total"] == 8000
    assert training_memory(1000, optimizer="sgd-momentum")["optimizer"] == 4000
    with pytest.raises(ValueError, match="optimizer"):
        training_memory(10, optimizer="lion")
    with pytest.raises(ValueError, match="bytes_weights"):
        training_memory(10, bytes_weights=3)


def test_memory_equals_a_real_adamw_state():
    torch.manual_seed(0)
    model = GPT(SMALL)
    opt = configure_optimizer(model, TrainConfig())
    x = torch.randint(0, SMALL.vocab_size, (2, SMALL.context_length))
    model(x, x)[1].backward()
    opt.step()
    moments = sum(
        t.nbytes
        for s in opt.state_dict()["state"].values()
        for k, t in s.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    m = training_memory(n_params(SMALL))
    assert moments == m["optimizer"]
    assert (
        sum(p.grad.nbytes for p in model.parameters())
        == m["gradients"]
        == sum(p.nbytes for p in model.parameters())
    )
    assert memory_bytes(SMALL)["adamw"] == m["optimizer"]


def test_activation_bytes_measured():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (8, SMALL.context_length))
    a4, a8 = activation_bytes(model, x[:4], x[:4]), activation_bytes(model, x, x)
    assert a4 > 0 and a8 / a4 == pytest.approx(2, rel=0.02)
    # at least one C-vector per token per layer
    assert a4 > 4 * 4 * SMALL.context_length * SMALL.n_embd * SMALL.n_layer
    with torch.no_grad():
        assert activation_bytes(model, x, x) == 0  # nothing saved without autograd


def test_hours_cost_mfu():
    assert gpu_hours(3600 * 1e12, 1e12, mfu=1.0) == pytest.approx(1.0)
    assert gpu_hours(3600 * 1e12, 1e12, mfu=0.5) == pytest.approx(2.0)
    assert cost(10, 2.5) == 25
    assert mfu(1000, 1e6, 1e10) == pytest.approx(0.1)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mfu"):
            gpu_hours(1, 1, bad)


def test_measure_peak_flops_restores_threads():
    before = torch.get_num_threads()
    p = measure_peak_flops(128, threads=1, repeats=2)
    assert torch.get_num_threads() == before and math.isfinite(p) and 1e7 < p < 1e14


def test_fit_power_law_recovers_exponent():
    N = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    a, alpha = fit_power_law(N, 7.0 * N**-0.3)
    assert a == pytest.approx(7.0) and alpha == pytest.approx(0.3)
    a, alpha = fit_power_law(N, 2.0 * N**-0.1 + 1.5, c=1.5)
    assert a == pytest.approx(2.0) and alpha == pytest.approx(0.1)
    with pytest.raises(ValueError):
        fit_power_law([1.0], [1.0])
    with pytest.raises(ValueError):
        fit_power_law(N, 7.0 * N**-0.3, c=10)


def test_chinchilla_loss_and_compute_optimal():
    assert chinchilla_loss(1e60, 1e60) == pytest.approx(1.69, abs=1e-6)  # only E remains
    assert CHINCHILLA_FIT == dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    C = 1e21
    N, D = compute_optimal(C, **CHINCHILLA_FIT)
    assert 6 * N * D == pytest.approx(C)
    for f in (0.9, 1.1):  # the closed form is the minimum along 6ND = C
        assert chinchilla_loss(N * f, C / (6 * N * f)) > chinchilla_loss(N, D)
    N10, _ = compute_optimal(10 * C)
    assert N10 / N == pytest.approx(10 ** (0.28 / 0.62))  # N_opt ∝ C^(β/(α+β))
    Ne, De = compute_optimal(C, A=1.0, B=1.0, alpha=0.5, beta=0.5)
    assert Ne == pytest.approx(De)  # equal exponents and constants: N = D


def test_isoflop_minimum():
    N = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    assert isoflop_minimum(N, 2 + 0.1 * (np.log(N) - np.log(7e4)) ** 2) == pytest.approx(7e4)
    with pytest.raises(ValueError, match="curve upwards"):
        isoflop_minimum(N, -((np.log(N) - 11) ** 2))
    with pytest.raises(ValueError):
        isoflop_minimum(N[:2], [1.0, 2.0])


def test_fit_loss_surface_fits_its_own_form():
    N, D = np.meshgrid(np.geomspace(1e4, 1e6, 4), np.geomspace(1e5, 1e8, 4))
    true = dict(E=1.5, A=30.0, B=60.0, alpha=0.4, beta=0.3)
    L = chinchilla_loss(N.ravel(), D.ravel(), **true)
    fit = fit_loss_surface(N.ravel(), D.ravel(), L, steps=300)
    pred = chinchilla_loss(N.ravel(), D.ravel(), **{k: fit[k] for k in true})
    assert np.abs(pred / L - 1).max() < 1e-3 and fit["objective"] < 1e-6
    with pytest.raises(ValueError):
        fit_loss_surface([1, 2], [1, 2], [1, 2])
