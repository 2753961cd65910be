"""Data parallelism: 2 ranks x batch B take the same step as 1 process x batch 2B; each rank draws
its own, reproducible batches; `train` (the one loop, data-parallel in a process group) keeps the
ranks identical, writes a checkpoint and resumes from it to the bit. Two processes on 127.0.0.1
(gloo)."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from minillm.distributed import (
    ddp_run,
    ddp_train,
    main,
    rank_generator,
    run_local,
    setup,
    shard,
    unwrap,
    world,
    wrap_ddp,
)
from minillm.embeddings import random_batch
from minillm.model import GPT, GPTConfig
from minillm.train import (
    TrainConfig,
    TrainingDiverged,
    configure_optimizer,
    load_checkpoint,
    train,
    train_step,
)

TINY = dict(family="gpt2", vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32)
TOKENS = np.random.default_rng(0).integers(0, 64, 5_000).astype(np.uint16)


X, Y = random_batch(TOKENS, 8, 16, torch.Generator().manual_seed(0))  # (2B, T) each
STEP_CFG = dict(batch_size=4, context_length=16, lr=1e-3, warmup_steps=0, max_steps=10)


def one_step(rank, world_size, model_config, train_config, x, y):
    """One DDP `train_step` of a fresh model (seed 0) on this rank's rows of the batch `x, y`; with
    world_size 1 and no process group, plain training on all of it."""
    cfg = TrainConfig(**train_config)
    torch.manual_seed(0)
    model = wrap_ddp(GPT(GPTConfig(**model_config)))
    optimizer = configure_optimizer(model, cfg)
    xs, ys = shard(x, rank, world_size), shard(y, rank, world_size)  # (B, T) each
    losses = [train_step(model, optimizer, [(xs, ys)], cfg, 0)]
    return {"weights": dict(unwrap(model).state_dict()), "losses": losses}


def _train_worker(rank, world_size, out_dir):
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = GPT(GPTConfig(**TINY))
    cfg = TrainConfig(
        batch_size=4,
        context_length=16,
        grad_accum=2,
        max_steps=4,
        warmup_steps=1,
        eval_interval=2,
        eval_batches=2,
    )
    history = train(model, TOKENS[:4000], TOKENS[4000:], cfg, out_dir, progress=False)
    return {
        "weights": dict(model.state_dict()),
        "history": [r["val_loss"] for r in history],
        "steps": [r["step"] for r in history],
        "tokens": [r["tokens"] for r in history],
    }


RESUME_MODEL = {**TINY, "dropout": 0.1}  # dropout: the torch RNG's state must be restored too
RESUME_CFG = dict(
    batch_size=4,
    context_length=16,
    grad_accum=2,
    max_steps=6,
    warmup_steps=1,
    eval_interval=2,
    eval_batches=2,
    checkpoint_interval=4,
)


def _dropout_masks(rank, world_size):
    """One step of `train` in a process group, with dropout 0.5: the positions the first dropout
    layer zeroed in this rank's first training forward pass."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "dropout": 0.5}))
    drop = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    masks = []
    drop.register_forward_hook(lambda m, i, o: masks.append(o == 0) if m.training else None)
    cfg = TrainConfig(batch_size=4, context_length=16, max_steps=1, warmup_steps=0, eval_batches=1)
    train(model, TOKENS[:4000], TOKENS[4000:], cfg, progress=False)
    return masks[0]


