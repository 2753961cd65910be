"""Fine-tuning (minillm.finetune): the loop and its helpers, the classification head, instruction
batches with the loss mask, answering prompts, LoRA; and every function's tensors where the model
is."""

import copy

import pytest
import torch

from minillm.finetune import (
    Classifier,
    LoRALinear,
    accuracy_on,
    add_lora,
    answer_loss,
    answers,
    finetune,
    finetune_loop,
    hidden_states,
    lora_layers,
    merge_lora,
    n_trainable,
    pad,
    predict,
    scores,
    sft_batch,
    train_classifier,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tok(chat_tok):
    return chat_tok


@pytest.fixture
def model(tiny_gpt):
    return tiny_gpt


def test_hidden_states_are_what_the_head_reads(model):
    x = torch.randint(0, 200, (2, 10))
    h = hidden_states(model, x)
    assert h.shape == (2, 10, 32)
    torch.testing.assert_close(model.lm_head(h), model(x)[0])


def test_classifier_ignores_right_padding(model):
    clf = Classifier(model, 6).eval()
    a, b = [5, 6, 7, 8], [9, 10]
    batched = clf(pad([a, b], 0), torch.tensor([4, 2]))
    alone = torch.cat(
        [clf(torch.tensor([a]), torch.tensor([4])), clf(torch.tensor([b]), torch.tensor([2]))]
    )
    torch.testing.assert_close(batched, alone)


def test_sft_batch_masks_the_prompt(tok):
    recs = [
        dict(prompt="Which novel?", response="Emma"),
        dict(prompt="Who said so?", response="Mr. Darcy"),
    ]
    x, y = sft_batch(tok, recs, 64)
    assert x.shape == y.shape
    end = tok.special_tokens["<|end|>"]
    for row, r in zip(y.tolist(), recs):
        learned = [t for t in row if t >= 0]
        assert tok.decode(learned) == r["response"] + "<|end|>" and learned[-1] == end
    _, y_all = sft_batch(tok, recs, 64, mask_prompt=False)
    assert (y_all >= 0).sum() > (y >= 0).sum()
    x_cut, _ = sft_batch(tok, recs, 5)  # a context shorter than the conversation cuts it
    assert x_cut.shape[1] == 5


def test_lora_starts_at_base_and_merges_exactly(model, tok):
    base = copy.deepcopy(model)
    lora = add_lora(model, r=4, alpha=8, train_tokens=list(tok.special_tokens.values()))
    assert len(lora_layers(lora)) == 2 * 4
    x = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(lora(x)[0], base(x)[0])
    for m in lora_layers(lora):
        torch.nn.init.normal_(m.B)  # a non-zero update
    lora64 = copy.deepcopy(lora).double()
    adapted = lora64(x)[0]
    assert (adapted - merge_lora(lora64)(x)[0]).abs().max() < 1e-10
    assert (adapted - unmerge_lora(lora64)(x)[0]).abs().max() < 1e-10
    lora_params = sum(m.A.numel() + m.B.numel() for m in lora_layers(lora))
    assert n_trainable(lora) == lora_params + len(tok.special_tokens) * 32


def test_lora_adapters_act_on_the_cached_decode_path(model):
    """Generation's one-token step (`GPT._decode`) calls the modules' `forward` directly: an
    unmerged adapter must still act there, as on the general path."""
    lora = add_lora(model, r=4, alpha=8).eval()
    for m in lora_layers(lora):
        torch.nn.init.normal_(m.B)  # a non-zero update
    x = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        full = lora(x)[0]
        cache = lora.new_cache(batch_size=2)
        steps = [lora(x[:, :6], cache=cache)[0]]
        steps += [lora(x[:, t : t + 1], cache=cache)[0] for t in range(6, 9)]  # the decode path
        for m in lora_layers(lora):
            m.B.zero_()
        without = lora(x)[0]  # the adapters switched off
    assert (full - without).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_lora_training_moves_only_adapters_and_special_rows(model, tok):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    specials = list(tok.special_tokens.values())
    add_lora(model, r=4, train_tokens=specials)
    finetune(
        model,
        tok,
        [dict(prompt="Which novel?", response="Emma")] * 4,
        steps=3,
        batch_size=2,
        lr=1e-2,
    )
    after = model.state_dict()
    for k, v in before.items():
        name = (
            k.replace("attn.c_attn.", "attn.c_attn.base.")
            .replace("attn.c_proj.", "attn.c_proj.base.")
            .replace("mlp.c_fc.", "mlp.c_fc.base.")
            .replace("mlp.c_proj.", "mlp.c_proj.base.")
        )
        if k in ("wte.weight", "lm_head.weight"):
            moved = (after[k] != v).any(1).nonzero().flatten().tolist()
            assert moved and set(moved) <= set(specials)
        else:
            assert torch.equal(after[name], v), k
    assert any((m.B != 0).any() for m in lora_layers(model))


def test_lora_bad_input(model):
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(model, targets=("nothing",))
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(torch.nn.Linear(4, 4), r=0)


def test_every_function_keeps_its_tensors_where_the_model_is(model, tok, strict_device):
    recs = [dict(prompt="Which novel?", response="Emma"), dict(prompt="Who?", response="Mr. Darcy")]
    examples = [dict(text="Mr. Darcy said so.", label=1), dict(text="Emma.", label=0)]
    clf = Classifier(copy.deepcopy(model), 2)
    lora = add_lora(copy.deepcopy(model), r=2, train_tokens=list(tok.special_tokens.values()))
    with strict_device():
        assert len(train_classifier(clf, tok, examples, steps=2, batch_size=2)) == 2
        assert len(predict(clf, tok, ["Emma.", "Bath"])) == 2
        assert len(finetune(model, tok, recs, steps=2, batch_size=2)) == 2
        assert len(finetune(lora, tok, recs, steps=2, batch_size=2)) == 2
        assert answer_loss(model, tok, recs) > 0
        assert len(answers(model, tok, ["Where?", "Whom does Emma marry?"], 3)) == 2
        assert len(answers(model, tok, ["Where?"], 3, temperature=1.0, decode=False)[0]) <= 3
        assert 0 <= accuracy_on(model, tok, recs) <= 1


def test_finetune_loop_draws_seeded_batches_and_follows_the_schedule():
    w = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def batch_loss(batch):
        seen.append(batch)
        return ((w - sum(batch)) ** 2).sum()

    losses = finetune_loop([w], list(range(10)), batch_loss, steps=5, batch_size=3, lr=0.1)
    first = seen[:]
    seen.clear()
    finetune_loop([torch.nn.Parameter(torch.zeros(1))], list(range(10)), batch_loss, 5, 3, 0.1)
    assert len(losses) == 5 and all(len(b) == 3 for b in first) and seen == first  # seeded
    seen.clear()
    finetune_loop([torch.nn.Parameter(torch.zeros(1))], list(range(10)), batch_loss, 5, 3, 0.1, 1)
    assert seen != first


def test_answers_are_greedy_batched_and_cropped(model, tok):
    prompts = ["Where?", "Whom does Emma marry?", "Where?"]
    replies = answers(model, tok, prompts, max_new_tokens=5)
    alone = [answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert replies == alone and replies[0] == replies[2]  # batched or alone, the same answers
    ids = answers(model, tok, prompts, max_new_tokens=5, decode=False)
    end = tok.special_tokens["<|end|>"]
    assert all(len(r) <= 5 and (end not in r or r.index(end) == len(r) - 1) for r in ids)
    assert [tok.decode([t for t in r if t != end]) for r in ids] == replies
    long = answers(model, tok, ["Emma " * 200], max_new_tokens=5)  # cropped to fit the context
    assert len(long) == 1
    for bad in (0, 64, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            answers(model, tok, ["Where?"], max_new_tokens=bad)


def test_scores_are_the_classifier_outputs_cropped_to_the_context(model, tok):
    clf = Classifier(model, 3)
    seqs = [[5, 6, 7], list(range(10, 90))]  # the second is longer than the context (64)
    out = scores(clf, seqs, batch_size=1)
    assert out.shape == (2, 3) and clf.training  # the mode is restored
    with torch.no_grad():
        last64 = clf(torch.tensor([seqs[1][-64:]]), torch.tensor([64]))
    torch.testing.assert_close(out[1:], last64)
    assert predict(clf, tok, ["Emma."]) == scores(clf, [tok.encode("Emma.")]).argmax(-1).tolist()
    rm = Classifier(model, 1, zero_head=True)
    assert torch.equal(scores(rm, seqs), torch.zeros(2, 1))  # a reward model starts at 0


def test_instruction_tuned_says_when_it_trains_and_loads_silently(
    tmp_path, monkeypatch, capsys, model, tok
):
    """The first call fine-tunes (here: a stand-in that takes no steps) and says so in one line on
    stderr, on one thread; the second loads the run without a word."""
    import minillm.finetune as FT

    monkeypatch.setattr(FT, "sft_dir", lambda: tmp_path / "sft")
    monkeypatch.setattr(FT, "pretrained", lambda base: (model, tok))
    monkeypatch.setattr(FT, "instruction_examples", lambda *a, **k: [])
    threads = []
    monkeypatch.setattr(
        FT, "finetune", lambda *a, **k: threads.append(torch.get_num_threads()) or [1.0]
    )
    m, t = FT.instruction_tuned()
    assert capsys.readouterr().err.startswith("instruction_tuned: fine-tuning austen-tiny once")
    assert threads == [1] and (tmp_path / "sft" / "metrics.json").exists()
    torch.testing.assert_close(m.lm_head.weight, model.lm_head.weight)
    FT.instruction_tuned()
    assert capsys.readouterr().err == "" and threads == [1]
