"Alignment (minillm.align): log-probabilities, GAE, the reward model, PPO, DPO and GRPO."

import copy
import math

import pytest
import torch

from minillm.align import (
    GRPOConfig,
    PPOConfig,
    ValueHead,
    as_batch,
    chat_ids,
    conversations,
    dpo_loss,
    fact_preferences,
    gae,
    group_advantages,
    grpo,
    grpo_loss,
    implicit_pair_accuracy,
    kl_to_ref,
    pair_accuracy,
    ppo,
    reward,
    sequence_logprobs,
    train_dpo,
    train_reward_model,
)
from minillm.finetune import Classifier, answers, scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tok(chat_tok):
    return chat_tok


@pytest.fixture
def model(tiny_gpt):
    return tiny_gpt


def test_sequence_logprobs_match_a_manual_sum(model, tok):
    convs = [
        chat_ids(tok, "Whom does Emma marry?", "Mr. Knightley"),
        chat_ids(tok, "Where?", "Bath"),
    ]
    idx, starts, lengths = as_batch([c[0] for c in convs], [c[1] for c in convs])
    lp, mask, h = sequence_logprobs(model, idx, starts, lengths)
    assert h.shape == (2, idx.shape[1] - 1, 32)
    for row, (ids, s) in enumerate(convs):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0]
        manual = sum(
            torch.log_softmax(logits[j - 1], -1)[ids[j]].item() for j in range(s, len(ids))
        )
        assert mask[row].sum() == len(ids) - s
        assert abs(lp[row].sum().item() - manual) < 1e-4


def test_gae_by_hand_and_lambda_one_is_return_minus_value():
    r, v, m = (
        torch.tensor([[0.0, 0, 1, 0]]),
        torch.tensor([[0.5, 0.5, 0.5, 0]]),
        torch.tensor([[1.0, 1, 1, 0]]),
    )
    adv, ret = gae(r, v, m, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.45125, 0.475, 0.5, 0]]))
    adv1, ret1 = gae(r, v, m, lam=1.0)
    assert torch.allclose(adv1[0, :3], 1 - v[0, :3]) and torch.allclose(ret1[0, :3], torch.ones(3))


def test_reward_model_learns_a_preference(model, tok):
    pairs = [dict(prompt="Whom does Emma marry?", chosen="Mr. Knightley", rejected="Mr. Darcy")] * 4
    rm = Classifier(model, 1, zero_head=True)  # a reward model: a classifier with one output
    losses = train_reward_model(rm, tok, pairs, steps=30, batch_size=4, lr=3e-3)
    assert abs(losses[0] - math.log(2)) < 1e-6 and losses[-1] < 0.1


def test_dpo_loss_is_ln2_at_the_reference_and_training_raises_the_margin(model, tok):
    pairs = [dict(prompt="Whom does Emma marry?", chosen="Mr. Knightley", rejected="Mr. Darcy")]
    ref = copy.deepcopy(model).eval()
    loss, acc = dpo_loss(model, ref, tok, pairs)
    assert abs(loss.item() - math.log(2)) < 1e-6 and acc.item() == 0
    train_dpo(model, ref, tok, pairs * 4, steps=20, batch_size=2, lr=1e-3)
    assert implicit_pair_accuracy(model, ref, tok, pairs) == 1.0


def test_ppo_runs_and_moves_toward_the_reward(model, tok):
    ref = copy.deepcopy(model).eval()

    # the share of answer tokens with an id below 150: about half, at random
    def reward_fn(seqs, starts):
        return torch.tensor(
            [sum(t < 150 for t in s[st:]) / max(1, len(s) - st) for s, st in zip(seqs, starts)]
        )

    tasks = [dict(prompt="Where?", response="Bath")] * 8
    hist = ppo(
        model,
        ValueHead(32),
        ref,
        reward_fn,
        tok,
        tasks,
        PPOConfig(batch_size=8, lr=1e-2, max_new_tokens=4),
        20,
    )
    assert len(hist) == 20 and hist[0]["kl"] == 0.0
    first, last = (sum(r["reward"] for r in hist[i : i + 5]) / 5 for i in (0, 15))
    assert last > first + 0.1 and hist[-1]["kl"] > 0


