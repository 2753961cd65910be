"""The training loop: exact resume after a kill, NaN handling, checkpoint validation, the schedule,
the optimizer, bits per character, the pretraining tokens, and the `minillm` command line."""

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import minillm.train
from minillm.data import SEPARATOR, CorpusUnavailable, load_corpus, train_val_split
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import ENDOFTEXT, CharTokenizer
from minillm.train import (
    TrainConfig,
    TrainingDiverged,
    _restore_rng_states,
    _rng_states,
    bits_per_char,
    configure_optimizer,
    evaluate_bpc,
    evaluating,
    find_checkpoint,
    load_checkpoint,
    lr_at,
    pretraining_tokens,
    run_dir,
    save_checkpoint,
    train,
)

TINY = dict(
    family="gpt2", vocab_size=64, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1
)
TOKENS = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def cfg(**kw):
    return TrainConfig(
        **{
            **dict(
                batch_size=4,
                context_length=32,
                max_steps=200,
                warmup_steps=10,
                eval_interval=50,
                eval_batches=2,
                checkpoint_interval=100,
            ),
            **kw,
        }
    )


RUN = textwrap.dedent("""
    import os, signal, sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_train import TOKENS, cfg, tiny_model
    from minillm.train import train
    torch.set_num_threads(1)
    def kill(step, record):
        if step == 150: os.kill(os.getpid(), signal.SIGKILL)  # no clean-up: as a power cut
    train(tiny_model(), TOKENS[:15000], TOKENS[15000:], cfg(), {out!r},
          on_eval=kill, progress=False)
""")


def test_resume_after_kill_is_bit_identical(tmp_path):
    """200 steps straight == killed at step 150 (last checkpoint: 100), resumed: the same final loss
    and weights to the last bit."""
    torch.set_num_threads(1)
    straight = tiny_model()
    h1 = train(straight, TOKENS[:15000], TOKENS[15000:], cfg(), progress=False)
    r = subprocess.run(
        [sys.executable, "-c", RUN.format(tests=str(Path(__file__).parent), out=str(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert r.returncode == -9, r.stderr  # killed, as intended
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 100
    # different initial weights: the checkpoint must overwrite all of them
    resumed = tiny_model(seed=99)
    h2 = train(resumed, TOKENS[:15000], TOKENS[15000:], cfg(), tmp_path, progress=False)
    assert h1[-1]["val_loss"] == h2[-1]["val_loss"] and h1[-1]["train_loss"] == h2[-1]["train_loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(straight.state_dict().values(), resumed.state_dict().values())
    )
    assert [r["step"] for r in h2] == [50, 100, 150, 200]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(x, y=None, **kw):  # the 130th training forward pass returns NaN
        logits, loss = forward(x, y, **kw)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 130:
                loss = loss * float("nan")
        return logits, loss

    model.forward = poisoned
    with pytest.raises(
        TrainingDiverged, match=r"loss is nan at step 129 .*last good checkpoint is .*ckpt"
    ):
        train(model, TOKENS[:15000], TOKENS[15000:], cfg(), tmp_path, progress=False)
    state = json.loads((find_checkpoint(tmp_path / "ckpt") / "state.json").read_text())
    assert state["step"] == 100
    fresh = tiny_model(seed=5)
    load_checkpoint(tmp_path / "ckpt", fresh)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_checkpoint_of_another_model_says_what_differs(tmp_path):
    model = tiny_model()
    save_checkpoint(
        tmp_path / "ck",
        model,
        configure_optimizer(model, cfg()),
        {"model_config": asdict(model.config)},
    )
    with pytest.raises(ValueError, match=r"n_embd=32 \(model has 48\)"):
        load_checkpoint(tmp_path / "ck", tiny_model(n_embd=48))


def test_checkpoint_shape_mismatch_names_tensor(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, configure_optimizer(model, cfg()), {})
    with pytest.raises(
        ValueError,
        match=r"tensor (wte|lm_head).weight has shape \(64, 32\), the model's is \(80, 32\)",
    ):
        load_checkpoint(tmp_path / "ck", tiny_model(vocab_size=80))


def test_corrupt_checkpoint_refused_with_path(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, configure_optimizer(model, cfg()), {})
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"ck: corrupt checkpoint"):
        load_checkpoint(tmp_path / "ck", tiny_model())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", tiny_model())


def test_interrupted_save_falls_back_to_previous(tmp_path):
    """A crash between the two renames of a save leaves the old checkpoint at ck-prev; it is found
    and used."""
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, configure_optimizer(model, cfg()), {"step": 7})
    os.replace(tmp_path / "ck", tmp_path / "ck-prev")
    state, _ = load_checkpoint(tmp_path / "ck", tiny_model(seed=3))
    assert state["step"] == 7


def test_resume_with_other_config_refused(tmp_path):
    train(
        tiny_model(),
        TOKENS[:15000],
        TOKENS[15000:],
        cfg(max_steps=20, checkpoint_interval=10),
        tmp_path,
        progress=False,
    )
    with pytest.raises(
        ValueError, match=r"cannot resume with another training config \(changed: \{'lr'"
    ):
        train(
            tiny_model(),
            TOKENS[:15000],
            TOKENS[15000:],
            cfg(max_steps=20, checkpoint_interval=10, lr=1e-2),
            tmp_path,
            progress=False,
        )


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(batch_size=0), "batch_size=0"),
        (dict(lr=1e-4, min_lr=1e-3), "min_lr"),
        (dict(dtype="fp16"), "dtype='fp16'"),
        (dict(grad_clip=-1), "grad_clip=-1"),
    ],
)
def test_bad_train_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_schedule():
    c = TrainConfig(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1)
    assert lr_at(0, c) == 0.01 and lr_at(99, c) == 1.0
    # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(550, c) == pytest.approx(0.55)
    assert lr_at(1000, c) == pytest.approx(0.1) and lr_at(5000, c) == pytest.approx(0.1)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(100, 1000))


