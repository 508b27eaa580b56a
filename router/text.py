"""What a request is routed on: the last user message of a chat, or the prompt of
a completion, with the zoo's ``Q: ...\\nA: `` wrapper removed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from experts.zoo.tokenizer import ANSWER_PREFIX, QUESTION_PREFIX

_ANSWER_MARK = ANSWER_PREFIX.rstrip()  # "\nA:"


def route_text(messages: Sequence[Any] | None = None, prompt: str | Sequence[str] | None = None) -> str:
    """The text to route on. ``messages``: OpenAI chat messages (dicts or objects
    with ``role``/``content``; content a string or a list of parts); ``prompt``: a
    completion prompt (a string, or a list whose last string is used)."""
    if messages is not None:
        return strip_zoo_wrapper(_last_user_text(messages))
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        texts = [p for p in prompt if isinstance(p, str)]
        prompt = texts[-1] if texts else ""
    return strip_zoo_wrapper(prompt)


def strip_zoo_wrapper(text: str) -> str:
    """``"Q: <question>\\nA: "`` -> ``<question>``; with several Q/A turns (few-shot
    prompts), the last question. Other text, or a prompt whose last question is
    already answered, is returned stripped but otherwise unchanged."""
    stripped = text.strip()
    if not stripped.startswith(QUESTION_PREFIX):
        return stripped
    start = stripped.rfind(f"\n{QUESTION_PREFIX}") + 1  # 0 when there is one question
    question, mark, answer = stripped[start + len(QUESTION_PREFIX) :].partition(_ANSWER_MARK)
    if mark and answer.strip():
        return stripped
    return question.strip()


def _field(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, Mapping) else getattr(message, key, None)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if _field(part, "type") == "text":
            parts.append(_field(part, "text") or "")
    return "\n".join(parts)


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(list(messages)):
        if _field(message, "role") == "user":
            return _content_text(_field(message, "content"))
    return ""