def test_sampled_replies_make_conversations(model, tok):
    prompts = ["Where?", "Whom does Emma marry?", "Where?"]
    replies = answers(model, tok, prompts, 3, temperature=1.0, seed=1, decode=False)
    seqs, starts = conversations(tok, prompts, replies)
    assert [s[:st] for s, st in zip(seqs, starts)] == [chat_ids(tok, p)[0] for p in prompts]
    assert all(1 <= len(s) - st <= 3 for s, st in zip(seqs, starts))
    assert answers(model, tok, prompts, 3, temperature=1.0, seed=1, decode=False) == replies
    end = tok.special_tokens["<|end|>"]
    text = answers(model, tok, prompts, 3, temperature=1.0, seed=1)
    assert text == [tok.decode([t for t in r if t != end]) for r in replies]


def test_reward_is_the_one_output_of_a_classifier(model, tok):
    rm = Classifier(model, 1)
    prompts, responses = ["Where?", "Who?"], ["Bath", [5, 6]]
    r = reward(rm, tok, prompts, responses)
    assert r.shape == (2,)
    torch.testing.assert_close(r, scores(rm, conversations(tok, prompts, responses)[0])[:, 0])
    pairs = [dict(prompt="Where?", chosen="Bath", rejected="Lyme")]
    assert pair_accuracy(rm, tok, pairs) == float(
        reward(rm, tok, ["Where?"], ["Bath"])[0] > reward(rm, tok, ["Where?"], ["Lyme"])[0]
    )


def test_every_function_keeps_its_tensors_where_the_model_is(model, tok, strict_device):
    ref, rm = copy.deepcopy(model).eval(), Classifier(copy.deepcopy(model), 1, zero_head=True)
    value_head = ValueHead(32)
    pairs = [dict(prompt="Whom does Emma marry?", chosen="Mr. Knightley", rejected="Mr. Darcy")]
    tasks = [dict(prompt="Where?", response="Bath")] * 4
    with strict_device():
        assert len(train_reward_model(rm, tok, pairs * 2, steps=2, batch_size=2)) == 2
        assert reward(rm, tok, ["Where?"], ["Bath"]).tolist() is not None
        assert 0 <= pair_accuracy(rm, tok, pairs) <= 1
        idx, starts, lengths = as_batch(*conversations(tok, ["Where?"], ["Bath"]), "cpu")
        assert sequence_logprobs(model, idx, starts, lengths)[0].sum().item() < 0
        ones = torch.ones(1, 3, device="cpu")
        adv, _ = gae(ones, 0 * ones, ones)
        assert adv.tolist()
        rewards = lambda seqs, starts: torch.ones(len(seqs), device="cpu")
        hist = ppo(
            model, value_head, ref, rewards, tok, tasks, PPOConfig(4, 3, minibatch_size=2), 1
        )
        assert len(hist) == 1
        assert dpo_loss(model, ref, tok, pairs)[0].item() > 0
        assert len(train_dpo(model, ref, tok, pairs, steps=2, batch_size=1)) == 2
        assert 0 <= implicit_pair_accuracy(model, ref, tok, pairs) <= 1
        assert kl_to_ref(model, ref, tok, ["Where?"]) == kl_to_ref(model, ref, tok, ["Where?"])
        cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3)
        assert len(grpo(model, ref, tok, tasks, cfg, 1)) == 1


def test_fact_preferences_hold_out_unseen_wrong_answers():
    train, held = fact_preferences()
    assert not {(p["prompt"], p["rejected"]) for p in train} & {
        (p["prompt"], p["rejected"]) for p in held
    }
    assert all(p["chosen"] != p["rejected"] for p in train + held)


def test_sequence_logprobs_apply_the_temperature(model, tok):
    ids, s = chat_ids(tok, "Where?", "Bath")
    idx, starts, lengths = as_batch([ids], [s])
    lp, mask, _ = sequence_logprobs(model, idx, starts, lengths, temperature=0.5)
    with torch.no_grad():
        logits = model(idx)[0][0]
    manual = sum(
        torch.log_softmax(logits[j - 1] / 0.5, -1)[ids[j]].item() for j in range(s, len(ids))
    )
    assert abs(lp.sum().item() - manual) < 1e-4
    assert (
        abs(lp.sum().item() - sequence_logprobs(model, idx, starts, lengths)[0].sum().item()) > 1e-3
    )


