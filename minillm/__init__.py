"""Pride and Parameters: the GPT-style language model a book builds from scratch, trained on Jane Austen

Modules:

- `minillm.align`: The instruction-tuned model answers in the right form but often wrongly. Alignment trains it on which answers are *better*: a reward model learns preferences, PPO optimises the model against it while a penalty keeps it close to where it started, and DPO gets there from the same preferences without a reward model or sampling; where answers can be checked, GRPO trains on the check itself.
- `minillm.attention`: Self-attention built up one checked step at a time, from a weightless dot product to PyTorch's fused kernel, with the grouped-query attention and the KV cache the model uses.
- `minillm.chat`: A chat is a loop around generation: the conversation written in the chat template, cut to fit the context window by dropping whole turns, a reply streamed until the model writes `<|end|>`, and a prompt that survives bad input and Ctrl-C.
- `minillm.cli`: The command line: `minillm train`, `minillm sample` and `minillm tokenize` for runs too long for a notebook; `minillm chat` and `minillm eval` for the tuned model.
- `minillm.compute`: What training costs, from first principles: FLOPs ≈ 6·N·D, the memory per parameter, Chinchilla's 20 tokens per parameter, GPU-hours and dollars at a stated utilisation; our runs' measured MFU; power-law fits for a small scaling law, and the compute-optimal model size, by Kaplan's, Chinchilla's and our own measurements.
- `minillm.data`: Where the text comes from, how we get it without surprises, what it looks like, and the split every later chapter uses.
- `minillm.distributed`: Data parallelism with `torch.distributed`: several processes, each on its own batch, kept identical by AllReduce, launched by `torchrun` on one machine or many. Explained and measured beside it: mixed precision (why bf16 and not fp16), `torch.compile`, and FSDP for a model that no longer fits.
- `minillm.embeddings`: From token ids to the (B, T, C) tensor a transformer reads: sliding windows, batches, token embeddings, and three ways to encode position.
- `minillm.evaluate`: Bits per character on held-out text; multiple choice by likelihood (acc, acc_norm, acc_pmi) with standard errors; generated answers checked exactly; pass@k on code; one suite and one table for every model.
- `minillm.finetune`: The pretrained model continues text. Fine-tuning teaches it a job: a head that names a passage's novel, a chat template and a loss on the answer only that make it answer questions, and low-rank adapters (LoRA) that do the same by training 7% of the parameters.
- `minillm.generate`: From logits to text: greedy decoding, temperature, top-k and top-p sampling, stop tokens and seeds, streaming, long prompts, and a KV cache that makes each new token cost one token's work.
- `minillm.model`: One config, one `GPT` class, two families — GPT-2 and Llama — with parameter, FLOP and memory counts checked against the real model, and weights read from and written to Hugging Face's format.
- `minillm.sandbox`: Scoring generated code by running it: HumanEval-style problems, the unbiased pass@k estimator, and a sandbox that runs untrusted completions in a limited child process.
- `minillm.tasks`: Fine-tuning, alignment and evaluation need examples with answers. We cannot download any, so we make them from the six novels, in code: which novel a passage comes from, who speaks a line, how a passage goes on, and a small table of facts. Every answer can be checked by code.
- `minillm.tokenizer`: Turning text into the integers a model reads: characters, bytes, byte-pair encoding learned from Austen in seconds, tiktoken-speed encoding, special tokens, and the chat template that writes a conversation as one sequence.
- `minillm.train`: The loss and what it means in bits per character; the training loop (AdamW, warmup and cosine decay, clipping, accumulation, bf16); checkpoints that resume exactly; presets and a trained model in one call."""

__version__ = "0.1.0"
