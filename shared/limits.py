"""Numeric limits of the wire, stated once for every edge that checks a request (gateway dialects, textgen).

Integers must fit the proto field they travel in (a JSON number past it is a client's mistake, answered
400 naming the field, never a 500 from the protobuf runtime); sampling values below these epsilons mean
what the text says, whatever float32 would round them to on the wire.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

MIN_TEMPERATURE = 1e-5
"""A temperature below this (0 included) is greedy decoding: 1e-40 is 0 in float32, and logits / 1e-40
overflow; 1e-5 keeps ``logits / temperature`` finite for any logit a model produces."""

MIN_TOP_P = 1e-6
"""A top_p in (0, MIN_TOP_P) keeps only the most likely token, which is greedy decoding (a top_p of
1e-300 would be 0, 'off', in float32)."""

MAX_REQUEST_ID_CHARS = 128

MAX_TOP_LOGPROBS = 20
"""Most alternatives per position a request may ask for (OpenAI's ``logprobs``/``top_logprobs`` limit)."""

MAX_STOP_SEQUENCES = 16
"""Most stop strings (and, separately, stop token ids) in one request."""

MAX_OPENAI_PENALTY = 2.0
"""OpenAI's presence_penalty and frequency_penalty lie in [-2, 2]."""

MAX_LOGIT_BIAS = 100.0
"""A logit_bias value lies in [-100, 100]; -100 bans the token."""

MAX_LOGIT_BIAS_TOKENS = 1024
"""Most tokens one request may bias."""

MAX_N = 16
"""Most sequences one prompt may ask for (OpenAI's ``n``)."""