def test_configure_optimizer_decays_the_matrices_only():
    """Our choices, not AdamW's arithmetic: weight decay on every matrix (linear and embedding
    weights, the tied output matrix once) and on no bias or norm gain; every trainable parameter in
    exactly one group, a frozen one in none; the config's lr, betas and decay; one fused kernel."""
    for family in ("gpt2", "llama"):
        m = tiny_model(dropout=0.0, family=family)
        frozen = next(p for n, p in m.named_parameters() if n.endswith("c_proj.weight"))
        frozen.requires_grad_(False)
        c = cfg(weight_decay=0.05, beta2=0.95)
        opt = configure_optimizer(m, c)
        name = {id(p): n for n, p in m.named_parameters()}
        groups = {g["weight_decay"]: [name[id(p)] for p in g["params"]] for g in opt.param_groups}
        assert set(groups) == {0.05, 0.0}
        decayed, plain = groups[0.05], groups[0.0]
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert sorted(decayed + plain) == sorted(trainable)  # each once; the frozen one absent
        assert name[id(frozen)] not in decayed + plain
        assert "wte.weight" in decayed and all("ln_" not in n for n in decayed)
        assert plain and all(n.endswith("bias") or "ln_" in n for n in plain)  # biases, gains
        if family == "gpt2":  # the output matrix is the embedding's: one parameter, decayed once
            assert m.lm_head.weight is m.wte.weight and decayed.count("wte.weight") == 1
        else:
            assert "lm_head.weight" in decayed
        assert all(g["lr"] == c.lr and g["betas"] == (c.beta1, 0.95) for g in opt.param_groups)
        assert opt.defaults["fused"]  # CPU parameters: one fused kernel for all of them


