"""Evaluation (minillm.evaluate) on a tiny random model: choice scores are exact log-probability
sums, however the context is cropped or the choices batched; accuracies of an oracle and an
anti-oracle; greedy chat answers stop at <|end|>; the table's layout; bad input is refused with the
value named; every tensor where the model is."""

import math
import random

import pytest
import torch

from minillm.evaluate import (
    COLUMNS,
    QUESTION_FORMATS,
    as_choice_item,
    completion_sampler,
    confidence_interval,
    contamination,
    format_table,
    multiple_choice_accuracy,
    paired_standard_error,
    question_items,
    score_choices,
    sliding_window_bpc,
    standard_error,
    task_accuracy,
    word_ngrams,
    words,
)
from minillm.finetune import answers
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.train import evaluate_bpc

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. "
)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer().train(TEXT * 20, vocab_size=300)


def tiny(tok, context_length: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(
            vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, context_length=context_length
        )
    ).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


def manual_logprob(model, context_ids: list[int], choice_ids: list[int]) -> float:
    """log p(choice | context), one token at a time, each from a fresh forward pass on everything
    before it."""
    total, seq = 0.0, list(context_ids)
    for t in choice_ids:
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[-model.config.context_length :]]))
        total += torch.log_softmax(logits[0, -1], dim=-1)[t].item()
        seq.append(t)
    return total


def test_score_choices_is_the_sum_of_token_logprobs(model, tok):
    context, choices = (
        "It is a truth universally",
        [" acknowledged", " denied", " a single man in possession"],
    )
    scores = score_choices(model, tok, context, choices)
    for c, s in zip(choices, scores):
        ids = tok.encode(c)
        assert s["n_tokens"] == len(ids)
        assert s["logprob"] == pytest.approx(
            manual_logprob(model, tok.encode(context), ids), abs=1e-4
        )
        assert s["per_char"] == pytest.approx(s["logprob"] / len(c))
    # batching pads shorter rows at the end: each choice scores the same alone
    for c, s in zip(choices, scores):
        assert score_choices(model, tok, context, [c])[0]["logprob"] == pytest.approx(
            s["logprob"], abs=1e-5
        )
    # token ids work as a context too
    assert score_choices(model, tok, tok.encode(context), choices)[2]["logprob"] == pytest.approx(
        scores[2]["logprob"], abs=1e-6
    )


def test_long_context_keeps_its_end(model, tok):
    context = TEXT * 5  # far more than 32 tokens
    ctx_ids, choice = tok.encode(context), " a wife"
    n = len(tok.encode(choice))
    got = score_choices(model, tok, context, [choice])[0]["logprob"]
    assert got == pytest.approx(
        manual_logprob(model, ctx_ids[-(33 - n) :], tok.encode(choice)), abs=1e-4
    )
    assert got == pytest.approx(
        score_choices(model, tok, ctx_ids[-(33 - n) :], [choice])[0]["logprob"], abs=1e-6
    )


def test_empty_context_is_endoftext(model, tok):
    eot = tok.special_tokens["<|endoftext|>"]
    assert score_choices(model, tok, "", [" wife"])[0]["logprob"] == pytest.approx(
        manual_logprob(model, [eot], tok.encode(" wife")), abs=1e-4
    )


def test_accuracy_of_an_oracle_and_an_anti_oracle(model, tok):
    rng = random.Random(0)
    words = TEXT.split()
    items = []
    for _ in range(12):
        i = rng.randrange(len(words) - 8)
        items.append(
            dict(
                context=" ".join(words[i : i + 5]), choices=[" " + w for w in rng.sample(words, 4)]
            )
        )

    def labelled(
        pick,
    ):  # label each item with the choice that `pick` selects from the model's own scores
        out = []
        for it in items:
            s = score_choices(model, tok, it["context"], it["choices"])
            out.append({**it, "label": pick(range(4), key=lambda i: s[i]["logprob"])})
        return out

    best = multiple_choice_accuracy(model, tok, labelled(max))
    assert best["acc"] == 1.0 and best["n"] == 12 and best["chance"] == 0.25
    assert multiple_choice_accuracy(model, tok, labelled(min))["acc"] == 0.0
    no_pmi = multiple_choice_accuracy(model, tok, labelled(max), pmi=False)
    assert set(no_pmi) == {"acc", "acc_norm", "correct", "n", "chance"}
    assert set(no_pmi["correct"]) == {"acc", "acc_norm"} and no_pmi["correct"]["acc"] == [1] * 12


