"""Tool calling on chat completions, through vLLM's own tool-call parsers (``vllm serve``'s machinery).

``--tool-call-parser NAME`` picks one of vLLM's parsers (``hermes``, ``llama3_json``,
``mistral``, ...), composed by vLLM's ``ParserManager`` exactly as ``vllm serve``
composes it. Per request, the parser's ``adjust_request`` adds the grammar of a
tool call (a structural tag) to the request's structured outputs, so a named
function or ``tool_choice: required`` yields a well-formed call on any model;
``--tool-strict-level parameter`` (or ``strict: true`` on a tool) pins the
arguments to the tool's JSON schema too. ``tool_choice: auto`` (the default when
``tools`` are sent) needs ``--enable-auto-tool-choice`` and leaves the decision to
the model, so it works only where the model writes the parser's format. The
model's output is parsed back into ``tool_calls`` by the same parser (one per
choice; streamed deltas by its ``parse_delta``), and the finish reason follows
vLLM: ``tool_calls`` for ``auto`` and ``required``, ``stop`` for a named function.

Unlike ``vllm serve`` 0.32, which builds its parser only with
``--enable-auto-tool-choice``, a named function and ``required`` need only
``--tool-call-parser`` here; the refusals otherwise are vLLM's own messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltaserve.server.exceptions import InvalidRequest
from deltaserve.server.settings import ToolSettings

Parse = Callable[[], Any]


def _named(req: Any) -> str | None:
    """The function a named ``tool_choice`` asks for (a chat's ``function.name``, a response's ``name``)."""
    choice = req.tool_choice
    if getattr(choice, "function", None) is not None:
        return getattr(choice.function, "name", None)
    return getattr(choice, "name", None) if getattr(choice, "type", None) == "function" else None


class ToolCalling:
    """The server's tool-call parser class (or None) and the checks of a request's ``tools``."""

    def __init__(self, settings: ToolSettings, tokenizer: Any, model_name: str = "") -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self.parser_cls: Any = None
        if settings.tool_call_parser:
            from deltaserve.server.vllm_compat import ParserManager

            self.parser_cls = ParserManager.get_parser(
                tool_parser_name=settings.tool_call_parser, enable_auto_tools=True, model_name=model_name,
                tool_strict_level=settings.tool_strict_level, tokenizer=tokenizer)

    def check(self, req: Any) -> None:
        """vLLM's refusals of a tool choice this server cannot honour (400, ``tool_choice``)."""
        choice = req.tool_choice
        if not getattr(req, "tools", None) or choice in (None, "none"):
            return
        if choice == "auto" and not self.settings.enable_auto_tool_choice:
            raise InvalidRequest('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                                 "be set", "tool_choice")
        if self.parser_cls is None and choice != "auto":
            described = f'function "{_named(req)}"' if _named(req) else f'"{choice}"'
            raise InvalidRequest(f"tool_choice={described} requires --tool-call-parser to be set", "tool_choice")

    def template_tools(self, req: Any) -> list[dict] | None:
        """The request's tools as the chat template gets them (as vLLM passes them)."""
        tools = getattr(req, "tools", None)
        return [t.model_dump() for t in tools] if tools else None

    def prepare(self, req: Any) -> tuple[Any, ToolOutputs | None]:
        """(the request with its tool-call grammar, the parsing of its outputs) — (req, None) without tools."""
        self.check(req)
        if self.parser_cls is None or not getattr(req, "tools", None) or req.tool_choice == "none":
            return req, None

        def make() -> Any:
            return self.parser_cls(self.tokenizer, req.tools, model_config=None,
                                   chat_template_kwargs=dict(req.chat_template_kwargs or {}))

        try:
            adjusted = make().adjust_request(req)
        except (ValueError, TypeError) as err:
            raise InvalidRequest(f"cannot build the grammar of these tools: {err}", "tools") from None
        return adjusted, ToolOutputs(adjusted, make)


class ToolOutputs:
    """One request's outputs parsed into messages with ``tool_calls``: whole, or streamed per choice."""

    def __init__(self, req: Any, make: Parse) -> None:
        self.req, self.make = req, make
        self.named = _named(req)
        self.streams: dict[int, Any] = {}        # choice index -> its streaming parser
        self.streamed_calls: set[int] = set()    # choices that have streamed a tool call

    def parse(self, text: str, token_ids: Any) -> tuple[str | None, str | None, list]:
        """(reasoning, content, function calls) of one whole output, by a fresh parser (vLLM's ``parse``)."""
        reasoning, content, calls = self.make().parse(text, self.req, enable_auto_tools=True,
                                                      model_output_token_ids=list(token_ids))
        calls = list(calls or [])
        return reasoning, content, calls[:1] if self.req.parallel_tool_calls is False else calls

    def message(self, text: str, token_ids: Any, finish: str | None) -> tuple[dict, str | None]:
        """(the assistant message, the finish reason) of one whole choice, as vLLM's chat server makes them."""
        from deltaserve.server.vllm_compat import ToolCall, make_tool_call_id

        _, content, found = self.parse(text, token_ids)
        calls = [ToolCall(id=c.id or make_tool_call_id(), function=c).model_dump() for c in found]
        if self.named or self.req.tool_choice == "required":
            content = content or ""
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:   # as vLLM's ChatMessage, no empty list
            message["tool_calls"] = calls
        called = bool(calls) and not self.named
        if finish == "stop" and (called or (self.req.tool_choice == "required")):
            finish = "tool_calls"
        return message, finish

    def delta_message(self, index: int, text: str, token_ids: Any, prompt_ids: list[int], finish: str | None
                      ) -> Any:
        """vLLM's ``DeltaMessage`` for one streamed piece of choice ``index`` (None: nothing to send yet)."""
        parser = self.streams.get(index)
        if parser is None:
            parser = self.streams[index] = self.make()
        delta = parser.parse_delta(text, list(token_ids), self.req, prompt_ids, finished=finish is not None)
        if delta is None:
            return None
        if self.req.parallel_tool_calls is False and delta.tool_calls:
            delta.tool_calls = [c for c in delta.tool_calls if c.index == 0]
        if delta.tool_calls:
            self.streamed_calls.add(index)
        return delta

    def delta(self, index: int, text: str, token_ids: Any, prompt_ids: list[int], finish: str | None
              ) -> dict | None:
        """One streamed piece of choice ``index`` as a chat delta (None: nothing to send yet)."""
        delta = self.delta_message(index, text, token_ids, prompt_ids, finish)
        return None if delta is None else delta.model_dump(exclude_unset=True, exclude_none=True)

    def stream_finish(self, index: int, finish: str | None) -> str | None:
        """The finish reason streamed for choice ``index``: ``tool_calls`` once it called a tool (not named)."""
        if finish == "stop" and index in self.streamed_calls and not self.named:
            return "tool_calls"
        return finish