def test_bits_per_char_and_evaluate_bpc():
    assert bits_per_char(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_char(math.log(2), 10, 20) == pytest.approx(0.5)

    class Chars:  # a stand-in tokenizer: one token per character
        def encode(self, s):
            return [ord(ch) % 64 for ch in s]

    model = tiny_model(dropout=0.0).eval()
    text = "".join(chr(65 + int(t) % 26) for t in TOKENS[:100])
    r = evaluate_bpc(model, Chars(), text, batch_size=2)
    ids = torch.tensor(Chars().encode(text))
    with torch.no_grad():  # the same, by hand: windows of 32 with their next tokens
        nll = sum(
            torch.nn.functional.cross_entropy(
                model(ids[None, s : s + 32][:, : len(ids) - 1 - s])[0][0],
                ids[s + 1 : s + 33],
                reduction="sum",
            ).item()
            for s in range(0, 99, 32)
        )
    assert r["tokens"] == 99 and r["loss"] == pytest.approx(nll / 99, rel=1e-5)
    # bits per *character*
    assert r["bits_per_char"] == pytest.approx(nll / len(text) / math.log(2), rel=1e-5)


# ---- the command line


def cli(*args, env=None):
    return subprocess.run(
        [Path(sys.executable).parent / "minillm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_help_and_bad_options():
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "austen-tiny" in r.stdout
    r = cli("train", "--help")
    assert r.returncode == 0 and "--max-steps" in r.stdout and "peak learning rate" in r.stdout
    r = cli("train", "--preset", "austen-huge")
    assert r.returncode in (1, 2) and "austen-huge" in r.stderr  # refused, naming it
    r = cli("train", "--max-steps", "many")
    assert r.returncode == 2 and "--max-steps" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_cli_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text('{"max_steps": 100, "learning_rate": 0.1}')
    r = cli("train", "--config", str(bad))
    assert r.returncode == 1 and f"{bad}: unknown setting(s) learning_rate" in r.stderr
    bad.write_text('{"max_steps": ')
    r = cli("train", "--config", str(bad))
    assert r.returncode == 1 and f"{bad}: not valid JSON" in r.stderr
    bad.write_text('{"lr": "0.001"}')
    r = cli("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and f"{bad}: lr='0.001'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_config_file_and_options_follow_the_same_rules(tmp_path):
    "A low `lr` in a file is accepted as it is on the command line: min_lr follows it (lr / 10)."
    good = tmp_path / "run.json"
    good.write_text('{"lr": 0.0001, "max_steps": 1, "eval_interval": 1}')
    r = cli("train", "--config", str(good), "--out", str(tmp_path / "a"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--lr", "0.0001", "--max-steps", "1", "--out", str(tmp_path / "b"), "--quiet")
    assert r.returncode == 0, r.stderr


def test_cli_train_resume_and_sample(tmp_path):
    """A real (very short) run of the austen-tiny recipe; then sampling from it; then a resume that
    does nothing more."""
    first = cli("train", "--out", str(tmp_path / "run"), "--max-steps", "6", "--quiet")
    assert first.returncode == 0, first.stderr
    assert "bits/char" in first.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 6 and metrics["final"]["bits_per_char"] > 2
    r = cli(
        "sample",
        "--run",
        str(tmp_path / "run"),
        "--prompt",
        "Emma",
        "--max-new-tokens",
        "5",
        "--seed",
        "0",
    )
    assert r.returncode == 0 and r.stdout.startswith("Emma"), r.stderr
    r2 = cli("train", "--out", str(tmp_path / "run"), "--max-steps", "6", "--quiet")
    # resumed at its end: the same model, the same numbers
    assert r2.returncode == 0 and r2.stdout == first.stdout
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] == metrics["history"]
    )


def test_rng_states_hold_every_gpu_and_old_checkpoints_still_load(monkeypatch):
    """On a GPU dropout draws from the CUDA generators: their states are saved (one per device) and
    restored; a checkpoint without them (from a CPU, or an older version) restores the rest."""
    gen = torch.Generator().manual_seed(0)
    fake = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append(state))
    states = _rng_states(gen)
    assert sorted(k for k in states if k.startswith("rng.cuda.")) == ["rng.cuda.0", "rng.cuda.1"]
    _restore_rng_states(gen, states)
    assert [t.tolist() for t in restored] == [[1, 2], [3, 4]]
    restored.clear()
    old = {k: v for k, v in states.items() if not k.startswith("rng.cuda.")}
    expected = torch.Generator().manual_seed(0).get_state()
    gen.manual_seed(1)
    _restore_rng_states(gen, old)
    assert restored == [] and torch.equal(gen.get_state(), expected)


# ---- settings, run directories, corrupt checkpoints, and what the loop says


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(lr="0.001"), "lr='0.001': expected a number"),
        (dict(max_steps=10.0), "max_steps=10.0: expected an integer"),
        (dict(max_steps=True), "max_steps=True: expected an integer"),
        (dict(dtype=16), "dtype=16: expected a string"),
    ],
)
def test_train_config_types_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_one_validation_for_files_options_and_python(tmp_path):
    """`train_config` is the one path from settings to a `TrainConfig`: errors name the source and
    the key in one line, and an lr override without min_lr is accepted the same way everywhere."""
    from minillm.train import get_preset, train_config, train_run

    base = get_preset("austen-tiny").train
    with pytest.raises(ValueError, match=r"^run\.json: lr='0\.001': expected a number$"):
        train_config({"lr": "0.001"}, base, source="run.json")
    with pytest.raises(ValueError, match=r"^run\.json: unknown setting\(s\) learning_rate"):
        train_config({"learning_rate": 0.1}, base, source="run.json")
    c = train_config({"lr": 0.0001}, base)  # a config file's lr, as the --lr option: accepted
    assert c.lr == 0.0001 and c.min_lr == pytest.approx(1e-5)
    assert train_config({"lr": 1e-4, "min_lr": 5e-5}, base).min_lr == 5e-5
    with pytest.raises(ValueError, match="need 0 < min_lr ≤ lr"):
        train_config({"lr": 1e-4, "min_lr": 1e-3}, base)
    assert train_config({}, base) == TrainConfig(**base)  # no overrides: the preset, unchanged
    with pytest.raises(ValueError, match="lr='0.001': expected a number"):
        train_run("austen-tiny", tmp_path / "run", lr="0.001")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_corrupt_state_json_names_the_file(tmp_path):
    from minillm.train import load_run, read_state

    model = tiny_model()
    ck = tmp_path / "run" / "ckpt"
    save_checkpoint(ck, model, configure_optimizer(model, cfg()), {"step": 1})
    (ck / "state.json").write_text('{"step": 1, ')
    for call in (
        lambda: load_checkpoint(ck, model),
        lambda: load_run(tmp_path / "run"),
        lambda: train(model, TOKENS[:15000], TOKENS[15000:], cfg(), tmp_path / "run"),
    ):
        with pytest.raises(ValueError, match=rf"^{ck / 'state.json'}: corrupt checkpoint state"):
            call()
    (ck / "state.json").write_text('{"step": 1, "param_groups": []}')
    with pytest.raises(ValueError, match=r"state\.json: corrupt checkpoint state \(missing sec"):
        read_state(ck)
    with pytest.raises(
        ValueError, match=r"state\.json: corrupt checkpoint state \(missing model_c"
    ):
        load_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"state\.json: corrupt checkpoint state \(missing sec"):
        train(model, TOKENS[:15000], TOKENS[15000:], cfg(), tmp_path / "run")


