"""Our BPE trainer beside Hugging Face `tokenizers` (Rust), and tiktoken encoding beside our
pure-Python reference.

Both trainers see the same text, the same split pattern and the same vocabulary size, special tokens
included. With `--pattern gpt4` (our default) HF gets GPT-4's pattern as a `Split` pre-tokenizer
followed by `ByteLevel` without its own regex; with `--pattern gpt2` HF uses its standard
`ByteLevel` pre-tokenizer, whose regex is GPT-2's. Time is wall-clock, best of `--repeat` runs (the
machine is shared: the best run is the least disturbed one). Compression is bytes per token on the
validation split, for tokenizers trained on the training split.

    .venv/bin/python benchmarks/tokenizer.py [--sizes 512,1024,4096,8192] [--repeat 3] [--pattern
    gpt4|gpt2]
"""

import os
import time

from fastcore.script import call_parse

from minillm.data import load_corpus, train_val_split
from minillm.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    BPETokenizer,
    bytes_to_unicode,
)

PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN}


def best_time(f, repeat: int):
    "The result of `f()` and its best wall-clock time over `repeat` runs."
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def hf_train(text: str, vocab_size: int, pattern: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # HF's standard byte-level BPE: ByteLevel splits with GPT-2's regex itself
    if pattern == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return tok


def hf_vocab(tok) -> set[bytes]:
    "HF's tokens as bytes (it writes them in GPT-2's printable alphabet), special tokens left out."
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in t) for t in tok.get_vocab() if t not in SPECIAL_TOKENS}


@call_parse
def main(
    sizes: str = "512,1024,4096,8192",  # vocabulary sizes, special tokens included
    repeat: int = 3,  # timing runs per measurement; the best is reported
    pattern: str = "gpt4",  # the split pattern of both trainers: gpt4 or gpt2
):
    if pattern not in PATTERNS:
        raise SystemExit(f"--pattern {pattern}: expected one of {sorted(PATTERNS)}")
    text = load_corpus()
    train, val = train_val_split(text)
    val_bytes = len(val.encode("utf-8"))
    try:
        import tokenizers

        have_hf = True
    except ImportError:
        have_hf = False
    print(
        f"corpus: {len(text):,} characters (train {len(train):,}, validation {len(val):,}); "
        f"{os.cpu_count()} CPUs; "
        f"HF tokenizers {tokenizers.__version__ if have_hf else 'not installed'}; "
        f"split pattern: {pattern.upper()}"
    )
    print()
    print(
        "training on the full corpus (time) and on the training split "
        "(compression: validation bytes per token)"
    )
    head = (
        f"{'vocab':>6} {'ours s':>8} {'HF s':>8} {'ours B/tok':>11} {'HF B/tok':>9} {'diff':>7} "
        f"{'same tokens':>12}"
    )
    print(head)
    print("-" * len(head))
    results = {}
    for v in [int(s) for s in sizes.split(",")]:
        _, ours_s = best_time(lambda: BPETokenizer(PATTERNS[pattern]).train(text, v), repeat)
        ours = BPETokenizer(PATTERNS[pattern]).train(train, v)
        ours_bpt = val_bytes / len(ours.encode(val))
        row = f"{v:>6,} {ours_s:>8.2f}"
        if have_hf:
            _, hf_s = best_time(lambda: hf_train(text, v, pattern), repeat)
            hf = hf_train(train, v, pattern)
            hf_bpt = val_bytes / len(hf.encode(val).ids)
            same = len(hf_vocab(hf) & set(ours.vocab.values()))
            row += (
                f" {hf_s:>8.2f} {ours_bpt:>11.3f} {hf_bpt:>9.3f} {ours_bpt / hf_bpt - 1:>+7.2%} "
                f"{same:>5,}/{len(ours.vocab):<6,}"
            )
        else:
            row += f" {'-':>8} {ours_bpt:>11.3f} {'-':>9} {'-':>7} {'-':>12}"
        print(row, flush=True)
        results[v] = ours
    print()
    tok = results.get(4096) or next(iter(results.values()))
    enc = tok.to_tiktoken()
    enc.encode_ordinary("warm up")
    ids, tt_s = best_time(lambda: tok.encode(val), repeat)
    ref, ref_s = best_time(lambda: tok.encode_reference(val), 1)
    assert ids == ref, "tiktoken and the reference encoder disagree"
    print(
        f"encoding the validation split ({val_bytes / 1e6:.2f} MB) with vocab {tok.vocab_size:,}, "
        "one thread:"
    )
    print(f"  tiktoken (BPETokenizer.encode)        {val_bytes / tt_s / 1e6:6.1f} MB/s")
    print(
        f"  pure Python (encode_reference)        {val_bytes / ref_s / 1e6:6.2f} MB/s   "
        f"same ids: {ids == ref}"
    )
