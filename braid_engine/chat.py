"""Rendering conversations with a checkpoint's own chat template."""

from __future__ import annotations

from typing import Any

from braid_engine.errors import ChatTemplateError, InvalidRequestError

# what render_chat passes to the template itself
_RESERVED = ("messages", "conversation", "add_generation_prompt", "tokenize")


def check_text(text: str) -> str:
    """``text``, if UTF-8 can encode it (the tokenizer's input); a lone surrogate, which a
    decoding with ``errors="surrogateescape"`` leaves, is an InvalidRequestError that says where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"the text is not valid Unicode: {e.reason} at index {e.start} ({text[e.start]!r}); replace it, "
            "e.g. text.encode('utf-8', 'replace').decode('utf-8').") from None
    return text


def check_template_kwargs(template_kwargs: dict[str, Any]) -> None:
    """Refuse template variables that rendering sets itself (the messages, add_generation_prompt)."""
    taken = [k for k in _RESERVED if k in template_kwargs]
    if taken:
        raise ChatTemplateError(f"template variables {taken} are set by the engine itself; pass the messages "
                                "as messages (and add_generation_prompt as its own argument, where there is one).")


# content blocks of media the engine cannot read (OpenAI's and LangChain's names)
_MEDIA_BLOCKS = ("image_url", "image", "input_image", "audio", "input_audio", "video", "file")


def _template_message(i: int, message: Any) -> Any:
    """``message`` as templates take it: a dict with a role; content that is a list of text blocks
    (OpenAI's form) joined into its text, a list holding media refused by name (a template wrote
    such lists as a Python repr); other content (a tool's result as a dict, as Llama 3's template
    writes it with tojson) passed on unchanged."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ChatTemplateError(f"messages[{i}] must be a dict with a 'role' string, got {message!r:.100}.")
    content = message.get("content")
    if not isinstance(content, list) or not content:
        return message
    kinds = [b.get("type") if isinstance(b, dict) else None for b in content]
    media = [k for k in kinds if k in _MEDIA_BLOCKS]
    if media:
        raise ChatTemplateError(f"messages[{i}] holds {media[0]!r} content; this engine reads text only.")
    if all(k == "text" and isinstance(b.get("text"), str) for k, b in zip(kinds, content)):
        return {**message, "content": "".join(b["text"] for b in content)}
    return message


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
    check_template_kwargs(template_kwargs)
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of message dicts, got {type(messages).__name__}.")
    messages = [_template_message(i, m) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    except Exception as e:  # jinja raises many types; all mean "this template rejects these messages"
        raise ChatTemplateError(f"the chat template could not render the messages: {e}") from e
    return check_text(text)