def test_resume_says_where_it_starts(tmp_path, capsys):
    torch.set_num_threads(1)
    c = cfg(max_steps=4, checkpoint_interval=2, eval_interval=2)
    train(tiny_model(), TOKENS[:15000], TOKENS[15000:], c, tmp_path, progress=False, stop_at=2)
    assert "resuming" not in capsys.readouterr().err
    h = train(tiny_model(), TOKENS[:15000], TOKENS[15000:], c, tmp_path, progress=False)
    assert "resuming from step 2 of 4" in capsys.readouterr().err
    assert [r["step"] for r in h] == [2, 4]


def test_waiting_for_the_run_lock_says_so(tmp_path, capsys):
    import fcntl
    import threading
    import time

    from minillm.train import run_lock

    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another training process holds the run
        done = []
        t = threading.Thread(target=lambda: done.append(run_lock(lock).__enter__()))
        t.start()
        time.sleep(0.3)
        assert not done  # still waiting
        fcntl.flock(held, fcntl.LOCK_UN)
        t.join(5)
    assert done and f"waiting for another process that is training in {lock.parent}" in (
        capsys.readouterr().err
    )


def test_pretrained_progress_by_default_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    """The progress bar only on a terminal; the one line saying that it trains, always (a notebook
    or a log must not sit silent for minutes)."""
    import minillm.train as T

    calls = []
    monkeypatch.setattr(T, "run_dir", lambda preset, device: tmp_path / preset)
    monkeypatch.setattr(T, "check_run", lambda out, preset: False)  # tested below
    threads = []  # on a CPU, one thread: the weights must not depend on the core count
    monkeypatch.setattr(
        T,
        "train_run",
        lambda preset, out, device, progress: (
            calls.append(progress),
            threads.append(torch.get_num_threads()),
        ),
    )
    before = torch.get_num_threads()
    monkeypatch.setattr(T, "load_run", lambda out, device: "loaded")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert T.pretrained("austen-tiny") == "loaded" and calls == [False]
    assert capsys.readouterr().err.startswith("pretrained: training austen-tiny once, into ")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    T.pretrained("austen-tiny")
    assert calls == [False, True]
    assert "pretrained: training austen-tiny once" in capsys.readouterr().err
    T.pretrained("austen-tiny", progress=False)
    assert calls == [False, True, False]
    assert "pretrained: training austen-tiny once" in capsys.readouterr().err
    (tmp_path / "austen-tiny" / "ckpt").mkdir(parents=True)
    monkeypatch.setattr(T, "find_checkpoint", lambda path: path)
    (tmp_path / "austen-tiny" / "metrics.json").write_text("{}")
    assert T.pretrained("austen-tiny") == "loaded" and calls == [False, True, False]
    assert capsys.readouterr().err == ""  # a finished run loads without a word
    assert threads == [1, 1, 1] and torch.get_num_threads() == before  # and restored


