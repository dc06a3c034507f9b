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
