"""Speed of one training step (forward, backward, AdamW step) of our GPT beside nanoGPT's model, at
the same config.

The config of issue 4: batch 12 x 64 tokens, 4 layers, 4 heads, 128 dimensions, the character
vocabulary of the corpus (81), float32, dropout 0, 2 threads. nanoGPT is not a dependency and is not
downloaded: `NanoGPT` below is a faithful minimal re-implementation of the model in Karpathy's
nanoGPT `model.py` (MIT licence) — one `c_attn` Linear for q, k and v,
`F.scaled_dot_product_attention(is_causal=True)`, `nn.GELU()` (exact), its LayerNorm with a bias
through `F.layer_norm`, learned positions through `nn.Embedding`, tied embeddings, the same
initialisation — and its optimizer as `configure_optimizers` builds it on a CPU: AdamW in two
parameter groups, not fused (nanoGPT fuses only on CUDA). It is the reference, labelled as such in
the output.

With `--nanogpt-dir DIR` (a checkout of karpathy/nanoGPT that you provide; it is never downloaded
here), the reference is nanoGPT's own `model.py` instead, imported from DIR: its `GPT`, `GPTConfig`
(dropout 0, bias True) and `configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")`, in this run.
`--no-bias` builds every model without biases: the config that nanoGPT's CPU recipe actually
trains (its `train.py` defaults to `bias=False`).

Ours: `minillm.model.GPT`, gpt2 family (the same architecture: LayerNorm, exact GELU, biases, tied
embeddings), with `torch.optim.AdamW(fused=True)`; the same without biases (nanoGPT's `train.py`
also defaults to `bias=False`); and the first model's training step through `torch.compile`
(`train(compile=True)` does the same), whose compile time — the first step, all of it — is reported
beside it (`--no-compile` leaves that row out; a later run compiles faster, from the kernels
TorchInductor cached on disk). Then the same two steps in mixed precision, as
`TrainConfig(dtype="bfloat16")` trains: the forward pass under bf16 autocast, while the weights,
their gradients and AdamW's state stay float32, and `CausalSelfAttention` computes its attention in
float32, where PyTorch's fused CPU kernel is faster than in bf16 (`--no-bf16` leaves these rows
out). nanoGPT's `train.py` autocasts to bf16 (fp16 where bf16 is unsupported) on a GPU but runs
float32 on a CPU, so the reference stays float32; a row of nanoGPT's model under bf16 autocast shows
what the same switch gives it. On a CPU with bf16 matrix units (Intel's AMX, which this script
reports) the matrix products run several times faster in bf16; without them, bf16 may well be
slower.

Method: all models take turns, `--rounds` rounds of `--steps` steps each after a warm-up, on the
same batch, so that they see the same machine load; we report the best round (the least disturbed:
the machine is shared) and the median round, and the speed-up of ours over the reference for both.
The compiled model starts from the same weights as the eager one and sees the same batch, so their
losses over the three warm-up steps must agree to rounding: within 1e-5 in float32, 1e-3 in bf16,
and bf16 with float32 within 1e-2 (tolerances set from measured differences, a few times 1e-4 in
bf16); the script prints the largest differences. The target: ours — compiled, as
`train(compile=True)` runs it, or eager with `--no-compile`; in float32 or bf16, whichever is faster
— takes at most `--target` (0.85) times the reference's best-round time, with equal losses; the
script also prints the verdict in float32, and exits with status 1 when the target is missed.

    .venv/bin/python benchmarks/train_step.py [--rounds 20] [--steps 5] [--threads 2] [--scratch]
        [--nanogpt-dir DIR] [--no-compile] [--no-bias] [--no-bf16] [--target 0.85]
"""

import contextlib
import importlib.util
import io
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from fastcore.script import call_parse
from torch import nn

from minillm.model import GPT, GPTConfig, n_params

B, T, N_LAYER, N_HEAD, N_EMBD, VOCAB = 12, 64, 4, 4, 128, 81


