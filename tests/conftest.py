import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    "For modules of tiny models: a second thread only adds synchronisation, which stalls when the machine is busy."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
