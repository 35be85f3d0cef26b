"""langchain-braid: ChatBraid, a local LangChain chat model whose conversations reuse their KV."""

from importlib import metadata

from langchain_braid._messages import TOKEN_IDS_KEY, UnsupportedContentError
from langchain_braid._tools import ToolChoiceError, ToolSchemaError
from langchain_braid.chat_models import ChatBraid

try:
    __version__ = metadata.version("langchain-braid")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = ""

__all__ = ["ChatBraid", "TOKEN_IDS_KEY", "ToolChoiceError", "ToolSchemaError",
           "UnsupportedContentError", "__version__"]
