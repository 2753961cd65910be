import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second thread only adds synchronisation, which stalls when the
    machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_tok():
    "A small BPE tokenizer (with the chat special tokens) for the fine-tuning and alignment tests."
    from minillm.tokenizer import BPETokenizer

    text = (
        "Which novel is this passage from? Emma. Whom does Emma marry? Mr. Knightley. "
        "Mr. Darcy said so. Bath. "
    )
    return BPETokenizer().train(text * 30, vocab_size=300)


@pytest.fixture
def tiny_gpt(chat_tok):
    "A freshly initialised 2-layer GPT over `chat_tok`'s vocabulary (seeded)."
    import torch

    from minillm.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=chat_tok.vocab_size, n_layer=2, n_head=2, n_embd=32, context_length=64)
    )
