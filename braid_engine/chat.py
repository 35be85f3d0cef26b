"""Rendering conversations with a checkpoint's own chat template."""

from __future__ import annotations

from typing import Any

from braid_engine.errors import ChatTemplateError


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **template_kwargs: Any) -> str:
    """The template's text for ``messages``; a typed error when there is no template or it fails.

    Example:
        >>> render_chat(llm.tokenizer, [{"role": "user", "content": "Hi"}])
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the checkpoint's tokenizer has no chat template; use a chat (instruct) checkpoint, "
            "send a plain prompt, or set tokenizer.chat_template."
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    except Exception as e:  # jinja raises many types; all mean "this template rejects these messages"
        raise ChatTemplateError(f"the chat template could not render the messages: {e}") from e
