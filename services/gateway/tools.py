"""OpenAI tool calls on /v1/chat/completions: the request's ``tools`` and ``tool_choice``, the constraint that
makes a forced call's arguments always parse, and reading calls back out of the generated text.

- ``tool_choice: "none"`` (or no tools): a plain answer.
- ``"required"`` or a named function: decoding is constrained by a JSON Schema (one object
  ``{"name": <a tool's name>, "arguments": <its parameters schema>}``), so the reply is always a call whose
  arguments validate; the response carries it as ``tool_calls`` with ``finish_reason: "tool_calls"``.
- ``"auto"`` (the default with tools): unconstrained; a reply that is such an object (or a list of them, or
  Hermes-style ``<tool_call>...</tool_call>`` blocks) naming a known tool becomes ``tool_calls``, any other
  reply is the message content.
The tools reach the prompt through the model's chat template (``tools``), or, for a template without tools,
as a system message that asks for the JSON answer above (textgen's Tokenizer.apply_chat_template).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.http import HTTPError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class Tools:
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's objects, as given
    choice: str = "none"  # none | auto | required | named
    named: str = ""

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def parse_tools(doc: dict[str, Any]) -> Tools:
    """``tools`` and ``tool_choice``, checked (400 naming the field)."""
    tools = doc.get("tools")
    choice = doc.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise HTTPError(400, "tool_choice needs tools", "tool_choice")
        return Tools()
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise HTTPError(400, f"tools must be a list of at most {MAX_TOOLS} functions", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise HTTPError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise HTTPError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise HTTPError(400, f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise HTTPError(400, "tools: function names must be unique", "tools")
    if choice is None or choice in ("none", "auto", "required"):
        return Tools(tools, choice or "auto")
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or choice.get("type") != "function" or fn.get("name") not in names:
        raise HTTPError(
            400,
            "tool_choice must be none, auto, required or {type: function, function: {name: <a tool>}}",
            "tool_choice",
        )
    return Tools(tools, "named", fn["name"])


def _call_schema(t: dict[str, Any]) -> dict[str, Any]:
    fn = t["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
    }


def constraint(tools: Tools) -> pb.Guided | None:
    """The structured-output constraint of a forced call (None when the model may answer freely)."""
    if not tools.forced:
        return None
    chosen = [t for t in tools.tools if tools.choice == "required" or t["function"]["name"] == tools.named]
    schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    return pb.Guided(json_schema=json.dumps(schema), field="tools")


def read_calls(text: str, tools: Tools) -> list[dict[str, Any]] | None:
    """The tool calls in a reply, as OpenAI's ``tool_calls`` (ids made here), or None when it is not one."""
    blocks = TOOL_CALL_BLOCK.findall(text)
    candidates: list[Any] = []
    try:
        if blocks:
            candidates = [json.loads(b) for b in blocks]
        else:
            doc = json.loads(text.strip())
            candidates = doc if isinstance(doc, list) else [doc]
    except ValueError:
        return None
    names = set(tools.names())
    calls = []
    for c in candidates:
        if not (isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments", {}), dict)):
            return None
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))},
            }
        )
    return calls or None


def chat_messages(doc: dict[str, Any]) -> list[pb.ChatMessage]:
    """The conversation, tool turns included: an assistant turn that called tools carries its calls as the
    JSON it answered with; a ``tool`` turn carries the function's result."""
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HTTPError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        calls = m.get("tool_calls") if role == "assistant" else None
        if role == "assistant" and calls and content in (None, ""):
            try:
                content = json.dumps(
                    [
                        {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                        for c in calls
                    ]
                )
            except (KeyError, TypeError, ValueError):
                raise HTTPError(
                    400, f"messages[{i}].tool_calls must be OpenAI tool calls", "messages"
                ) from None
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise HTTPError(
                400,
                f"messages[{i}] must be {{'role': system|user|assistant|tool, 'content': string}}",
                "messages",
            )
        out.append(pb.ChatMessage(role=role, content=content))
    return out
