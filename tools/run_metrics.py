"""Summarise a training run directory — finished or stopped part-way — into a small JSON file the
book can read.

    python tools/run_metrics.py RUN_DIR OUT.json [--note TEXT]

Reads the run's last checkpoint (`RUN_DIR/ckpt`: weights and state.json with the evaluation history
and samples), takes bits per character on the whole validation split from the run's `metrics.json`
when the run finished (or measures it, when it was stopped), and writes the history, the final
numbers, the model and training configs, the parameter count, tokens seen, wall time and hardware.
The checkpoint itself stays out of git.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from fastcore.script import call_parse

from minillm.data import atomic_write_text, load_corpus, train_val_split
from minillm.train import evaluate_bpc, find_checkpoint, load_run
from minillm.train import hardware as this_machine


@call_parse
def main(
    run_dir: str,  # the run directory (with ckpt/)
    out: str,  # the JSON file to write
    note: str = "",  # a note stored with the numbers
    hardware: str = "",  # what trained it, for a run stopped part-way (empty: this machine)
):
    run = Path(run_dir)
    ckpt = find_checkpoint(run / "ckpt")
    if ckpt is None:
        sys.exit(f"{run}: no checkpoint in {run / 'ckpt'}")
    state = json.loads((ckpt / "state.json").read_text())
    model, tok = load_run(run)
    done = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    # a finished run: its own final evaluation
    if done.get("history", [{}])[-1].get("step") == state["step"]:
        final, hw = done["final"], done["hardware"]
    else:  # stopped part-way: evaluate its last checkpoint here
        final, hw = (
            evaluate_bpc(model, tok, train_val_split(load_corpus())[1]),
            hardware or this_machine("cpu"),
        )
    cfg = state["train_config"]
    summary = {
        "note": note,
        "step": state["step"],
        "max_steps": cfg["max_steps"],
        "seconds": state["seconds"],
        "tokens": state["step"] * cfg["batch_size"] * cfg["grad_accum"] * cfg["context_length"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "model_config": asdict(model.config),
        "train_config": cfg,
        "history": state["history"],
        "final": final,
        "hardware": hw,
        "torch": torch.__version__,
    }
    atomic_write_text(Path(out), json.dumps(summary, indent=1))
    step, bpc = f"{summary['step']}/{summary['max_steps']}", final["bits_per_char"]
    print(f"{out}: step {step}, {bpc:.3f} bits/char")
