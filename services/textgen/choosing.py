"""Per-sequence token rules: choosing the next token from a logits row (penalties, biases, Megatron's
newline-after-colon rule, min_tokens), its log-probabilities, and whether a token ends the sequence.

Pure functions of one sequence's request and tokens, so the engine loop only schedules and batches.
"""

from __future__ import annotations

import torch

from services.textgen.sampling import (
    apply_logit_bias,
    apply_openai_penalties,
    apply_repetition_penalty,
    next_top_p,
    sample_row,
)
from services.textgen.sequences import EOL, EOS, LENGTH, STOP_SEQUENCE, SequenceRequest, TokenizerInfo, TopK


def token_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, TopK | None]:
    """Log-probability of ``token`` under the model's distribution (log-softmax of the raw row [V]),
    and its top-``k`` alternatives when ``k > 0``."""
    logp = torch.log_softmax(row.float(), dim=-1)  # (V,)
    top = None
    if k:
        vals, idx = torch.topk(logp, k)
        top = TopK(tuple(idx.tolist()), tuple(vals.tolist()))
    return float(logp[token]), top


def prompt_scores(req: SequenceRequest, logp: torch.Tensor | None) -> tuple[list[float], list[TopK] | None]:
    """Prompt log-probs (and top-k when asked) from rows of log-probs [N, V], row i predicting prompt token
    ``scored_from + i``; None rows: nothing to score."""
    if logp is None:
        return [], [] if req.top_logprobs else None
    ids = torch.tensor(req.prompt_ids[req.scored_from :], dtype=torch.long, device=logp.device)
    scores = logp.gather(-1, ids[:, None]).squeeze(-1).tolist()
    top = None
    if req.top_logprobs:
        vals, idx = torch.topk(logp, req.top_logprobs, dim=-1)
        top = [TopK(tuple(i), tuple(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return scores, top


def takes_the_argmax(req: SequenceRequest, gen_ids: list[int]) -> bool:
    """Whether the next token is the logits row's argmax whenever a structured-output constraint allows it
    (greedy, no penalty, bias or token rule changing the row): the engine then checks that one token against
    the constraint instead of building its whole mask."""
    st, stopping = req.sampling, req.stopping
    too_soon = len(gen_ids) < stopping.min_tokens  # EOS and stop ids are not allowed yet
    return (
        st.is_greedy and not st.adjusts_logits and not stopping.prevent_newline_after_colon and not too_soon
    )


def choose_token(
    req: SequenceRequest,
    gen_ids: list[int],
    row: torch.Tensor,
    pick: int,
    tok: TokenizerInfo,
    top_p: float,
    generator: torch.Generator | None,
    allowed: torch.Tensor | None = None,
) -> tuple[int, float]:
    """The next token from the logits row [V] (``pick`` is its argmax) and the sequence's next top_p;
    ``allowed`` (bool [>= V]): the tokens a structured-output constraint lets come next."""
    st, stopping = req.sampling, req.stopping
    too_soon = len(gen_ids) < stopping.min_tokens  # EOS and stop ids are not allowed yet
    if allowed is None and takes_the_argmax(req, gen_ids):
        return pick, top_p
    x = row[: tok.vocab_size]  # (V,) ids past the tokenizer's vocabulary (padding) are never chosen
    if st.repetition_penalty not in (0.0, 1.0):
        seen = torch.tensor(list(req.prompt_ids) + gen_ids, dtype=torch.long, device=x.device).unique()
        x = apply_repetition_penalty(x, seen[seen < x.shape[-1]], st.repetition_penalty)
    x = apply_openai_penalties(x, gen_ids, st.presence_penalty, st.frequency_penalty)
    x = apply_logit_bias(x, st.logit_bias)
    if too_soon:
        banned = [*stopping.stop_token_ids] + (list(tok.ends) if not stopping.ignore_eos else [])
        banned = [i for i in banned if i is not None and i < x.shape[-1]]
        if banned:
            x = x.clone()
            x[banned] = float("-inf")
    if stopping.prevent_newline_after_colon and tok.colon_id is not None and tok.newline_id is not None:
        prev = gen_ids[-1] if gen_ids else req.prompt_ids[-1]
        if prev == tok.colon_id:
            x = x.clone()
            x[tok.newline_id] = -1e10
    if allowed is not None:
        x = x.masked_fill(~allowed[: x.shape[-1]], float("-inf"))
    return sample_row(x, st, top_p, generator), next_top_p(st, top_p)


def stop_reason(
    req: SequenceRequest,
    gen_ids: list[int],
    token: int,
    tok: TokenizerInfo,
    seen: str | None,
    at_context_end: bool,
) -> tuple[str | None, str]:
    """Why ``token`` (just appended to ``gen_ids``) ends the sequence, and the stop string it matched
    (``seen``: the stop string the generated text now contains, from the sequence's StopWatch); None when it
    goes on."""
    stop = req.stopping
    early = len(gen_ids) < stop.min_tokens  # only the length (and Megatron's EOL rules) end it yet
    if not early and ((token in tok.ends and not stop.ignore_eos) or token in stop.stop_token_ids):
        return EOS, ""
    prev = gen_ids[-2] if len(gen_ids) > 1 else (req.prompt_ids[-1] if req.prompt_ids else None)
    if stop.stop_on_double_eol and (
        (token == tok.double_newline_id and token is not None)
        or (token == tok.newline_id and prev == tok.newline_id)
    ):
        return EOL, ""
    if stop.stop_on_eol and token is not None and token in (tok.newline_id, tok.double_newline_id):
        return EOL, ""
    if seen is not None and not early:
        return STOP_SEQUENCE, seen
    if len(gen_ids) >= stop.max_new_tokens or at_context_end:
        return LENGTH, ""
    return None, ""
