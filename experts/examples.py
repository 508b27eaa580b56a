"""Supervised chat examples: what experts are trained on and calibrated against.

One example is a conversation up to the assistant's turn plus the answer the
assistant should give. On disk it is OpenAI's chat fine-tuning JSONL, one
object per line whose last message is the assistant's answer::

    {"messages": [{"role": "user", "content": "Convert 3 March 2021 to ISO."},
                  {"role": "assistant", "content": "2021-03-03"}]}

``encode`` renders an example with the model's own chat template, so training,
calibration and serving all see the tokens a chat request produces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "developer")
MAX_EXAMPLES = 100_000


class ExampleError(ValueError):
    """An example (or a line of an examples file) is malformed; the message says where."""


@dataclass(frozen=True)
class ChatExample:
    """``messages`` end with a user turn; ``answer`` is the assistant's reply."""

    messages: tuple[tuple[str, str], ...]
    answer: str

    @classmethod
    def of(cls, question: str, answer: str, system: str | None = None) -> ChatExample:
        turns = ((("system", system),) if system else ()) + (("user", question),)
        return cls(turns, answer)

    @classmethod
    def from_json(cls, obj: Any, where: str = "example") -> ChatExample:
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or len(obj["messages"]) < 2:
            raise ExampleError(f"{where}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}} "
                               "with at least one user and one assistant message")
        turns = []
        for i, message in enumerate(obj["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise ExampleError(f"{where}: messages[{i}] needs a role in {list(ROLES)} and string content")
            turns.append(("system" if role == "developer" else role, content))
        (last_role, answer), turns = turns[-1], turns[:-1]
        if last_role != "assistant" or not answer:
            raise ExampleError(f"{where}: the last message must be a non-empty assistant answer")
        if turns[-1][0] != "user":
            raise ExampleError(f"{where}: the message before the answer must be from the user")
        return cls(tuple(turns), answer)

    def to_json(self) -> dict[str, Any]:
        return {"messages": [*self.chat(), {"role": "assistant", "content": self.answer}]}

    def chat(self) -> list[dict[str, str]]:
        """The conversation up to the answer, as OpenAI chat messages."""
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def question(self) -> str:
        """The last user message (what a router sees)."""
        return self.messages[-1][1]


def read_examples(path: Path, limit: int = MAX_EXAMPLES) -> list[ChatExample]:
    """Examples from a JSONL file; every problem names the file and line."""
    path = Path(path)
    out: list[ChatExample] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if len(out) >= limit:
                raise ExampleError(f"{path}: more than {limit} examples")
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ExampleError(f"{path}:{number}: not JSON ({err})") from None
            out.append(ChatExample.from_json(obj, f"{path}:{number}"))
    if not out:
        raise ExampleError(f"{path}: no examples")
    return out


def write_examples(path: Path, examples: Iterable[ChatExample]) -> None:
    from deltaserve.experts.atomic import write_bytes_atomic

    text = "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples)
    write_bytes_atomic(Path(path), text.encode())


def encode(tokenizer: Any, example: ChatExample) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the chat template with the generation prompt, then the answer's
    tokens and the end-of-turn token (the tokenizer's EOS), which generation stops at."""
    prompt = tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ExampleError("the tokenizer has no EOS token to end the answer with")
    return list(prompt), [*answer, tokenizer.eos_token_id]


def encode_all(tokenizer: Any, examples: Sequence[ChatExample]) -> list[tuple[list[int], list[int]]]:
    return [encode(tokenizer, e) for e in examples]
