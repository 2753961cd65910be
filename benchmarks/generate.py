"""Tokens per second of generation at batch 1 and 8 on a CPU: our `generate` with and without the KV
cache, beside nanoGPT's.

The model of issue 4: the 0.8 M-parameter character model (4 layers, 4 heads, 128 dimensions, 81
characters; 803,712 parameters without the position table, as nanoGPT counts), untrained (speed does
not depend on the weights), with a context of 1,024 so that the prompt and 512 new tokens fit. The
reference is nanoGPT's `generate` (no cache: each step runs the model on the whole text) on the same
architecture, re-implemented in `benchmarks/train_step.py`; we time it both with the same context of
1,024 and with the context of 64 of the training-step benchmark, where it crops the text to 64
tokens and each step is cheaper.

Ours decodes greedily (`temperature=0`); nanoGPT's `generate` always samples (its per-step cost is
the same forward pass). Each measurement runs `--repeat` rounds, ours and nanoGPT's taking turns
within a round so that they see the same load, and reports the best run (the machine is shared: the
best run is the least disturbed) and, after the slash, the median, at each thread count of
`--threads` and each batch size of `--batch` (tokens/s counts the tokens of all rows; the nanoGPT
columns are measured at batch 1 only). We also check that greedy output is identical with
and without the cache, at every batch size.

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--repeat 3] [--threads 1,2]
        [--batch 1,8]
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from fastcore.script import call_parse

from minillm.generate import generate
from minillm.model import GPT, GPTConfig, n_params

sys.path.insert(0, str(Path(__file__).parent))
from train_step import NanoGPT  # noqa: E402  (the reference model)

VOCAB, PROMPT = 81, 10


def race(fns: dict, n: int, repeat: int) -> dict:
    """(best, median) tokens per second of each `fn(n)` of `fns`, which makes `n` tokens, over
    `repeat` rounds in which the functions take turns (so that they see the same machine load)."""
    for fn in fns.values():
        fn(8)  # warm up
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(n)
            times[name].append(time.perf_counter() - t)
    return {name: (n / min(t), n / statistics.median(t)) for name, t in times.items()}


def cell(r, width):
    "A (best, median) pair as `best/median`, right-aligned."
    return f"{f'{r[0]:,.0f}/{r[1]:,.0f}':>{width}s}" if r else f"{'—':>{width}s}"


@call_parse
def main(
    new_tokens: int = 512,  # tokens generated per run
    repeat: int = 3,  # rounds; best and median reported
    threads: str = "1,2",  # comma-separated thread counts
    batch: str = "1,8",  # comma-separated batch sizes
):
    n = new_tokens
    batches = [int(b) for b in batch.split(",")]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=1024, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg).eval()
    refs = {ctx: NanoGPT(VOCAB, ctx, 4, 4, 128).eval() for ctx in (1024, 64)}
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, VOCAB, (b, PROMPT), generator=g) for b in batches}
    same = all(
        torch.equal(
            generate(model, p, n, temperature=0),
            generate(model, p, n, temperature=0, use_cache=False),
        )
        for p in prompts.values()
    )
    print(
        f"generation: {n_params(cfg, non_embedding=True):,}-parameter model "
        f"(non-embedding; {n_params(cfg):,} in all), context {cfg.context_length}, "
        f"prompt {PROMPT} tokens, {n} new tokens, best/median of {repeat}; "
        f"torch {torch.__version__}; "
        f"load average {' '.join(f'{l:.2f}' for l in os.getloadavg())}"
    )
    print(f"greedy output identical with and without the KV cache: {same}")
    print(
        f"{'threads':>7s}{'batch':>6s}{'ours, cache':>14s}{'ours, no cache':>16s}"
        f"{'speed-up':>9s}{'nanoGPT ctx 1024':>18s}{'nanoGPT ctx 64':>16s}"
        "   (tokens/s, best/median)"
    )
    verdicts = []
    for n_threads in (int(t) for t in threads.split(",")):
        torch.set_num_threads(n_threads)
        for b, prompt in prompts.items():
            fns = {
                "cache": lambda k: generate(model, prompt, k, temperature=0),
                "no cache": lambda k: generate(model, prompt, k, temperature=0, use_cache=False),
            }
            if b == 1:  # nanoGPT's columns: batch 1 only
                fns |= {ctx: lambda k, m=m: m.generate(prompt, k) for ctx, m in refs.items()}
            r = race(fns, n, repeat)
            cached, uncached = r["cache"], r["no cache"]
            nano = {ctx: r.get(ctx) for ctx in refs}
            cached, uncached = [(b * x, b * y) for x, y in (cached, uncached)]  # all rows
            print(
                f"{n_threads:>7d}{b:>6d}{cell(cached, 14)}{cell(uncached, 16)}"
                f"{cached[0] / uncached[0]:>8.1f}x{cell(nano[1024], 18)}{cell(nano[64], 16)}"
            )
            if b == 1:
                met = same and cached[0] >= 2000 and cached[0] >= 5 * uncached[0]
                plural = "s" if n_threads > 1 else ""
                verdicts.append(f"{n_threads} thread{plural}: {'met' if met else 'NOT met'}")
    print(
        "targets at batch 1 (identical output, >= 2,000 tokens/s with the cache, "
        ">= 5x the no-cache path): " + "; ".join(verdicts)
    )