def test_another_preset_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A run of austen-tiny, then `train_run('austen-15m')` into it: refused, naming what differs,
    and its tokenizer, checkpoint and metrics are untouched. `pretrained` refuses it too: a run of
    other settings where it looks is never loaded as the preset."""
    import minillm.train as T
    from minillm.train import check_run, get_preset, train_run

    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert check_run(run, "austen-tiny", max_steps=2) is False  # nothing there yet
    train_run("austen-tiny", run, progress=False, max_steps=2, eval_batches=1)
    assert check_run(run, "austen-tiny", max_steps=2, eval_batches=1) is True
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ValueError, match="holds a run of preset 'austen-tiny', not 'austen-15m'"):
        check_run(run, "austen-15m")
    with pytest.raises(ValueError, match="holds a run of preset 'austen-tiny', not 'austen-15m'"):
        train_run("austen-15m", run, progress=False, max_steps=2)
    p = get_preset("austen-tiny")
    other = type(p)(p.about, p.tokenizer, {**p.model, "n_layer": 2}, p.train)
    with pytest.raises(ValueError, match=r"another model; n_layer=4 \(the preset has 2\)"):
        train_run(other, run, progress=False, max_steps=2, eval_batches=1)
    with pytest.raises(ValueError, match="cannot resume with another training config"):
        train_run("austen-tiny", run, progress=False, max_steps=3, eval_batches=1)
    monkeypatch.setattr(T, "run_dir", lambda preset, device: run)
    with pytest.raises(ValueError, match=r"another training config \(changed: \{'max_steps'"):
        T.pretrained("austen-tiny")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_run_of_other_settings_has_a_directory_of_its_own():
    """`minillm train --max-steps ...` or a run on a GPU never lands where `pretrained` loads from:
    the overrides that change the training, and a device other than the CPU, are in the key."""
    from minillm.train import get_preset

    base, batch = run_dir("austen-tiny"), get_preset("austen-tiny").train["batch_size"]
    assert run_dir("austen-tiny", "cpu", batch_size=batch, dtype="float32") == base  # its own
    assert run_dir("austen-tiny", "cpu", max_steps=50) not in (base, run_dir("austen-tiny", lr=1))
    assert run_dir("austen-tiny", "cuda") != base
    assert run_dir("austen-tiny", "cuda:1") == run_dir("austen-tiny", "cuda")


def test_cli_train_of_the_preset_as_it_is_trains_as_pretrained(tmp_path, monkeypatch, capsys):
    """`minillm train` with no overrides writes where `pretrained()` loads, on one thread as it
    trains; with an override, into a directory of its own, on all the threads."""
    import minillm.cli as C
    import minillm.train as T

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    seen = []

    def fake_train_run(preset, out, device, **kw):
        seen.append((Path(out), torch.get_num_threads()))
        final = {"loss": 1.0, "perplexity": 2.7, "bits_per_char": 1.0}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps({"final": final}))

    monkeypatch.setattr(T, "train_run", fake_train_run)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        C.train(quiet=True)
        C.train(max_steps=7, quiet=True)
        assert seen == [(run_dir("austen-tiny"), 1), (run_dir("austen-tiny", max_steps=7), 2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_config_file_not_utf8_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_bytes(b'\xff\xfe{"lr": 0.001}')
    r = cli("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"{bad}: not UTF-8 text (invalid start byte at byte 0)")
    assert not (tmp_path / "run").exists()


def test_cli_config_value_of_the_wrong_type_is_one_line(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text('{"lr": "0.001"}')
    r = cli("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "lr='0.001': expected a number" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-3)])
def test_compiled_training_step_gives_the_same_losses(capsys, dtype, tol):
    """`train(compile=True)`: the same losses as eager training, within 1e-4 in float32 and 1e-3 in
    bf16 (set from the measured differences), and the compile time is reported."""
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (none found)")
    torch.set_num_threads(1)
    c = cfg(
        max_steps=3, warmup_steps=1, eval_interval=1, checkpoint_interval=3, eval_batches=1,
        dtype=dtype,
    )  # fmt: skip
    runs = []
    for compile in (False, True):
        torch._dynamo.reset()
        model = tiny_model(dropout=0.0)  # compiled dropout draws other random numbers
        h = train(model, TOKENS[:15000], TOKENS[15000:], c, progress=False, compile=compile)
        runs.append(h)
    eager, compiled = runs
    for a, b in zip(eager, compiled, strict=True):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=tol), (a, b)
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=tol), (a, b)
    assert "compile_seconds" not in eager[0] and compiled[0]["compile_seconds"] > 0
    assert "torch.compile: first training step" in capsys.readouterr().err


def test_pretraining_tokens_put_the_end_token_between_the_novels(monkeypatch):
    """The training tokens are the training text with `<|endoftext|>` in place of the separator
    between two novels (5 of them); the validation text, inside Persuasion, is encoded as it is."""
    try:
        train_text, val_text = train_val_split(load_corpus())
    except CorpusUnavailable as e:
        pytest.skip(f"corpus not available: {e}")
    tok = CharTokenizer().train(train_text + val_text)  # fast, and it has the end token
    eot = tok.special_tokens[ENDOFTEXT]
    ids, val = pretraining_tokens(tok, "train"), pretraining_tokens(tok, "val")
    assert (ids == eot).sum() == 5 and (val == eot).sum() == 0
    assert tok.decode(ids.tolist()).replace(ENDOFTEXT, SEPARATOR) == train_text
    assert val.tolist() == tok.encode(val_text)
    assert len(ids) == len(train_text) - 5 * len(SEPARATOR) + 5  # one token per char, 5 ends
    with pytest.raises(ValueError, match="split"):
        pretraining_tokens(tok, "test")
    with pytest.raises(ValueError, match="endoftext"):
        pretraining_tokens(CharTokenizer().train(train_text, special_tokens=()), "train")
    # other training data, another run directory: a cached model of the old data is not reused
    before = run_dir("austen-tiny")
    monkeypatch.setattr(minillm.train, "DATA_VERSION", minillm.train.DATA_VERSION + 1)
    assert run_dir("austen-tiny") != before


def test_run_dir_follows_the_recipe_not_its_description(monkeypatch):
    """Rewording a preset's `about` keeps its cached run; changing what it trains does not."""
    import dataclasses

    import minillm.train

    before = run_dir("austen-tiny")
    p = minillm.train.PRESETS["austen-tiny"]
    presets = dict(minillm.train.PRESETS)
    monkeypatch.setattr(minillm.train, "PRESETS", presets)
    presets["austen-tiny"] = dataclasses.replace(p, about="reworded")
    assert run_dir("austen-tiny") == before
    presets["austen-tiny"] = dataclasses.replace(p, train={**p.train, "lr": p.train["lr"] / 2})
    assert run_dir("austen-tiny") != before


