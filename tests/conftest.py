import os
from pathlib import Path

import pytest
import torch

# without a GPU, Triton kernels run in the interpreter; it must be chosen before triton loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from braid_engine.testing import make_tiny_checkpoint  # noqa: E402
from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return tiny.tiny_qwen3()


@pytest.fixture(scope="session")
def tiny_qwen3() -> Path:
    return Path(tiny.tiny_qwen3())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_ernie(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ernie"), arch="ernie4_5")


@pytest.fixture(scope="session")
def qwen3_llm(tiny_qwen3):
    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu")
    yield llm
    llm.shutdown()
