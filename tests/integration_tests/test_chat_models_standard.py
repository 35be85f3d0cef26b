"""Standard LangChain integration tests on a tiny random Qwen3 checkpoint (CPU)."""

from __future__ import annotations

from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_braid import ChatBraid
from tests.tiny import tiny_qwen3

_SYSTEM = "Retrieval augmented generation puts documents in the prompt. " * 4


class TestChatBraidStandard(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatBraid]:
        return ChatBraid

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_qwen3(), "device": "cpu", "max_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

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
