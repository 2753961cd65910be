"Fine-tuning (minillm.finetune): classification head, instruction batches with the loss mask, LoRA."

import copy

import pytest
import torch

from minillm.finetune import (
    Classifier,
    LoRALinear,
    add_lora,
    finetune,
    hidden_states,
    lora_layers,
    merge_lora,
    n_trainable,
    pad,
    sft_batch,
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