def test_paired_standard_error():
    a, b = [1, 1, 0, 0, 1, 0, 1, 1], [1, 1, 1, 0, 1, 0, 1, 0]
    d = [y - x for x, y in zip(a, b)]  # 0, 0, 1, 0, 0, 0, 0, -1: mean 0, variance 2/8
    assert paired_standard_error(a, b) == pytest.approx(math.sqrt(2 / 8 / 8))
    assert sum(d) == 0 and paired_standard_error(a, a) == 0.0
    with pytest.raises(ValueError, match="same length"):
        paired_standard_error([1], [1, 0])


def test_questions_are_asked_in_arc_format(model, tok):
    item = dict(question="Whom does Emma marry?", choices=["Mr. Knightley", "Mr. Elton"], label=0)
    s = score_choices(
        model, tok, "Question: Whom does Emma marry?\nAnswer:", [" Mr. Knightley", " Mr. Elton"]
    )
    r = multiple_choice_accuracy(model, tok, [item])
    assert r["acc"] == float(s[0]["logprob"] >= s[1]["logprob"]) and r["chance"] == 0.5


def test_standard_error_and_wilson_interval():
    assert standard_error(0.3, 200) == pytest.approx(math.sqrt(0.21 / 200))
    lo, hi = confidence_interval(0.3, 200)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(2 * 1.96 * standard_error(0.3, 200), rel=0.02)
    assert (
        confidence_interval(0.0, 12)[0] == pytest.approx(0.0, abs=1e-12)
        and 0.2 < confidence_interval(0.0, 12)[1] < 0.3
    )
    assert confidence_interval(1.0, 5)[1] == pytest.approx(1.0)
    for n in range(1, 300):  # the ends never leave [0, 1], not even by rounding
        assert confidence_interval(0.0, n)[0] == 0.0 and confidence_interval(1.0, n)[1] == 1.0
        assert confidence_interval(0.0, n)[1] == pytest.approx(1.96**2 / (n + 1.96**2))
    with pytest.raises(ValueError, match="p=1.5"):
        standard_error(1.5, 10)
    with pytest.raises(ValueError, match="n=0"):
        confidence_interval(0.5, 0)


def _always(model, tok, token: int) -> GPT:
    """A copy of `model` whose every next token is `token`: the final norm outputs a constant that
    only `token` matches."""
    m = tiny(tok)
    m.lm_head = torch.nn.Linear(16, tok.vocab_size, bias=False)
    with torch.no_grad():
        m.ln_f.weight.zero_()
        m.ln_f.bias.zero_()
        m.ln_f.bias[0] = 10.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[token, 0] = 1.0
    return m.eval()


def test_answers_stop_at_end_and_task_accuracy_checks_them(model, tok):
    answer = lambda m, prompt, **kw: answers(m, tok, [prompt], **kw)[0]
    end = tok.special_tokens["<|end|>"]
    assert answer(_always(model, tok, end), "Whom does Emma marry?") == ""
    a = tok.encode(" a")[0]
    assert answer(_always(model, tok, a), "Whom does Emma marry?", max_new_tokens=5) == tok.decode(
        [a] * 5
    )
    # a prompt longer than the context
    assert isinstance(answer(model, TEXT * 5, max_new_tokens=8), str)
    r = task_accuracy(
        _always(model, tok, end),
        tok,
        [dict(prompt="Hi", response=""), dict(prompt="Who?", response="Emma")],
    )
    assert r["acc"] == 0.5 and r["answers"] == ["", ""] and r["n"] == 2
    records = [dict(prompt=p, response="a") for p in ("Hi", "Who is she?", "Hi")]
    replies = task_accuracy(model, tok, records, max_new_tokens=4)["answers"]
    assert replies == answers(model, tok, [r["prompt"] for r in records], max_new_tokens=4)


def test_completion_sampler_is_seeded(model, tok):
    fn = completion_sampler(model, tok, max_new_tokens=8)
    out = fn("def f(x):\n", 3)
    assert len(out) == 3 and all(isinstance(o, str) for o in out) and fn("def f(x):\n", 3) == out
    with pytest.raises(ValueError, match="max_new_tokens=32"):
        completion_sampler(model, tok, max_new_tokens=32)


