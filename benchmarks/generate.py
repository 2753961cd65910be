"""Tokens per second of generation at batch 1 on a CPU: our `generate` with and without the KV
cache, beside nanoGPT's.

The model of issue 4: the 0.8 M-parameter character model (4 layers, 4 heads, 128 dimensions, 81
characters; 803,712 parameters without the position table, as nanoGPT counts), untrained (speed does
not depend on the weights), with a context of 1,024 so that the prompt and 512 new tokens fit. The
reference is nanoGPT's `generate` (no cache: each step runs the model on the whole text) on the same
architecture, re-implemented in `benchmarks/train_step.py`; we time it both with the same context of
1,024 and with the context of 64 of the training-step benchmark, where it crops the text to 64
tokens and each step is cheaper.

Ours decodes greedily (`temperature=0`); nanoGPT's `generate` always samples (its per-step cost is
the same forward pass). Each measurement is the best of `--repeat` runs (the machine is shared: the
best run is the least disturbed), at each thread count of `--threads`. We also check that greedy
output is identical with and without the cache.

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--repeat 3] [--threads 1,2]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from minillm.generate import generate
from minillm.model import GPT, GPTConfig, n_params

sys.path.insert(0, str(Path(__file__).parent))
from train_step import NanoGPT  # noqa: E402  (the reference model)

VOCAB, PROMPT = 81, 10


def tokens_per_s(fn, n, repeat):
    fn(8)  # warm up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t)
    return n / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = ap.parse_args()
    n = args.new_tokens
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=1024, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg).eval()
    refs = {ctx: NanoGPT(VOCAB, ctx, 4, 4, 128).eval() for ctx in (1024, 64)}
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    same = torch.equal(
        generate(model, prompt, n, temperature=0),
        generate(model, prompt, n, temperature=0, use_cache=False),
    )
    print(
        f"generation at batch 1: {n_params(cfg, non_embedding=True):,}-parameter model "
        f"(non-embedding; {n_params(cfg):,} in all), context {cfg.context_length}, "
        f"prompt {PROMPT} tokens, {n} new tokens, best of {args.repeat}; "
        f"torch {torch.__version__}; "
        f"load average {' '.join(f'{l:.2f}' for l in os.getloadavg())}"
    )
    print(f"greedy output identical with and without the KV cache: {same}")
    print(
        f"{'threads':>7s}{'ours, cache':>13s}{'ours, no cache':>16s}{'cache speed-up':>16s}"
        f"{'nanoGPT ctx 1024':>18s}{'nanoGPT ctx 64':>16s}   (tokens/s)"
    )
    verdicts = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        cached = tokens_per_s(lambda k: generate(model, prompt, k, temperature=0), n, args.repeat)
        uncached = tokens_per_s(
            lambda k: generate(model, prompt, k, temperature=0, use_cache=False), n, args.repeat
        )
        nano = {
            ctx: tokens_per_s(lambda k, m=m: m.generate(prompt, k), n, args.repeat)
            for ctx, m in refs.items()
        }
        print(
            f"{threads:>7d}{cached:>13,.0f}{uncached:>16,.0f}{cached / uncached:>15.1f}x"
            f"{nano[1024]:>18,.0f}{nano[64]:>16,.0f}"
        )
        verdicts.append(
            f"{threads} thread{'s' if threads > 1 else ''}: "
            f"{'met' if same and cached >= 2000 and cached >= 5 * uncached else 'NOT met'}"
        )
    print(
        "targets (identical output, >= 2,000 tokens/s with the cache, >= 5x the no-cache path): "
        + "; ".join(verdicts)
    )


if __name__ == "__main__":
    main()
