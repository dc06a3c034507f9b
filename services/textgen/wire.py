"""protobuf <-> engine types for textgen. The only textgen module besides the servicer that sees *_pb2."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from llm.tokenizers import Tokenizer
from protos.textgen.v1 import textgen_pb2 as pb
from services.textgen.detokenizer import IncrementalDetokenizer
from services.textgen.guided import Constraints
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import (
    CANCELLED,
    EOL,
    EOS,
    LENGTH,
    STOP_SEQUENCE,
    SequenceRequest,
    SequenceResult,
    StopSpec,
    TopK,
)
from shared.errors import InvalidArgument
from shared.limits import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_N,
    MAX_OPENAI_PENALTY,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
)

FINISH = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    EOS: pb.FINISH_REASON_EOS,
    STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    EOL: pb.FINISH_REASON_EOL,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def sampling_spec(s: pb.SamplingParams) -> SamplingSpec:
    temperature = s.temperature or 1.0
    if not s.greedy:
        if not 0.0 < temperature <= 100.0:
            raise InvalidArgument("temperature must be in (0, 100]", field="temperature")
        if s.top_k < 0:
            raise InvalidArgument("top_k must be >= 0", field="top_k")
        if not 0.0 <= s.top_p <= 1.0:
            raise InvalidArgument("top_p must be in [0, 1]", field="top_p")
        if s.top_k > 0 and s.top_p > 0:
            raise InvalidArgument("top_k and top_p are exclusive: set one of them", field="top_p")
        if not 0.0 <= s.top_p_decay <= 1.0:
            raise InvalidArgument("top_p_decay must be in [0, 1]", field="top_p_decay")
        if s.top_p_bound < 0 or s.top_p_bound > max(s.top_p, 0.0):
            raise InvalidArgument("top_p_bound must be in [0, top_p]", field="top_p_bound")
    if s.repetition_penalty < 0:
        raise InvalidArgument("repetition_penalty must be > 0", field="repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if not abs(getattr(s, name)) <= MAX_OPENAI_PENALTY:
            raise InvalidArgument(
                f"{name} must be in [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}]", field=name
            )
    if len(s.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidArgument(f"logit_bias: at most {MAX_LOGIT_BIAS_TOKENS} tokens", field="logit_bias")
    for token, value in s.logit_bias.items():
        if token < 0 or not (math.isfinite(value) and abs(value) <= MAX_LOGIT_BIAS):
            raise InvalidArgument(
                f"logit_bias: token ids must be >= 0 and values in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] "
                f"(got {token}: {value})",
                field="logit_bias",
            )
    return SamplingSpec(
        greedy=s.greedy,
        temperature=temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        top_p_decay=s.top_p_decay,
        top_p_bound=s.top_p_bound,
        seed=s.seed,
        repetition_penalty=s.repetition_penalty or 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=tuple(sorted(s.logit_bias.items())),
    )


def stop_spec(s: pb.StoppingParams) -> StopSpec:
    if s.max_new_tokens < 0:
        raise InvalidArgument("max_new_tokens must be >= 0", field="max_new_tokens")
    stops = tuple(x for x in s.stop if x)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences", field="stop")
    if not 0 <= s.min_tokens <= s.max_new_tokens:
        raise InvalidArgument("min_tokens must be in [0, max_new_tokens]", field="min_tokens")
    if len(s.stop_token_ids) > MAX_STOP_SEQUENCES or any(t < 0 for t in s.stop_token_ids):
        raise InvalidArgument(
            f"stop_token_ids: at most {MAX_STOP_SEQUENCES} ids, each >= 0", field="stop_token_ids"
        )
    return StopSpec(
        max_new_tokens=s.max_new_tokens,
        stop=stops,
        stop_on_eol=s.stop_on_eol,
        stop_on_double_eol=s.stop_on_double_eol,
        prevent_newline_after_colon=s.prevent_newline_after_colon,
        ignore_eos=s.ignore_eos,
        min_tokens=s.min_tokens,
        stop_token_ids=tuple(s.stop_token_ids),
    )


def prompt_ids(p: pb.Prompt, tok: Tokenizer, add_bos: bool) -> tuple[int, ...]:
    kind = p.WhichOneof("kind")
    ids = list(p.tokens.ids) if kind == "tokens" else tok.encode(p.text) if kind == "text" else []
    if add_bos:
        bos = tok.bos_id if tok.bos_id is not None else tok.eod_id
        ids = [bos, *ids]
    return tuple(ids)


def sequence_requests(
    prompts: Sequence[pb.Prompt],
    params: pb.GenerationParams,
    tok: Tokenizer,
    *,
    max_prompts: int,
    constraints: Constraints | None = None,
) -> list[SequenceRequest]:
    if not prompts:
        raise InvalidArgument("prompts is empty", field="prompts")
    if len(prompts) > max_prompts:
        raise InvalidArgument(
            f"at most {max_prompts} prompts per request (max_prompts_per_request)", field="prompts"
        )
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}", field="top_logprobs")
    if params.prompt_logprobs_from < 0 or any(p.logprobs_from < 0 for p in prompts):
        raise InvalidArgument("prompt_logprobs_from must be >= 0", field="prompt_logprobs_from")
    n = params.n or 1
    if not 1 <= n <= MAX_N:
        raise InvalidArgument(f"n must be in [1, {MAX_N}]", field="n")
    if len(prompts) * n > max_prompts:
        raise InvalidArgument(
            f"{len(prompts)} prompts x n={n} is more than {max_prompts} sequences per request "
            "(max_prompts_per_request)",
            field="n",
        )
    sampling = sampling_spec(params.sampling)
    stopping = stop_spec(params.stopping)
    for field, ids in (
        ("logit_bias", [t for t, _ in sampling.logit_bias]),
        ("stop_token_ids", stopping.stop_token_ids),
    ):
        bad = next((t for t in ids if t >= tok.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"{field}: token id {bad} is not in the vocabulary (0..{tok.vocab_size - 1})", field=field
            )
    index = None
    if params.HasField("guided") and params.guided.WhichOneof("kind") is not None:
        if constraints is None:
            raise InvalidArgument(
                "structured output is not available on this server", field="response_format"
            )
        index = constraints.index(params.guided)  # compiled here, in the RPC thread (cached)
    seeded = sampling.seed >= 0
    return [
        SequenceRequest(
            prompt_ids=ids,
            sampling=dataclasses.replace(sampling, seed=sampling.seed + j) if seeded and j else sampling,
            stopping=stopping,
            prompt_logprobs=params.prompt_logprobs,
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            prompt_logprobs_from=p.logprobs_from or params.prompt_logprobs_from,
            guide_index=index,
        )
        for p, ids in ((p, prompt_ids(p, tok, params.add_bos)) for p in prompts)
        for j in range(n)
    ]


def generated_text(r: SequenceResult, tok: Tokenizer, stops: Sequence[str]) -> str:
    """Generated text without a final EOS token, cut before the first stop string."""
    ids = r.token_ids[:-1] if r.finish_reason == EOS and r.token_ids else r.token_ids  # EOS or a stop id
    text = tok.decode(ids)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _top(t: TopK, tok: Tokenizer) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=t.ids, tokens=[tok.decode([i]) for i in t.ids], logprobs=t.logprobs)


def completion(index: int, r: SequenceResult, params: pb.GenerationParams, tok: Tokenizer) -> pb.Completion:
    stops = list(params.stopping.stop)
    text = generated_text(r, tok, stops)
    c = pb.Completion(
        index=index,
        text=text,
        prompt_token_ids=r.prompt_ids,
        token_ids=r.token_ids,
        prompt_tokens=tok.token_texts(r.prompt_ids),
        tokens=tok.token_texts(r.token_ids),
        finish_reason=FINISH.get(r.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        stop_sequence=r.stop_sequence,
        timing=pb.Timing(queue_s=r.queue_s, first_token_s=r.first_token_s, total_s=r.total_s),
    )
    if params.echo:
        c.prompt_text = tok.decode(r.prompt_ids)
        c.full_text = tok.decode(r.prompt_ids + r.token_ids) if not r.stop_sequence else c.prompt_text + text
    if r.prompt_logprobs is not None:
        c.prompt_logprobs.extend(r.prompt_logprobs)
    if r.logprobs is not None:
        c.logprobs.extend(r.logprobs)
    if r.prompt_top:
        c.prompt_top_logprobs.extend(_top(t, tok) for t in r.prompt_top)
    if r.top:
        c.top_logprobs.extend(_top(t, tok) for t in r.top)
    return c


class StreamText:
    """Turns generated ids into text deltas, O(1) per token: complete UTF-8 only, stop strings never leaked
    (the last ``len(longest stop) - 1`` characters wait until more text shows they start no stop string)."""

    def __init__(self, tok: Tokenizer, stops: Sequence[str]) -> None:
        self.detok = IncrementalDetokenizer(tok.decode)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""  # decoded, not yet sent (at most hold characters between pushes)
        self.sent = 0  # characters sent

    def push(self, token_id: int) -> str:
        self.pending += self.detok.push(token_id)
        safe = len(self.pending) - self.hold if self.stops else len(self.pending)
        if safe <= 0:
            return ""
        delta, self.pending = self.pending[:safe], self.pending[safe:]
        self.sent += len(delta)
        return delta

    def finish(self, final_text: str) -> str:
        """What the final text (cut before a stop string) adds to what was sent."""
        delta = final_text[self.sent :] if len(final_text) > self.sent else ""
        self.sent = max(self.sent, len(final_text))
        return delta
