"""Fixtures shared by the unit tests, and the `models` marker.

A test that needs the trained models (`pretrained(...)`, `instruction_tuned()`: minutes of training
on a fresh machine, then cached) is marked `models`, so that `make test-fast`
(`pytest -m "not models"`) runs on a fresh clone without them. Mark such a test yourself with
`@pytest.mark.models`, or let `pytest_collection_modifyitems` below do it: a test is marked when a
fixture it uses (directly or through other fixtures) calls `pretrained(` or `instruction_tuned(`,
or when the test itself calls them by name (not as `module.pretrained(`, which a test that
monkeypatches the training calls)."""

import functools
import inspect
import re

import pytest
import torch

_CALLS_MODELS = re.compile(r"(?<![\w.])(pretrained|instruction_tuned)\(")


@functools.lru_cache(maxsize=None)
def _calls_models(func) -> bool:
    try:
        return bool(_CALLS_MODELS.search(inspect.getsource(func)))
    except (OSError, TypeError):
        return False


def needs_models(item) -> bool:
    "Does this test, or a fixture it uses, call `pretrained` or `instruction_tuned`?"
    if item.get_closest_marker("models"):
        return True
    func = getattr(item, "function", None)
    info = getattr(item, "_fixtureinfo", None)
    fixtures = [] if info is None else info.name2fixturedefs.values()
    funcs = [func] + [d.func for defs in fixtures for d in defs]
    return any(f is not None and _calls_models(f) for f in funcs)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_models(item):
            item.add_marker(pytest.mark.models)


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


def _deviceless_to_meta():
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    class DevicelessToMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            made = func in _device_constructors() and not (
                args and isinstance(args[0], torch.Tensor)
            )
            if made and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return DevicelessToMeta()


@pytest.fixture
def strict_device():
    """`with strict_device(): ...`: a new tensor made without a device goes to `meta`, while the
    model stays on the CPU: if the code forgets to make a tensor where the model is, it meets the
    model's tensors and raises, as it would on a GPU (and a `meta` tensor has no data to read or
    copy: `.tolist()`, `.item()` and `.to()` raise too). Tensors made with an explicit device, and
    conversions of tensors, are left alone. Used by the fine-tuning, alignment and evaluation
    tests."""
    return _deviceless_to_meta
