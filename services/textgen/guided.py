"""Structured output: constraints on the generated text (a JSON Schema, any JSON object, a regular
expression, a list of choices), enforced token by token with masks from outlines-core.

Why outlines-core: it has no dependencies (one Rust extension; xgrammar pulls in triton and a TVM runtime),
runs on CPU, and turns a JSON Schema into a regular expression whose index over the vocabulary is built once
and then answers "which tokens may come next" per state in O(1). A constraint is compiled when the request is
validated (in the RPC thread, never the engine loop) into an ``Index`` kept in an LRU cache keyed by its
regular expression, so a schema used again costs nothing; each sequence walks it with its own ``Guide``.
Limits: recursive schemas (``$ref`` cycles) are unrolled to a fixed depth by outlines-core, and a schema it
cannot translate is refused with 400 naming the request field.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from llm.tokenizers import Tokenizer
from protos.textgen.v1 import textgen_pb2 as pb
from shared.errors import InvalidArgument

INDEX_CACHE = 64  # compiled constraints kept (LRU)
# JSON Schema keywords outlines-core's translation does not enforce: a schema using one is refused, so that
# every accepted schema's output validates against it (rather than silently ignoring the keyword)
UNENFORCED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "dependentRequired",
    "dependentSchemas",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
)
MAX_CHOICES = 256


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): every byte is one printable character; this maps back."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tok: Tokenizer) -> tuple[dict[bytes, list[int]], int]:
    """Each ordinary token's bytes (what it adds to the text), and the EOS id. Special tokens are left
    out: a constraint never lets the model write them (EOS ends a finished constraint)."""
    hf = tok.hf
    special = set(hf.all_special_ids)
    decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    table = _byte_decoder()
    hex_byte = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
    out: dict[bytes, list[int]] = {}
    for text, i in hf.get_vocab().items():
        if i in special:
            continue
        if byte_level and all(c in table for c in text):
            raw = bytes(table[c] for c in text)
        elif m := hex_byte.match(text):
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = text.replace("\u2581", " ").encode()
        if raw:
            out.setdefault(raw, []).append(i)
    eos = tok.eos_id if tok.eos_id is not None else tok.eod_id
    return out, eos


def regex_of(g: pb.Guided) -> tuple[str, str]:
    """(regular expression, the request field it came from) of a constraint; InvalidArgument naming the
    field when it cannot be one."""
    from outlines_core.json_schema import build_regex_from_schema

    kind = g.WhichOneof("kind")
    if kind == "regex":
        field = g.field or "guided_regex"
        try:
            re.compile(g.regex)
        except re.error as e:
            raise InvalidArgument(f"{field} is not a valid regular expression: {e}", field=field) from None
        return g.regex, field
    if kind == "choice":
        field = g.field or "guided_choice"
        values = list(g.choice.values)
        if not values or len(values) > MAX_CHOICES or any(not v for v in values):
            raise InvalidArgument(f"{field} must be 1..{MAX_CHOICES} non-empty strings", field=field)
        return "(" + "|".join(re.escape(v) for v in values) + ")", field
    field = g.field or "response_format"
    schema = '{"type": "object"}' if kind == "json_object" else g.json_schema
    try:
        _check_enforceable(json.loads(schema), field)
        return build_regex_from_schema(schema), field
    except (ValueError, TypeError) as e:
        raise InvalidArgument(
            f"{field}: the JSON schema cannot be used for constrained decoding ({e})", field=field
        ) from None


def _check_enforceable(node: Any, field: str, path: str = "$") -> None:
    """InvalidArgument naming the first keyword of the schema that decoding would not enforce."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in UNENFORCED and not (path.endswith(".properties") or path.endswith(".$defs")):
                raise InvalidArgument(
                    f"{field}: the schema keyword {key!r} (at {path}) cannot be enforced while "
                    f"decoding; drop it (supported: type, properties, required, enum, const, items, "
                    f"minItems/maxItems, minLength/maxLength, pattern, format, anyOf/oneOf/allOf, $ref)",
                    field=field,
                )
            _check_enforceable(value, field, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_enforceable(value, field, f"{path}[{i}]")


class Constraints:
    """Compiles constraints against one tokenizer's vocabulary (built on first use) and caches them."""

    def __init__(self, tok: Tokenizer, model_vocab: int) -> None:
        self.tok = tok
        self.model_vocab = model_vocab  # logits rows are this long (>= the tokenizer's vocabulary)
        self._vocabulary: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.compiled = 0

    def index(self, g: pb.Guided) -> Any:
        """The compiled index of ``g`` (from the cache when compiled before); InvalidArgument naming the
        request field when the constraint cannot be compiled or allows no text at all."""
        from outlines_core import Index, Vocabulary

        regex, field = regex_of(g)
        with self._lock:
            hit = self._cache.get(regex)
            if hit is not None:
                self._cache.move_to_end(regex)
                return hit
            if self._vocabulary is None:
                mapping, eos = token_bytes(self.tok)
                self._vocabulary = Vocabulary(eos, mapping)
        try:
            index = Index(regex, self._vocabulary)
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidArgument(
                f"{field}: the constraint cannot be compiled against the vocabulary ({e})", field=field
            ) from None
        with self._lock:
            self._cache[regex] = index
            self.compiled += 1
            while len(self._cache) > INDEX_CACHE:
                self._cache.popitem(last=False)
        return index


class GuideState:
    """One sequence's walk through a compiled constraint, and the mask of the tokens it allows next."""

    def __init__(self, index: Any, vocab: int) -> None:
        from outlines_core import Guide

        self.guide = Guide(index)
        self.vocab = vocab
        self._words = torch.zeros(-(-vocab // 32), dtype=torch.int32, device="cpu")
        self._bits = self._words.numpy()  # the same memory; bit j of word w = token 32w + j
        self._current = False  # whether _words holds the mask of the present state

    def _mask(self) -> np.ndarray:
        if not self._current:
            self._words.zero_()
            self.guide.write_mask_into(self._words.data_ptr(), self._words.numel(), 4)
            self._current = True
        return self._bits

    def allows(self, token: int) -> bool:
        """Whether the constraint allows ``token`` next (one bit of the mask: the engine's check of a greedy
        pick before it builds the whole mask)."""
        return 0 <= token < self.vocab and bool((int(self._mask()[token >> 5]) >> (token & 31)) & 1)

    def allowed(self, device: torch.device) -> torch.Tensor:
        """Bool [vocab]: the tokens the constraint allows now."""
        # little-endian words as bytes, each byte's bits lowest first: bit i of byte b is token 8b + i
        bits = np.unpackbits(self._mask().view(np.uint8), bitorder="little")[: self.vocab]
        return torch.from_numpy(bits.view(np.bool_)).to(device)

    def advance(self, token: int) -> None:
        self.guide.advance(token, return_tokens=False)  # by default it builds the list of allowed ids
        self._current = False

    def finished(self) -> bool:
        return self.guide.is_finished()
