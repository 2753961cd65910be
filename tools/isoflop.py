"""IsoFLOP runs for the compute chapter: for a few compute budgets C, train several small GPTs whose
parameters N and training tokens D satisfy 6·N·D ≈ C; record each one's validation loss.

    OMP_NUM_THREADS=1 nice -n 10 python tools/isoflop.py nbs/results/isoflop.json

Character tokens of the Austen corpus, context 64, batch 16, AdamW at one peak learning rate with a
warmup of a tenth of the steps and a cosine decay to a tenth of the peak over each run's own length
(as Chinchilla matched the schedule to each run). Every model starts from the same seed and sees the
same batches in the same order (a run with fewer steps sees a prefix of a longer one's batches). The
JSON (written atomically after every run; run the command again to resume a stopped sweep: it keeps
the finished runs made with the same settings) holds one record per run: budget, layers, width, N
(all parameters; the character embedding is tiny), N without the embeddings, D, steps, C = 6·N·D,
validation loss and seconds. About ten minutes on one thread of a busy machine.
"""

import json
import platform
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastcore.script import call_parse

from minillm.data import atomic_write_text, load_corpus, train_val_split
from minillm.model import GPT, GPTConfig, n_params
from minillm.tokenizer import load_or_train_tokenizer
from minillm.train import TrainConfig, train

# compute budget (FLOPs, 6·N·D) -> model shapes (layers, width) trained at it: about ten times in N
# around the best size; no run reads the training text more than MAX_EPOCHS times
PLAN = {
    3e10: [(1, 12), (1, 16), (1, 24), (1, 32), (2, 32)],
    1e11: [(1, 16), (1, 24), (1, 32), (2, 32), (2, 48)],
    3e11: [(1, 16), (1, 24), (1, 32), (2, 32), (2, 48)],
}
MAX_EPOCHS = 3
BATCH, CONTEXT, N_HEAD = 16, 64, 4


def run_one(n_layer, n_embd, budget, train_tok, val_tok, vocab_size, lr, seed, eval_batches):
    cfg = GPTConfig(
        vocab_size=vocab_size,
        context_length=CONTEXT,
        n_layer=n_layer,
        n_head=N_HEAD,
        n_embd=n_embd,
    )
    N = n_params(cfg)
    steps = max(1, round(budget / (6 * N * BATCH * CONTEXT)))
    D = steps * BATCH * CONTEXT
    if D > MAX_EPOCHS * len(train_tok):
        raise ValueError(
            f"{n_layer}x{n_embd} at C={budget:.0e}: {D:,} tokens > {MAX_EPOCHS} epochs"
        )
    torch.manual_seed(seed)
    model = GPT(cfg)
    tc = TrainConfig(
        batch_size=BATCH,
        context_length=CONTEXT,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        lr=lr,
        min_lr=lr / 10,
        eval_interval=steps,
        eval_batches=eval_batches,
        checkpoint_interval=steps,
        seed=seed,
    )
    t = time.perf_counter()
    val_loss = train(model, train_tok, val_tok, tc, progress=False)[-1]["val_loss"]
    return dict(
        budget=budget,
        n_layer=n_layer,
        n_embd=n_embd,
        N=N,
        N_non_embedding=n_params(cfg, non_embedding=True),
        D=D,
        steps=steps,
        C=6 * N * D,
        val_loss=round(float(val_loss), 5),
        seconds=round(time.perf_counter() - t, 1),
    )


@call_parse
def main(
    out: str,  # the JSON file to write, e.g. nbs/results/isoflop.json
    lr: float = 1e-2,  # peak learning rate
    seed: int = 0,
    eval_batches: int = 50,  # validation batches of 16 × 64
    budgets: Annotated[float, "a subset of the planned budgets", dict(nargs="*")] = None,
):
    argv = sys.argv[1:]
    torch.set_num_threads(1)
    budgets = budgets or list(PLAN)
    if unknown := [b for b in budgets if b not in PLAN]:
        sys.exit(f"no plan for budgets {unknown}; planned: {list(PLAN)}")
    train_text, val_text = train_val_split(load_corpus())
    tok = load_or_train_tokenizer(kind="char", vocab_size=None)
    train_tok = np.array(tok.encode(train_text), dtype=np.uint16)
    val_tok = np.array(tok.encode(val_text), dtype=np.uint16)
    record = dict(
        command="OMP_NUM_THREADS=1 nice -n 10 python tools/isoflop.py " + " ".join(argv),
        tokenizer="char",
        vocab_size=tok.vocab_size,
        batch_size=BATCH,
        context_length=CONTEXT,
        n_head=N_HEAD,
        lr=lr,
        min_lr=lr / 10,
        seed=seed,
        eval_batches=eval_batches,
        train_tokens=len(train_tok),
        torch=torch.__version__,
        machine=platform.machine(),
        runs=[],
    )
    settings = {k: v for k, v in record.items() if k not in ("command", "torch", "machine", "runs")}
    done = {}
    # resume: keep the runs a stopped sweep finished with these settings
    if Path(out).exists():
        old = json.loads(Path(out).read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            done = {(r["budget"], r["n_layer"], r["n_embd"]): r for r in old["runs"]}
    for budget in budgets:
        for n_layer, n_embd in PLAN[budget]:
            if (budget, n_layer, n_embd) in done:
                record["runs"].append(done[budget, n_layer, n_embd])
                atomic_write_text(out, json.dumps(record, indent=1) + "\n")
                continue
            r = run_one(
                n_layer,
                n_embd,
                budget,
                train_tok,
                val_tok,
                tok.vocab_size,
                lr,
                seed,
                eval_batches,
            )
            record["runs"].append(r)
            atomic_write_text(out, json.dumps(record, indent=1) + "\n")
            print(
                f"C={budget:.0e} {n_layer}x{n_embd:<3d} N={r['N']:>7,} D={r['D']:>9,} "
                f"D/N={r['D'] / r['N']:6.1f} loss {r['val_loss']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
