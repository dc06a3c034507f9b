"""Start-up self-test (TGI's Warmup): one real prefill + decode before the server reports SERVING."""

from __future__ import annotations

import logging
import time

from services.textgen.loader import ServedModel
from services.textgen.sampling import SamplingSpec
from services.textgen.sequences import ERROR, SequenceRequest, StopSpec
from shared.errors import StartupError

logger = logging.getLogger(__name__)


def warmup(served: ServedModel) -> None:
    t0 = time.perf_counter()
    ids = tuple(served.tokenizer.encode("Hello")) or (served.tokenizer.eod_id,)
    req = SequenceRequest(
        prompt_ids=ids,
        sampling=SamplingSpec(greedy=True),
        stopping=StopSpec(max_new_tokens=2, ignore_eos=True),
    )
    handle = served.engine.submit([req])[0]
    served.engine.run_until_idle()
    result = handle.result()
    if result.finish_reason == ERROR:
        raise StartupError(f"warm-up generation failed: {result.error}")
    logger.info("warm-up generation ok in %.2fs", time.perf_counter() - t0)
