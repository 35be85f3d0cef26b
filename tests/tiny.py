"""One tiny random Qwen3 checkpoint per test session, written to a temporary directory."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

from braid_engine.testing import make_tiny_checkpoint


@cache
def tiny_qwen3() -> str:
    """Path of the session's tiny Qwen3 checkpoint (built on first use, removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="braid-chat-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return str(make_tiny_checkpoint(root / "qwen3", arch="qwen3"))


class BraidCapabilities:
    """What ChatBraid declares to LangChain's standard suites (unit and integration alike)."""

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
