"""Standard LangChain integration tests on a tiny random Qwen3 checkpoint (CPU)."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_braid import ChatBraid
from tests.tiny import BraidCapabilities, tiny_qwen3

# A random checkpoint writes valid calls and JSON (tests/integration_tests/test_tools.py checks
# that), but these suites also need a trained model: argument values chosen from the prompt
# (input=3), free-text strings closed within the 8-token budget, answers that use tool results.
_NEEDS_TRAINED_MODEL = pytest.mark.xfail(
    reason="needs a trained model's judgement (argument values, short strings); validity of "
           "constrained output is tested in test_tools.py", strict=False)
_JUDGEMENT_TESTS = [
    "test_tool_calling", "test_tool_calling_async", "test_bind_runnables_as_tools",
    "test_tool_choice", "test_tool_calling_with_no_arguments", "test_structured_output",
    "test_structured_output_async", "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param", "test_json_mode", "test_agent_loop",
    "test_unicode_tool_call_integration",
]
_SYSTEM = "Retrieval augmented generation puts documents in the prompt. " * 4


class TestChatBraidStandard(BraidCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatBraid]:
        return ChatBraid

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_qwen3(), "device": "cpu", "max_tokens": 8}


    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        chat = ChatBraid(**self.chat_model_params, temperature=0)
        messages = [("system", _SYSTEM), ("human", "What is in the cache?")]
        chat.invoke(messages)  # the second call reads the first one's prompt from the cache
        if stream:
            full = None
            for chunk in chat.stream(messages):
                full = chunk if full is None else full + chunk
            message = full
        else:
            message = chat.invoke(messages)
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        return message


for _name in _JUDGEMENT_TESTS:
    setattr(TestChatBraidStandard, _name,
            _NEEDS_TRAINED_MODEL(getattr(ChatModelIntegrationTests, _name)))