def test_austen_budget_is_austen_tiny_with_the_sweeps_two_changes():
    """The preset `austen-budget` is the winner of the equal-compute sweep of chapter 9
    (`benchmarks/quality_sweep.py`): austen-tiny with BPE-2048 and batch 8, nothing else changed."""
    from minillm.train import PRESETS, get_preset

    tiny, budget = PRESETS["austen-tiny"], get_preset("austen-budget")
    assert budget.tokenizer == {**tiny.tokenizer, "vocab_size": 2048}
    assert budget.model == tiny.model and budget.train == {**tiny.train, "batch_size": 8}
    assert "quality per compute" in budget.about and "sweep" in budget.about
    assert run_dir("austen-budget") != run_dir("austen-tiny")
    sweep = Path(__file__).parents[1] / "nbs" / "results" / "quality_sweep.json"
    (won,) = [r for r in json.loads(sweep.read_text())["runs"] if r["name"] == "BPE-2048 + batch 8"]
    assert (won["tokenizer"], won["model"]) == (budget.tokenizer, budget.model)
    assert won["train"] == {k: v for k, v in budget.train.items() if k != "max_steps"}


def test_hardware_says_thread_or_threads(monkeypatch):
    "One thread is '1 thread', not '1 threads'."
    from minillm.train import hardware

    for n, words in ((1, ", 1 thread"), (2, ", 2 threads")):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        assert hardware("cpu").endswith(words)


def test_evaluating_restores_the_mode_and_turns_off_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with evaluating(model) as device:
        assert not model.training and not model[1].training and not torch.is_grad_enabled()
        assert device.type == "cpu"
    assert model.training and model[1].training and torch.is_grad_enabled()
    model.eval()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("inside")
    assert not model.training and torch.is_grad_enabled()
