"""Incremental detokenization: the text a growing list of token ids adds, in O(1) per token.

Decoding the whole sequence at every token costs O(n) per token, O(n^2) per stream. Instead two offsets
bound a short window, as TGI and vLLM do: ``prefix`` marks where the window starts (text before it is
final) and ``read`` how far text has been given out. A new token decodes ``ids[prefix:]`` against
``ids[prefix:read]``; the difference is the new text, held back while it ends in an incomplete UTF-8
sequence (U+FFFD). Decoding from ``prefix`` rather than from the new token alone keeps what a tokenizer
does at a piece's start (SentencePiece's leading space, byte-level merges) exactly as in the whole text.
"""

from __future__ import annotations

from collections.abc import Callable

# tokens kept before the unread ones: enough context for any tokenizer's leading-space or byte rules
CONTEXT = 6


class IncrementalDetokenizer:
    """``push(id)`` returns the text that token completes ("" while its bytes are not a whole character)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids whose text has been returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.read = len(self.ids)
        self.prefix = max(self.prefix, self.read - CONTEXT)
        return now[len(before) :]


class StopWatch:
    """Stop strings in a sequence's generated text, O(1) per token: ``push(id)`` feeds the same incremental
    detokenization as streaming and returns the stop string the text now contains (None while it has none).
    Only the last ``2 * longest stop`` characters are kept between tokens (the new piece is searched with
    them, whatever its length): a stop string is seen the token it completes."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(decode)
        self.stops = [s for s in stops if s]
        self.keep = 2 * max((len(s) for s in self.stops), default=1)
        self.tail = ""

    def push(self, token_id: int) -> str | None:
        text = self.tail + self.detok.push(token_id)  # a piece may bring several characters at once
        self.tail = text[-self.keep :]
        return next((s for s in self.stops if s in text), None)