def _diverge(rank, world_size):
    """Rank 1's loss becomes NaN in its third step: both ranks must stop at that step with
    `TrainingDiverged` (none may wait for the other at a collective that never comes)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    forward, calls = model.forward, []

    def poisoned(x, y=None, **kw):
        logits, loss = forward(x, y, **kw)
        if model.training and rank == 1:
            calls.append(1)
            if len(calls) == 3:
                loss = loss * float("nan")
        return logits, loss

    model.forward = poisoned
    cfg = TrainConfig(batch_size=4, context_length=16, max_steps=10, warmup_steps=1)
    try:
        train(model, TOKENS[:4000], TOKENS[4000:], cfg, progress=False)
    except TrainingDiverged as e:
        return str(e)
    return "no error"


def _worker(rank, world_size, out_dir, resume_dir):
    """All experiments that need no restart in one pair of processes (starting processes is the slow
    part)."""
    return {
        "step": one_step(rank, world_size, TINY, STEP_CFG, X, Y),
        "train": _train_worker(rank, world_size, out_dir),
        "straight": ddp_run(
            rank, world_size, RESUME_MODEL, RESUME_CFG, TOKENS[:4000], TOKENS[4000:]
        ),
        "masks": _dropout_masks(rank, world_size),
        "diverged": _diverge(rank, world_size),
        "stopped": ddp_run(
            rank, world_size, RESUME_MODEL, RESUME_CFG, TOKENS[:4000], TOKENS[4000:], resume_dir, 3
        ),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out, resume = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("resume")
    return run_local(_worker, 2, str(out), str(resume)), out, resume


def test_two_ranks_equal_one_process_with_twice_the_batch(ranks):
    torch.set_num_threads(1)
    two = [r["step"] for r in ranks[0]]
    one = one_step(0, 1, TINY, STEP_CFG, X, Y)
    assert one["weights"].keys() == two[0]["weights"].keys()
    diff = max(
        (two[0]["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"]
    )
    assert diff < 1e-6
    assert any(
        not torch.equal(one["weights"][k], GPT(GPTConfig(**TINY)).state_dict()[k])
        for k in one["weights"]
    )
    for k in one["weights"]:  # the ranks agree to the bit
        assert torch.equal(two[0]["weights"][k], two[1]["weights"][k]), k
    assert two[0]["losses"] == two[1]["losses"]  # the logged loss is the mean over ranks
    assert abs(two[0]["losses"][0] - one["losses"][0]) < 1e-5


def test_rank_generator_differs_by_rank_and_is_reproducible():
    a = [random_batch(TOKENS, 4, 16, rank_generator(7, r))[0] for r in range(4)]
    assert all(not torch.equal(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(a[2], random_batch(TOKENS, 4, 16, rank_generator(7, 2))[0])
    # the base seed matters
    assert not torch.equal(a[0], random_batch(TOKENS, 4, 16, rank_generator(8, 0))[0])
    with pytest.raises(ValueError, match="rank"):
        rank_generator(0, -1)


def test_shard():
    x = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([shard(x, r, 3) for r in range(3)]), x)
    assert shard(x, 1, 2).tolist() == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ValueError, match="divisible"):
        shard(x, 0, 4)


def test_single_process_without_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rank, world_size, device = setup()
    assert (rank, world_size) == (0, 1) == world()
    model = GPT(GPTConfig(**TINY))
    assert wrap_ddp(model) is model and unwrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        setup()


def test_train_in_a_process_group_keeps_ranks_identical_and_saves(ranks):
    (r0, r1), tmp_path = [r["train"] for r in ranks[0]], ranks[1]
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert r0["steps"] == [2, 4] and r1["steps"] == []  # rank 0 evaluates
    assert r0["tokens"][-1] == 4 * 2 * 4 * 16 * 2  # steps x grad_accum x B x T x ranks
    model = GPT(GPTConfig(**TINY))
    state, _ = load_checkpoint(tmp_path / "ckpt", model)
    assert state["step"] == 4 and state["world_size"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, r0["weights"][k]), k


def test_train_in_a_process_group_resumes_bit_identical(ranks):
    """6 steps straight == 3 steps, stop (checkpoint off the interval), resume in new processes: the
    same bits."""
    straight, stopped = [r["straight"] for r in ranks[0]], [r["stopped"] for r in ranks[0]]
    resume_dir = ranks[2]
    state = json.loads((resume_dir / "ckpt" / "state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    assert [r["step"] for r in stopped[0]["history"]] == [2] and stopped[1]["history"] == []
    assert any(
        not torch.equal(straight[0]["weights"][k], stopped[0]["weights"][k])
        for k in straight[0]["weights"]
    )
    resumed = run_local(
        ddp_run, 2, RESUME_MODEL, RESUME_CFG, TOKENS[:4000], TOKENS[4000:], str(resume_dir)
    )
    for r in range(2):
        for k, v in straight[r]["weights"].items():
            assert torch.equal(v, resumed[r]["weights"][k]), (r, k)
    strip = lambda h: [{k: v for k, v in rec.items() if k != "seconds"} for rec in h]
    assert (
        strip(resumed[0]["history"]) == strip(straight[0]["history"])
        and resumed[1]["history"] == []
    )
    assert [r["step"] for r in resumed[0]["history"]] == [2, 4, 6]
    assert resumed[0]["log"] == "resuming from step 3 of 6\n" and resumed[1]["log"] == ""
    assert json.loads((resume_dir / "ckpt" / "state.json").read_text())["step"] == 6
    # one process cannot take over two ranks' samplers
    with pytest.raises(ValueError, match="written by 2 rank"):
        train(
            GPT(GPTConfig(**RESUME_MODEL)),
            TOKENS[:4000],
            TOKENS[4000:],
            TrainConfig(**RESUME_CFG),
            resume_dir,
        )


def test_ranks_draw_different_dropout_masks(ranks):
    """Dropout seeded with seed + rank: one process with batch 2B draws one mask per row and
    position, so two ranks must not draw the same masks (the same seed on every rank would)."""
    m0, m1 = (r["masks"] for r in ranks[0])
    assert m0.shape == m1.shape and 0.3 < m0.float().mean() < 0.7  # about half the entries dropped
    assert not torch.equal(m0, m1)


def test_a_nan_on_one_rank_stops_every_rank(ranks):
    messages = [r["diverged"] for r in ranks[0]]
    assert all(m.startswith("loss is nan at step 2 ") for m in messages), messages


def test_run_local_runs_a_function_defined_anywhere():
    """The processes are forked: a closure (which no other process could import) runs in each, in
    one process group, and the results come back by rank."""
    offset = 10

    def summed(rank, world_size):
        t = torch.tensor([float(rank + offset)])
        dist.all_reduce(t)
        return {"rank": rank, "world": world_size, "sum": t}

    out = run_local(summed, 2)
    assert [r["rank"] for r in out] == [0, 1] and {r["world"] for r in out} == {2}
    assert all(r["sum"].item() == 21.0 for r in out)


def test_command_line_options(capsys):
    """`python -m minillm.distributed`: the options of `ddp_train`'s signature (fastcore's
    `anno_parser`), with the presets as choices and the help of each option."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--preset", "--out", "--max-steps", "--batch-size", "--grad-accum"):
        assert option in out
    assert "{austen-tiny,austen-budget,austen-15m,gpt2-124m}" in out and "(per rank)" in out
    with pytest.raises(SystemExit) as e:
        main(["--preset", "austen-huge"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert ddp_train.__doc__.startswith("Train a preset data-parallel")
