"""What a record becomes: pretraining documents, or SFT samples (input ids + prompt-masked labels).

SFT follows ModelLink's instruction handlers: Alpaca (instruction / input / output, optional system
and history) and ShareGPT (multi-turn ``conversations`` of ``{"from", "value"}``, remappable with
``--map-keys``). Text is laid out with the tokenizer's chat template (or the Alpaca prompt for
tokenizers without one); labels are -100 everywhere but on what the assistant says, its end-of-turn
marker included. Labels are aligned with input ids (the trainer shifts them).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.chat_template import render
from llm.tokenizers import FastTokenizer
from shared.errors import InvalidArgument
from tools.preprocess.readers import InputError

IGNORE = -100
HANDLERS = {
    "GeneralPretrainHandler": "pretrain",
    "pretrain": "pretrain",
    "": "pretrain",
    "AlpacaStyleInstructionHandler": "alpaca",
    "alpaca": "alpaca",
    "SharegptStyleInstructionHandler": "sharegpt",
    "sharegpt": "sharegpt",
}
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
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str, keep_newlines: bool) -> list[str]:
    """Rule-based splitter (NLTK's punkt data cannot be downloaded offline)."""
    parts = _SENTENCE.split(text)
    return parts if keep_newlines else [p.replace("\n", " ") for p in parts]


def text_of(doc: dict[str, Any], key: str, where: str) -> str | list[str]:
    if key not in doc:
        raise InputError(
            where, f"missing key '{key}' (keys: {', '.join(sorted(doc)) or 'none'})", "missing_key"
        )
    value = doc[key]
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise InputError(where, f"'{key}' is {type(value).__name__}, expected a string", "type")


# -- SFT -------------------------------------------------------------------------------------------


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


class Packer:
    """Greedy, order-preserving packing of samples into windows of exactly ``seq_length`` tokens.

    Streaming (bounded memory), unlike ModelLink's whole-dataset knapsack. Padding uses the pad (else
    EOS) id with label -100 and attention mask 0; with ``neat`` the mask holds the 1-based sample
    index inside the pack (ModelLink's --neat-pack).
    """

    def __init__(self, seq_length: int, pad_id: int, neat: bool) -> None:
        self.seq_length, self.pad_id, self.neat = seq_length, pad_id, neat
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.mask: list[int] = []
        self.samples = 0

    def add(self, ids: list[int], labels: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.ids and len(self.ids) + len(ids) > self.seq_length:
            yield self.flush()
        self.samples += 1
        self.ids += ids
        self.labels += labels
        self.mask += [self.samples if self.neat else 1] * len(ids)

    def flush(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pad = self.seq_length - len(self.ids)
        out = (
            np.array(self.ids + [self.pad_id] * pad, dtype=np.int32),
            np.array(self.labels + [IGNORE] * pad, dtype=np.int32),
            np.array(self.mask + [0] * pad, dtype=np.int32),
        )
        self.ids, self.labels, self.mask, self.samples = [], [], [], 0
        return out
