"""Data made from the novels (minillm.tasks): splits, answers, conversations, preference pairs,
multiple-choice items and JSON-lines records."""

import json
import warnings

import pytest

from minillm.data import TITLES, load_novels
from minillm.tasks import (
    NOVEL_KEYS,
    SPEAKER_PROMPT,
    RecordError,
    as_chat,
    check_answer,
    clean,
    continuation_choices,
    fact_choices,
    fact_questions,
    instruction_examples,
    novel_examples,
    novel_part,
    preference_pairs,
    read_jsonl,
    speaker_examples,
    write_jsonl,
)


def test_novel_parts_cover_each_novel_and_test_passages_are_unseen():
    novels = load_novels()
    for k in NOVEL_KEYS:
        assert novel_part(novels[k], "train") + novel_part(novels[k], "test") == novels[k]
    test = novel_examples("test", n_per_novel=20)
    assert sorted({e["label"] for e in test}) == list(range(6))
    assert not any(e["text"] in clean(novel_part(novels[e["novel"]], "train")) for e in test)
    assert novel_examples("test", n_per_novel=20) == test  # deterministic
    assert novel_examples("test", n_per_novel=20, seed=1) != test
    with pytest.raises(ValueError, match="split='dev'"):
        novel_examples("dev")


def test_speakers_in_test_were_seen_in_training():
    train, test = speaker_examples("train"), speaker_examples("test")
    assert test and {e["speaker"] for e in test} <= {e["speaker"] for e in train}


def test_check_answer():
    assert check_answer(" Mr.  Darcy. ", "mr. darcy")
    assert check_answer("Emma!", "Emma")
    assert not check_answer("Darcy", "Mr. Darcy")
    assert not check_answer("", "Emma")


def test_records_are_two_turn_conversations():
    r = dict(prompt="Who?", response="Mr. Darcy", task="fact")
    assert as_chat(r) == [
        dict(role="user", content="Who?"),
        dict(role="assistant", content="Mr. Darcy"),
    ]


def test_preference_pairs_reject_a_wrong_answer_of_the_same_task():
    records = instruction_examples("test", n_per_novel=5, n_continue=3)
    pairs = preference_pairs(records)
    assert len(pairs) == sum(r["task"] != "continue" for r in records)
    titles = set(TITLES.values())
    novel_of = {
        (SPEAKER_PROMPT + f'"{e["text"]}"', e["speaker"]): e["novel"]
        for e in speaker_examples("test")
    }
    speakers_of = {}
    for e in speaker_examples("train"):
        speakers_of.setdefault(e["novel"], set()).add(e["speaker"])
    kind_of = {f["answer"]: f["kind"] for f in fact_questions()}
    for p in pairs:
        assert not check_answer(p["rejected"], p["chosen"])
        if p["task"] == "novel":
            assert p["rejected"] in titles
        if p["task"] == "speaker":  # another speaker of the same novel
            assert p["rejected"] in speakers_of[novel_of[p["prompt"], p["chosen"]]]
    train_pairs = preference_pairs(instruction_examples("train", n_per_novel=5, n_continue=3))
    facts = [p for p in train_pairs if p["task"] == "fact"]
    assert facts and all(kind_of[p["rejected"]] == kind_of[p["chosen"]] for p in facts)
    unknown = [dict(prompt="Who?", response="Emma", task="speaker")] * 2
    unknown += [dict(prompt="Who else?", response="Anne", task="speaker")]
    assert [p["rejected"] for p in preference_pairs(unknown)] == ["Anne", "Anne", "Emma"]


def test_multiple_choice_items():
    text = clean(load_novels()["emma"])[:50_000]
    items = continuation_choices(text, n=20)
    for it in items:
        assert len(it["choices"]) == 4 and (it["context"] + it["choices"][it["label"]]) in text
    for it in fact_choices():
        assert len(set(it["choices"])) == 4


def test_jsonl_roundtrip_and_bad_lines(tmp_path):
    recs = [dict(prompt="a", response="b"), dict(prompt="ü", response="€")]
    p = write_jsonl(tmp_path / "r.jsonl", recs)
    assert read_jsonl(p) == recs
    p.write_text(
        json.dumps(recs[0]) + "\n[1, 2]\n{bad\n" + json.dumps(dict(prompt="x", response=3)) + "\n\n"
    )
    with pytest.raises(RecordError, match=r"r\.jsonl:2: not a JSON object"):
        read_jsonl(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert read_jsonl(p, on_error="skip") == recs[:1]
    assert [str(x.message).split(": ")[0][-9:] for x in w] == [
        "r.jsonl:2",
        "r.jsonl:3",
        "r.jsonl:4",
    ]
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(p, on_error="ignore")
    # a line that is not UTF-8 is a malformed line like the others: named, or skipped
    good = [json.dumps(r).encode() for r in recs]
    p.write_bytes(good[0] + b'\n{"prompt": "\xff"}\n' + good[1])
    with pytest.raises(RecordError, match=r"r\.jsonl:2: 'utf-8' codec can't decode byte 0xff"):
        read_jsonl(p)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert read_jsonl(p, on_error="skip") == recs
