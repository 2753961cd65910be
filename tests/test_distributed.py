"""Data parallelism: 2 ranks x batch B take the same step as 1 process x batch 2B; each rank draws its own,
reproducible batches; `train_ddp` keeps the ranks identical and writes a checkpoint. Two processes on 127.0.0.1 (gloo)."""
import numpy as np
import pytest
import torch

from minillm.distributed import one_step, rank_generator, run_local, setup, shard, train_ddp, unwrap, world, wrap_ddp
from minillm.embeddings import random_batch
from minillm.model import GPT, GPTConfig
from minillm.train import TrainConfig, load_checkpoint

TINY = dict(family="gpt2", vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32)
TOKENS = np.random.default_rng(0).integers(0, 64, 5_000).astype(np.uint16)


X, Y = random_batch(TOKENS, 8, 16, torch.Generator().manual_seed(0))  # (2B, T) each
STEP_CFG = dict(batch_size=4, context_length=16, lr=1e-3, warmup_steps=0, max_steps=10)


def _train_worker(rank, world_size, out_dir):
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = GPT(GPTConfig(**TINY))
    cfg = TrainConfig(batch_size=4, context_length=16, grad_accum=2, max_steps=4, warmup_steps=1, eval_interval=2,
                      eval_batches=2)
    history = train_ddp(model, TOKENS[:4000], TOKENS[4000:], cfg, out_dir)
    return {"weights": dict(model.state_dict()), "history": [r["val_loss"] for r in history],
            "steps": [r["step"] for r in history], "tokens": [r["tokens"] for r in history]}


def _worker(rank, world_size, out_dir):
    "Both experiments in one pair of processes (starting processes is the slow part)."
    return {"step": one_step(rank, world_size, TINY, STEP_CFG, X, Y), "train": _train_worker(rank, world_size, out_dir)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_local(_worker, 2, str(out)), out


def test_two_ranks_equal_one_process_with_twice_the_batch(ranks):
    torch.set_num_threads(1)
    two = [r["step"] for r in ranks[0]]
    one = one_step(0, 1, TINY, STEP_CFG, X, Y)
    assert one["weights"].keys() == two[0]["weights"].keys()
    diff = max((two[0]["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"])
    assert diff < 1e-6
    assert any(not torch.equal(one["weights"][k], GPT(GPTConfig(**TINY)).state_dict()[k]) for k in one["weights"])
    for k in one["weights"]:  # the ranks agree to the bit
        assert torch.equal(two[0]["weights"][k], two[1]["weights"][k]), k
    assert two[0]["losses"] == two[1]["losses"]  # the logged loss is the mean over ranks
    assert abs(two[0]["losses"][0] - one["losses"][0]) < 1e-5


def test_rank_generator_differs_by_rank_and_is_reproducible():
    a = [random_batch(TOKENS, 4, 16, rank_generator(7, r))[0] for r in range(4)]
    assert all(not torch.equal(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(a[2], random_batch(TOKENS, 4, 16, rank_generator(7, 2))[0])
    assert not torch.equal(a[0], random_batch(TOKENS, 4, 16, rank_generator(8, 0))[0])  # the base seed matters
    with pytest.raises(ValueError, match="rank"): rank_generator(0, -1)


def test_shard():
    x = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([shard(x, r, 3) for r in range(3)]), x)
    assert shard(x, 1, 2).tolist() == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ValueError, match="divisible"): shard(x, 0, 4)


def test_single_process_without_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"): monkeypatch.delenv(k, raising=False)
    rank, world_size, device = setup()
    assert (rank, world_size) == (0, 1) == world()
    model = GPT(GPTConfig(**TINY))
    assert wrap_ddp(model) is model and unwrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"): setup()


def test_train_ddp_keeps_ranks_identical_and_saves(ranks):
    (r0, r1), tmp_path = [r["train"] for r in ranks[0]], ranks[1]
    for k, v in r0["weights"].items(): assert torch.equal(v, r1["weights"][k]), k
    assert r0["steps"] == [2, 4] and r1["steps"] == []  # rank 0 evaluates
    assert r0["tokens"][-1] == 4 * 2 * 4 * 16 * 2  # steps x grad_accum x B x T x ranks
    model = GPT(GPTConfig(**TINY))
    state, _ = load_checkpoint(tmp_path / "ckpt", model)
    assert state["step"] == 4 and state["world_size"] == 2
    for k, v in model.state_dict().items(): assert torch.equal(v, r0["weights"][k]), k
