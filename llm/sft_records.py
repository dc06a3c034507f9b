"""Instruction records -> token ids with prompt-masked labels: Alpaca or ShareGPT, chat template or not.

Follows ModelLink's instruction handlers: Alpaca (instruction / input / output, optional system and
history) and ShareGPT (multi-turn ``conversations`` of ``{"from", "value"}``, remappable with
``map_keys``). Text is laid out with the tokenizer's chat template (or the Alpaca prompt for
tokenizers without one); labels are -100 everywhere but on what the assistant says, its end-of-turn
marker included. Labels are aligned with input ids (the trainer shifts them). Used by the offline
preprocessor (``tools/preprocess``) and by the trainer's HF + DeepSpeed ranks, which read JSON directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.chat_template import render
from llm.tokenizers import FastTokenizer
from shared.errors import InvalidArgument

IGNORE = -100
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class InputError(Exception):
    """Bad input at a known place: ``where`` is 'file:line' (or 'file:row N')."""

    def __init__(self, where: str, reason: str, kind: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.kind = where, reason, kind


# -- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareGptKeys:
    messages: str = "conversations"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> ShareGptKeys:
        """The keys of a ``--map-keys`` mapping (``messages`` and ``tags``), defaults for the rest."""
        fields = {"messages": m.get("messages", cls.messages), **(m.get("tags") or {})}
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


class SFTEncoder:
    def __init__(self, tok: FastTokenizer, *, style: str, prompt_type: str, map_keys: dict[str, Any]) -> None:
        self.tok = tok
        self.style = style
        if prompt_type == "auto":
            prompt_type = "chat_template" if tok.chat_template else "alpaca"
        if prompt_type == "chat_template" and not tok.chat_template:
            raise InvalidArgument(
                "--prompt-type chat_template: the tokenizer has no chat template", field="prompt_type"
            )
        self.prompt_type = prompt_type
        self.alpaca_keys = {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
            **{k: v for k, v in map_keys.items() if isinstance(v, str)},
        }
        self.sharegpt = ShareGptKeys.from_map(map_keys)
        self.special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}

    def messages(self, doc: dict[str, Any], where: str) -> list[dict[str, str]]:
        """The record as chat messages (``role``, ``content``); InputError naming ``where`` if keys lack."""
        return self._alpaca(doc, where) if self.style == "alpaca" else self._sharegpt(doc, where)

    def _alpaca(self, doc: dict[str, Any], where: str) -> list[dict[str, str]]:
        k = self.alpaca_keys
        for key in (k["prompt"], k["response"]):
            if key not in doc:
                raise InputError(
                    where, f"missing key '{key}' (keys: {', '.join(sorted(doc))})", "missing_key"
                )
        msgs = []
        if doc.get(k["system"]):
            msgs.append({"role": "system", "content": str(doc[k["system"]])})
        for turn in doc.get(k["history"]) or []:
            if not (isinstance(turn, list) and len(turn) == 2):
                raise InputError(
                    where, f"'{k['history']}' must be a list of [instruction, response] pairs", "type"
                )
            msgs += [
                {"role": "user", "content": str(turn[0])},
                {"role": "assistant", "content": str(turn[1])},
            ]
        user = "\n".join(str(x) for x in (doc.get(k["prompt"]), doc.get(k["query"])) if x)
        if not user or not doc.get(k["response"]):
            raise InputError(where, "empty instruction or output", "empty")
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": str(doc[k["response"]])}]
        return msgs

    def _sharegpt(self, doc: dict[str, Any], where: str) -> list[dict[str, str]]:
        k = self.sharegpt
        conv = doc.get(k.messages)
        if not isinstance(conv, list) or not conv:
            raise InputError(where, f"'{k.messages}' must be a non-empty list of turns", "missing_key")
        roles = {k.user_tag: "user", k.assistant_tag: "assistant", k.system_tag: "system"}
        msgs = []
        for i, turn in enumerate(conv):
            if (
                not isinstance(turn, dict)
                or turn.get(k.role_tag) not in roles
                or not isinstance(turn.get(k.content_tag), str)
            ):
                raise InputError(
                    where,
                    f"turn {i} must be {{'{k.role_tag}': {'|'.join(roles)}, '{k.content_tag}': string}}",
                    "type",
                )
            msgs.append({"role": roles[turn[k.role_tag]], "content": turn[k.content_tag]})
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(where, "no assistant turn to learn from", "empty")
        return msgs

    def _alpaca_text(self, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, trained?) pieces for tokenizers without a chat template."""
        pieces: list[tuple[str, bool]] = []
        system = ""
        for m in msgs:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
            elif m["role"] == "user":
                pieces.append((system + ALPACA_NO_INPUT.format(instruction=m["content"]), False))
                system = ""
            else:
                pieces.append((m["content"] + (self.tok.eos_token or ""), True))
                pieces.append(("\n\n", False))
        return pieces

    def encode(self, doc: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        """(input ids, labels): labels are -100 but on the assistant's tokens and its end-of-turn marker."""
        msgs = self.messages(doc, where)
        if self.prompt_type == "alpaca":
            pieces = self._alpaca_text(msgs)
            text = "".join(p for p, _ in pieces)
            spans, pos = [], 0
            for p, trained in pieces:
                if trained:
                    spans.append((pos, pos + len(p)))
                pos += len(p)
        else:
            text = render(self.tok.chat_template, msgs, add_generation_prompt=False, **self.special)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                head = render(self.tok.chat_template, msgs[:i], add_generation_prompt=True, **self.special)
                upto = render(
                    self.tok.chat_template, msgs[: i + 1], add_generation_prompt=False, **self.special
                )
                if not (text.startswith(upto) and upto.startswith(head)):
                    raise InputError(
                        where,
                        "the chat template does not render conversation prefixes consistently",
                        "template",
                    )
                spans.append((len(head), len(upto)))
        enc = self.tok.raw.encode(text, add_special_tokens=False)
        labels = [IGNORE] * len(enc.ids)
        for j, (start, end) in enumerate(enc.offsets):
            if end > start and any(a <= start and end <= b for a, b in spans):
                labels[j] = enc.ids[j]
        return list(enc.ids), labels


# -- files of records (the trainer's HF + DeepSpeed ranks read them directly) -----------------------

RECORD_SUFFIXES = (".json", ".jsonl")
MAX_JSON_ARRAY_BYTES = 1 << 30  # a .json array is parsed whole; bigger corpora belong in .jsonl


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record of a ``.json`` file (one array of objects) or a ``.jsonl`` file
    (one object per line; blank lines skipped); InputError names the file and line of the first bad one."""
    import json

    path = Path(path)
    if path.suffix not in RECORD_SUFFIXES:
        raise InputError(str(path), f"records must be {' or '.join(RECORD_SUFFIXES)} files", "format")
    out: list[tuple[str, dict[str, Any]]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    raise InputError(where, f"not JSON ({e})", "json") from None
                if not isinstance(doc, dict):
                    raise InputError(where, "a record must be a JSON object", "type")
                out.append((where, doc))
        return out
    if path.stat().st_size > MAX_JSON_ARRAY_BYTES:
        raise InputError(str(path), "a .json array over 1 GiB: write it as .jsonl", "size")
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(str(path), f"not JSON ({e})", "json") from None
    if not isinstance(docs, list):
        raise InputError(str(path), "a .json file of records must hold one array of objects", "type")
    for n, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InputError(f"{path}: record {n}", "a record must be a JSON object", "type")
        out.append((f"{path}: record {n}", doc))
    return out


def record_style(doc: dict[str, Any]) -> str:
    """``sharegpt`` for a record of conversation turns, else ``alpaca`` (instruction / input / output)."""
    return "sharegpt" if isinstance(doc.get(ShareGptKeys.messages), list) else "alpaca"


class RecordEncoder:
    """Each record in its own style, through one :class:`SFTEncoder` per style (the chat template when the
    tokenizer has one, else the Alpaca prompt)."""

    def __init__(self, tok: FastTokenizer) -> None:
        self.encoders = {s: SFTEncoder(tok, style=s, prompt_type="auto", map_keys={}) for s in STYLES}

    def check(self, doc: dict[str, Any], where: str) -> None:
        """InputError when the record lacks what its style needs (no tokenization)."""
        self.encoders[record_style(doc)].messages(doc, where)

    def encode(self, doc: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        """(input ids, prompt-masked labels) of the record, in its own style (:meth:`SFTEncoder.encode`)."""
        return self.encoders[record_style(doc)].encode(doc, where)


STYLES = ("alpaca", "sharegpt")