def test_format_table():
    rows = [
        dict(
            benchmark="continuations",
            metric="acc_norm",
            value=0.305,
            stderr=0.0326,
            chance=0.25,
            n=200,
        ),
        dict(
            benchmark="validation text",
            metric="perplexity",
            value=42.9626,
            stderr=None,
            chance=1024,
            n=147819,
        ),
        dict(benchmark="code", metric="pass@1", value=0.0),
    ]
    rows[0]["interval"] = (0.2464, 0.3711)
    lines = format_table(rows).splitlines()
    assert lines[0].split() == list(COLUMNS) and set(lines[1]) == {"-", " "}
    assert lines[2].split() == [
        "continuations", "acc_norm", "0.305", "0.033", "[0.246,", "0.371]", "0.250", "200"
    ]  # fmt: skip
    assert lines[3].split() == [
        "validation",
        "text",
        "perplexity",
        "42.963",
        "-",
        "-",
        "1024",
        "147819",
    ]
    assert lines[4].split() == ["code", "pass@1", "0.000", "-", "-", "-", "-"]
    assert (
        lines[0].index("value") + 5 == lines[2].index("0.305") + 5 == lines[3].index("42.963") + 6
    )  # right-aligned


def test_bad_input_names_the_value(model, tok):
    with pytest.raises(ValueError, match=r"choices=\[\]"):
        score_choices(model, tok, "It is", [])
    with pytest.raises(ValueError, match="choices='abc'"):
        score_choices(model, tok, "It is", "abc")
    with pytest.raises(ValueError, match=r"choices\[1\]=''"):
        score_choices(model, tok, "It is", [" a", ""])
    with pytest.raises(ValueError, match=r"choices\[0\] is \d+ tokens"):
        score_choices(model, tok, "It is", [TEXT * 3])
    with pytest.raises(ValueError, match="items is empty"):
        multiple_choice_accuracy(model, tok, [])
    with pytest.raises(ValueError, match=r"items\[1\]: label=4"):
        multiple_choice_accuracy(
            model,
            tok,
            [
                dict(context="a", choices=[" b", " c"], label=0),
                dict(context="a", choices=[" b", " c"], label=4),
            ],
        )
    with pytest.raises(ValueError, match="neither 'context' nor 'question'"):
        multiple_choice_accuracy(model, tok, [dict(prompt="a", choices=[" b"], label=0)])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        task_accuracy(model, tok, [dict(prompt="Hi", response="a")], max_new_tokens=0)
    with pytest.raises(ValueError, match="records is empty"):
        task_accuracy(model, tok, [])
    with pytest.raises(ValueError, match=r"records\[0\]"):
        task_accuracy(model, tok, [dict(prompt="Hi")])
    with pytest.raises(ValueError, match="rows is empty"):
        format_table([])
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        format_table([dict(benchmark="a", metric="b", value=1.0), dict(value=1.0)])
    no_chat = BPETokenizer().train(TEXT * 5, vocab_size=280, special_tokens=())
    with pytest.raises(ValueError, match=r"no chat token\(s\) <\|user\|>"):
        task_accuracy(tiny(no_chat), no_chat, [dict(prompt="Hi", response="a")])
    with pytest.raises(ValueError, match="no <\\|endoftext\\|>"):
        score_choices(tiny(no_chat), no_chat, "", [" a"])


def manual_loss(model, ids: list[int], t: int, start: int) -> float:
    "-log p(ids[t] | ids[start:t]), one forward pass on exactly that history."
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[start:t]]))
    return -torch.log_softmax(logits[0, -1], dim=-1)[ids[t]].item()