def test_ppo_shuffles_each_epoch_and_clips_policy_and_value_apart(model, tok, monkeypatch):
    ref = copy.deepcopy(model).eval()
    perms, clipped = [], []
    randperm, clip = torch.randperm, torch.nn.utils.clip_grad_norm_

    def recording_randperm(*args, **kwargs):
        perms.append(randperm(*args, **kwargs).tolist())
        return torch.tensor(perms[-1])

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        clipped.append({id(p) for p in params})
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    value_head = ValueHead(32)
    cfg = PPOConfig(batch_size=8, minibatch_size=4, epochs=3, max_new_tokens=3)
    reward_fn = lambda seqs, starts: torch.zeros(len(seqs))
    ppo(
        model, value_head, ref, reward_fn, tok, [dict(prompt="Where?", response="Bath")] * 8, cfg, 1
    )
    assert len(perms) == 3 and len({tuple(p) for p in perms}) > 1  # not one order for every epoch
    value_ids, policy_ids = (
        {id(p) for p in value_head.parameters()},
        {id(p) for p in model.parameters()},
    )
    assert clipped and all(c in (value_ids, policy_ids) for c in clipped)
    assert clipped.count(value_ids) == clipped.count(policy_ids) == 3 * 2  # each minibatch step


def test_group_advantages_sum_to_zero_and_vanish_when_rewards_are_equal():
    r = torch.tensor([[1.0, 0, 0, 1], [0.0, 0, 0, 1], [1.0, 1, 1, 1]])
    adv = group_advantages(r)
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-5)
    assert torch.equal(adv[2], torch.zeros(4))  # all right: nothing to learn from
    # (r - mean) / std with the population std: ±1 for a half-right group, up to eps
    assert torch.allclose(adv[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-3)
    assert torch.allclose(adv[1], torch.tensor([-1, -1, -1, 3]) / math.sqrt(3), atol=1e-3)


def test_grpo_loss_matches_a_hand_computation():
    # two answers of two and one tokens; ratios π/π_old e^0.1, 1 and e^-0.5; π_ref gives
    # log-ratios log π_ref − log π of 0, -0.2 and 0.3
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0], [0.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.2], [-0.2, 0.0]])
    mask = torch.tensor([[1.0, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.1)
    k3 = lambda d: math.exp(d) - d - 1
    # answer 1 (A = +1): min(ρA, clip(ρ)A) = e^0.1 (inside [0.8, 1.2]) and 1
    a1 = ((math.exp(0.1) - 0.1 * k3(0.0)) + (1.0 - 0.1 * k3(-0.2))) / 2
    # answer 2 (A = −1): ρ = e^−0.5 < 0.8, min(−ρ, −0.8) = −0.8
    a2 = -0.8 - 0.1 * k3(0.3)
    assert abs(loss.item() - -(a1 + a2) / 2) < 1e-6
    loss.backward()
    # the clipped token of answer 2 gets only the KL's gradient, β(1 − e^d)/2 with d = 0.3
    assert abs(logp.grad[1, 0].item() - 0.1 * (1 - math.exp(0.3)) / 2) < 1e-6
    assert logp.grad[1, 1].item() == 0  # padding


def test_grpo_with_equal_rewards_does_not_move_the_policy(model, tok):
    ref = copy.deepcopy(model).eval()
    before = [p.detach().clone() for p in model.parameters()]
    hist = grpo(
        model,
        ref,
        tok,
        [dict(prompt="Where?", response="Bath")] * 4,
        GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=3),
        2,
        reward_fn=lambda answers, tasks: torch.ones(len(answers)),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [r["mixed_groups"] for r in hist] == [0.0, 0.0] and hist[0]["kl"] == 0.0


def test_grpo_moves_toward_the_reward(model, tok):
    ref = copy.deepcopy(model).eval()

    def reward_fn(answers, tasks):  # the share of characters that are in "Bath": any answer
        return torch.tensor([sum(c in "Bath" for c in a) / max(1, len(a)) for a in answers])

    hist = grpo(
        model,
        ref,
        tok,
        [dict(prompt="Where?", response="Bath")] * 4,
        GRPOConfig(prompts_per_step=2, group_size=8, max_new_tokens=4, lr=1e-2, epochs=2),
        20,
        reward_fn=reward_fn,
    )
    assert len(hist) == 20 and hist[0]["kl"] == 0.0 and hist[-1]["kl"] > 0
    first, last = (sum(r["reward"] for r in hist[i : i + 5]) / 5 for i in (0, 15))
    assert last > first + 0.1