# ---------------------------------------------------------------- the reference: nanoGPT's
# model.py, re-implemented
class NanoLayerNorm(nn.Module):
    "nanoGPT: LayerNorm but with an optional bias."

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoMLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(n_embd, bias), NanoAttention(n_embd, n_head, bias)
        self.ln_2, self.mlp = NanoLayerNorm(n_embd, bias), NanoMLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    "The reference: nanoGPT's GPT (model.py), with its `generate` (no KV cache)."

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList([NanoBlock(n_embd, n_head, bias) for _ in range(n_layer)]),
                ln_f=NanoLayerNorm(n_embd, bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = dict(fused=True) if device_type == "cuda" else dict()  # nanoGPT: fused only on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


# ---------------------------------------------------------------- the from-scratch layers of the
# model chapter
class ScratchLayerNorm(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))

    def forward(self, x):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return self.weight * (x - mean) / torch.sqrt(var + 1e-5) + self.bias


def scratch_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def with_scratch_layers(model: GPT) -> GPT:
    "Our model with hand-written LayerNorm and GELU, as in the chapter (and Raschka's book)."
    for parent in [*model.h, model]:
        for name in ("ln_1", "ln_2", "ln_f"):
            if hasattr(parent, name):
                setattr(parent, name, ScratchLayerNorm(model.config.n_embd))
    for block in model.h:
        block.mlp.forward = lambda x, m=block.mlp: m.c_proj(scratch_gelu(m.c_fc(x)))
    return model