def test_sliding_window_scores_each_token_once_with_enough_history(model, tok):
    text, T = TEXT * 3, model.config.context_length  # about 3 windows of 32
    ids = tok.encode(text)
    whole = sliding_window_bpc(model, tok, text)  # stride = T: non-overlapping windows
    ref = evaluate_bpc(model, tok, text)
    assert whole["tokens"] == ref["tokens"] == len(ids) - 1 and whole["min_context"] == 1
    assert whole["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert whole["bits_per_char"] == pytest.approx(ref["bits_per_char"], rel=1e-4)
    for s in (1, 5, 16):
        r = sliding_window_bpc(model, tok, text, stride=s, batch_size=3)
        assert r["tokens"] == len(ids) - 1 and r["min_context"] == T - s + 1
        assert r["windows"] == math.ceil((len(ids) - 1) / s)
        # by hand: token t is predicted from the T tokens before the end of its block of s
        # targets (blocks start at 1, 1 + s, ...), or from the start of the text
        total = 0.0
        for t in range(1, len(ids)):
            start = max(0, ((t - 1) // s + 1) * s - T)  # a full block of s would end there
            assert t - start >= min(t, T - s + 1)
            total += manual_loss(model, ids, t, start)
        assert r["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-4)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    with pytest.raises(ValueError, match="stride=0"):
        sliding_window_bpc(model, tok, text, stride=0)
    with pytest.raises(ValueError, match="stride=33"):
        sliding_window_bpc(model, tok, text, stride=33)
    with pytest.raises(ValueError, match="nothing to predict"):
        sliding_window_bpc(model, tok, "It")


def test_words_and_ngrams():
    assert words("Mr. Darcy's  PRIDE,\nand-prejudice 1813") == [
        "mr", "darcy", "s", "pride", "and", "prejudice", "1813"
    ]  # fmt: skip
    assert word_ngrams("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_ngrams("a b", 3) == set()
    with pytest.raises(ValueError, match="n=0"):
        word_ngrams("a b", 0)


def test_contamination_finds_shared_ngrams():
    reference = TEXT  # 23 words
    thirteen = " ".join(TEXT.split()[3:16])
    items = [
        thirteen.upper() + "!!",  # 13 words of the reference, case and punctuation aside
        "It is a truth universally acknowledged, that a single woman in possession of a fortune",
        "a single man",  # shorter than 13 words: all of it is in the reference
        "single a man",  # shorter, but not in that order
        "",
    ]
    assert contamination(items, reference) == [True, False, True, False, False]
    assert contamination(items[:2], reference, n=5) == [True, True]  # 5-grams match the second
    # a list of documents: n-grams do not run across two documents
    a, b = " ".join(TEXT.split()[:8]), " ".join(TEXT.split()[8:16])
    assert contamination([thirteen], [a, b]) == [False] and contamination(
        [thirteen], [a + " " + b]
    ) == [True]
    assert contamination(["man in possession"], [a, b]) == [True]
    assert contamination(["fortune must"], [a, b]) == [False]  # across the documents' boundary
    with pytest.raises(ValueError, match="items is a string"):
        contamination("a b c", reference)


def test_question_items_formats(model, tok):
    item = dict(question="Whom does Emma marry?", choices=["Mr. Knightley", "Mr. Elton"], label=1)
    harness = question_items(tok, [item])[0]
    assert (harness["context"], harness["choices"]) == as_choice_item(item) and harness[
        "label"
    ] == 1
    assert question_items(tok, [item], "Q/A")[0]["context"] == "Q: Whom does Emma marry?\nA:"
    assert question_items(tok, [item], "bare")[0]["context"] == "Whom does Emma marry?"
    chat = question_items(tok, [item], "chat")[0]
    assert chat["choices"] == item["choices"] and isinstance(chat["context"], list)
    assert tok.decode(chat["context"]) == "<|user|>Whom does Emma marry?<|end|><|assistant|>"
    assert set(QUESTION_FORMATS) == {"Question/Answer", "Q/A", "bare", "chat"}
    for fmt in QUESTION_FORMATS:  # every format scores
        r = multiple_choice_accuracy(model, tok, question_items(tok, [item], fmt), pmi=False)
        assert r["n"] == 1 and r["chance"] == 0.5
    with pytest.raises(ValueError, match="prompt_format='QA'"):
        question_items(tok, [item], "QA")


def test_every_function_keeps_its_tensors_where_the_model_is(model, tok, strict_device):
    items = [dict(context="It is a truth", choices=[" universally", " fortune"], label=0)]
    with strict_device():
        assert len(score_choices(model, tok, "It is a truth", [" universally", " a"])) == 2
        assert multiple_choice_accuracy(model, tok, items)["n"] == 1
        assert sliding_window_bpc(model, tok, TEXT * 2, stride=8)["tokens"] > 0
        assert task_accuracy(model, tok, [dict(prompt="Hi", response="a")], 3)["n"] == 1
        assert len(completion_sampler(model, tok, max_new_tokens=4)("def f():", 2)) == 2
