"""What a request is routed on: the user's own words, never the template's markup.

* a chat: the last user message;
* a completion prompt: the prompt with the model's own chat-template markup
  removed when present, i.e. the content of its last user turn.

The markup is learnt from the tokenizer's chat template (``ChatMarkup``): a
probe conversation is rendered around a sentinel, and the text right before the
sentinel (the user turn's opener, e.g. ``<|im_start|>user\\n`` for ChatML) and
right after it (the turn's closer and the generation prompt) are what a
rendered prompt is cut at. A model without a chat template, or a prompt without
its markup, is routed on the stripped prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_SENTINEL = "\u2063ROUTE-TEXT\u2063"


@dataclass(frozen=True)
class ChatMarkup:
    """``opener``: text that starts a user turn; ``closers``: texts that can end one."""

    opener: str = ""
    closers: tuple[str, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatMarkup:
        """The markup of ``tokenizer``'s chat template (empty when it has none or it cannot be probed)."""
        if not getattr(tokenizer, "chat_template", None):
            return cls()
        single = _render(tokenizer, [{"role": "user", "content": _SENTINEL}])
        if single is None or _SENTINEL not in single:
            return cls()
        before, after = single.split(_SENTINEL, 1)
        multi = _render(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": _SENTINEL}])
        if multi is not None and _SENTINEL in multi:
            before = _common_suffix(before, multi.split(_SENTINEL, 1)[0]) or before
        specials = [t for t in _special_tokens(tokenizer) if t]
        cut = max((before.rfind(t) for t in specials), default=-1)
        opener = before[cut:] if cut >= 0 else before.lstrip()
        closers = tuple(dict.fromkeys(c for c in (after, after.rstrip(), *(t for t in specials if t in after)) if c))
        return cls(opener if opener.strip() else "", closers)

    def user_text(self, prompt: str) -> str:
        """The last user turn's content of a rendered prompt, or the stripped prompt without markup."""
        start = prompt.rfind(self.opener) if self.opener else -1
        if start < 0:
            return prompt.strip()
        text = prompt[start + len(self.opener):]
        ends = [i for i in (text.find(c) for c in self.closers) if i >= 0]
        return (text[: min(ends)] if ends else text).strip()


def route_text(messages: Sequence[Any] | None = None, prompt: str | Sequence[Any] | None = None,
               markup: ChatMarkup | None = None) -> str:
    """The text to route on. ``messages``: OpenAI chat messages (dicts or objects with
    ``role``/``content``; content a string or a list of parts); ``prompt``: a completion
    prompt (a string, or a list whose last string is used); ``markup``: the served model's."""
    if messages is not None:
        return _last_user_text(messages).strip()
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        texts = [p for p in prompt if isinstance(p, str)]
        prompt = texts[-1] if texts else ""
    return (markup or ChatMarkup()).user_text(prompt)


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse a probe conversation; then it has no usable markup
        return None
    return text if isinstance(text, str) else None


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted(tokens, key=len, reverse=True)


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
