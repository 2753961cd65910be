"""A small recorded sweep of training recipes for quality per compute: each variant of the
`austen-tiny` preset trains from scratch on the same compute, scored in bits/char on the whole
validation split, exactly as `benchmarks/quality.py` scores ours.

The budget is FLOPs, not seconds: the machine the book is written on is shared, and a wall-clock
budget there measures the neighbours' load as much as the recipe (one 200-second run of
`austen-tiny` under a load of 4 to 7 on 2 cores got 193 steps and ran 822 s). Each variant gets as
many steps as its training FLOPs per step (`flops_per_token(cfg, T, training=True)` times the tokens
of a step) allow within `--base-steps` steps of `austen-tiny`, so its result does not depend on the
load or the thread count; the winner (BPE-2048 + batch 8, now the preset `austen-budget` of
`minillm.train.PRESETS`) is then checked against nanoGPT on the wall clock by `benchmarks/quality.py
--nanogpt-dir DIR --preset austen-budget`. One factor at a time (learning rate, tokenizer size,
batch and context, width), then the factors that helped, combined. Each run appends its record to
`--out` (default `nbs/results/quality_sweep.json`) as soon as it ends. The tokenizers are trained
(or read from the cache) first, as nanoGPT's `prepare.py` runs before its `train.py`.

    .venv/bin/python benchmarks/quality_sweep.py [--base-steps 400] [--threads 1] [--only A,B]
        [--out nbs/results/quality_sweep.json]
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from fastcore.script import call_parse

from minillm.data import atomic_write_text
from minillm.model import GPTConfig, flops_per_token
from minillm.tokenizer import load_or_train_tokenizer
from minillm.train import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from quality import run  # noqa: E402  (the same clock and scoring as the benchmark)

# name: (tokenizer, model, train) overrides of austen-tiny
VARIANTS = {
    "austen-tiny": ({}, {}, {}),
    "lr 5e-3": ({}, {}, dict(lr=5e-3, min_lr=5e-4)),
    "BPE-2048": (dict(vocab_size=2048), {}, {}),
    "batch 8": ({}, {}, dict(batch_size=8)),
    "context 64 + batch 32": ({}, dict(context_length=64), dict(context_length=64, batch_size=32)),
    "width 192": ({}, dict(n_embd=192, n_head=4), {}),
    # the two factors that helped, combined
    "BPE-2048 + batch 8": (dict(vocab_size=2048), {}, dict(batch_size=8)),
    "BPE-2048 + batch 4": (dict(vocab_size=2048), {}, dict(batch_size=4)),
    "BPE-4096 + batch 8": (dict(vocab_size=4096), {}, dict(batch_size=8)),
}


def variant(name: str):
    "The preset `austen-tiny` with the overrides of `VARIANTS[name]`."
    tok, model, train = VARIANTS[name]
    p = copy.deepcopy(PRESETS["austen-tiny"])
    p.tokenizer |= tok
    p.model |= model
    p.train |= train
    return p


def step_flops(p, vocab_size: int) -> float:
    "Training FLOPs of one optimizer step of preset `p`."
    cfg = GPTConfig(**p.model, vocab_size=vocab_size)
    t = p.train
    tokens = t.get("batch_size", 16) * t["context_length"] * t.get("grad_accum", 1)
    return flops_per_token(cfg, t["context_length"], training=True) * tokens


@call_parse
def main(
    base_steps: int = 400,  # the compute of this many austen-tiny steps, for every variant
    threads: int = 1,  # torch CPU threads (the result does not depend on them)
    only: str = None,  # comma-separated variant names (default: all)
    out: str = "nbs/results/quality_sweep.json",  # where the records go (appended)
):
    torch.set_num_threads(threads)
    names = only.split(",") if only else list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    toks = {n: load_or_train_tokenizer(**variant(n).tokenizer) for n in names}  # before the clocks
    base = PRESETS["austen-tiny"]
    budget = base_steps * step_flops(base, load_or_train_tokenizer(**base.tokenizer).vocab_size)
    path = Path(out)
    records = json.loads(path.read_text())["runs"] if path.exists() else []
    for name in names:
        p = variant(name)
        steps = round(budget / step_flops(p, toks[name].vocab_size))
        load = os.getloadavg()[0]
        r = run(p, None, 0, max_steps=steps)
        rec = dict(
            name=name,
            flops=budget,
            steps=steps,
            tokens=r["tokens"],
            bits_per_char=round(r["bits_per_char"], 4),
            seconds=round(r["seconds"], 1),
            threads=threads,
            load_before=round(load, 2),
            tokenizer=p.tokenizer,
            model=p.model,
            train={k: v for k, v in p.train.items() if k not in ("max_steps",)},
            when=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        )
        records.append(rec)
        command = ".venv/bin/python benchmarks/quality_sweep.py " + " ".join(sys.argv[1:])
        atomic_write_text(path, json.dumps({"command": command, "runs": records}, indent=1) + "\n")
        print(
            f"{name:<24} {steps:6,d} steps {rec['bits_per_char']:.3f} bits/char "
            f"({rec['seconds']:.0f} s, load {load:.1f})",
            flush=True,
        )
