import pytest

from tests.tiny import tiny_qwen3


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return tiny_qwen3()