# ---------------------------------------------------------------- the real nanoGPT, if given
def load_nanogpt(nanogpt_dir):
    "nanoGPT's `model.py` from a checkout (its `GPT` and `GPTConfig`), imported under another name."
    path = os.path.join(nanogpt_dir, "model.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--nanogpt-dir {nanogpt_dir}: no model.py there (a nanoGPT checkout?)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the benchmark
def make_step(name, x, y, nanogpt=None, bias=True):
    torch.manual_seed(0)
    if name.startswith("nanoGPT") and nanogpt is not None:
        conf = nanogpt.GPTConfig(
            block_size=T, vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
            dropout=0.0, bias=bias,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
            model = nanogpt.GPT(conf)
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    elif name.startswith("nanoGPT"):
        model = NanoGPT(VOCAB, T, N_LAYER, N_HEAD, N_EMBD, bias=bias)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    else:
        cfg = GPTConfig(
            vocab_size=VOCAB,
            context_length=T,
            n_layer=N_LAYER,
            n_head=N_HEAD,
            n_embd=N_EMBD,
            bias=bias and "no bias" not in name,
        )
        model = GPT(cfg)
        if "scratch" in name:
            model = with_scratch_layers(model)
        params = list(model.parameters())
        opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=1e-3,
            betas=(0.9, 0.99),
            fused=True,
        )
    stepper = torch.compile(model) if "compiled" in name else model
    bf16 = name.endswith("bf16")  # as TrainConfig(dtype="bfloat16"): the forward pass autocast

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = stepper(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


@call_parse
def main(
    rounds: int = 20,  # rounds of `steps` steps, the models taking turns
    steps: int = 5,  # steps per round
    threads: int = 2,  # torch CPU threads
    scratch: bool = False,  # also time our model with the chapter's from-scratch LayerNorm and GELU
    nanogpt_dir: str = None,  # a nanoGPT checkout: time its own model.py as the reference
    target: float = 0.85,  # most time per step of ours (best round) / the reference's; exit 1 above
    no_compile: bool = False,  # leave out the row of ours with torch.compile
    no_bias: bool = False,  # every model without biases, as nanoGPT's train.py defaults
    no_bf16: bool = False,  # leave out the rows of ours in bf16 mixed precision
):
    nanogpt = load_nanogpt(nanogpt_dir) if nanogpt_dir else None
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randint(0, VOCAB, (B, T), generator=g),
        torch.randint(0, VOCAB, (B, T), generator=g),
    )
    ref = "nanoGPT model.py (reference)" if nanogpt else "nanoGPT re-impl. (reference)"
    names = (
        [ref]
        + ([] if no_bf16 else ["nanoGPT, bf16 autocast"])
        + ["minillm"]
        + ([] if no_bias else ["minillm, no bias"])
        + ([] if no_compile else ["minillm, compiled"])
        + ([] if no_bf16 else ["minillm, bf16"])
        + ([] if no_bf16 or no_compile else ["minillm, compiled, bf16"])
        + (["minillm, from-scratch LN+GELU"] if scratch else [])
    )
    models, steppers, first, losses = {}, {}, {}, {}
    for name in names:
        models[name], steppers[name] = make_step(name, x, y, nanogpt, bias=not no_bias)
    for name, step in steppers.items():
        t = time.perf_counter()
        losses[name] = [step()]  # the first step: where torch.compile compiles
        first[name] = time.perf_counter() - t
        losses[name] += [step() for _ in range(2)]
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steppers.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t) / steps * 1000)
    cfg = GPTConfig(
        vocab_size=VOCAB, context_length=T, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
        bias=not no_bias,
    )  # fmt: skip
    print(
        f"train step: batch {B} x {T}, {N_LAYER} layers, {N_HEAD} heads, {N_EMBD} dims, "
        f"vocab {VOCAB}, {n_params(cfg):,} parameters, {'no biases, ' if no_bias else ''}"
        f"{'float32' if no_bf16 else 'float32 and bf16 (reference float32)'}, {threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"{rounds} rounds of {steps} steps, models taking turns; load average before: "
        f"{' '.join(f'{l:.2f}' for l in os.getloadavg())}"
    )
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # private; may go away
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, AMX {'yes' if amx else 'no'}")
    if nanogpt is not None:
        print(f"reference: nanoGPT's own model.py from {nanogpt_dir}")
    for name in [n for n in names if "compiled" in n]:
        print(
            f"torch.compile: first step of {name} {first[name]:.1f} s "
            f"(eager first step {first['minillm']:.2f} s)"
        )
    ref_best, ref_med = min(times[names[0]]), statistics.median(times[names[0]])
    print(
        f"{'model':32s}{'best ms/step':>13s}{'median':>9s}{'tokens/s':>10s}"
        f"{'time / reference: best':>24s}{'median':>8s}"
    )
    for name in names:
        best, med = min(times[name]), statistics.median(times[name])
        print(
            f"{name:32s}{best:>13.1f}{med:>9.1f}{B * T / best * 1000:>10,.0f}"
            f"{best / ref_best:>24.3f}{med / ref_med:>8.3f}"
        )
    first3 = [round(v.item(), 5) for v in losses["minillm"]]
    print(f"losses of the first 3 steps, minillm: {first3}")
    same = {"minillm": True, "minillm, bf16": True}  # the same weights and batch: the same losses
    for name, base, tol in (
        ("minillm, compiled", "minillm", 1e-5),
        ("minillm, bf16", "minillm", 1e-2),
        ("minillm, compiled, bf16", "minillm, bf16", 1e-3),
    ):
        if name in losses:
            diff = (torch.stack(losses[name]) - torch.stack(losses[base])).abs().max().item()
            same[name] = diff <= tol
            print(
                f"  {name} against {base}: largest difference {diff:.1e} "
                f"({'equal' if same[name] else 'NOT equal'} within {tol:.0e})"
            )
    ratio = {n: min(times[n]) / ref_best for n in names[1:]}
    candidates = [n for n in ("minillm, compiled", "minillm, compiled, bf16") if n in times]
    candidates = candidates or [n for n in ("minillm", "minillm, bf16") if n in times]
    ours = min(candidates, key=ratio.get)  # as train() runs it: the faster precision
    ok = ratio[ours] <= target and same[ours] and (same["minillm, bf16"] or "bf16" not in ours)
    precisions = "ours bf16, the reference float32" if "bf16" in ours else "both float32"
    print(
        f"target: ours / reference ≤ {target:.2f} (best round), the same losses — "
        f"{'met' if ok else 'NOT met'} by {ours} ({ratio[ours]:.3f}: {precisions})"
    )
    if ours.endswith("bf16"):  # the verdict in the reference's own arithmetic, float32
        f32 = candidates[0]
        print(
            f"  in float32, the reference's arithmetic: {f32} {ratio[f32]:.3f} "
            f"({'met' if ratio[f32] <= target and same[f32] else 'NOT met'}); against nanoGPT "
            f"in bf16 autocast: {min(times[ours]) / min(times['nanoGPT, bf16 autocast']):.3f}"
        )
    if not ok:
        raise SystemExit(1)
