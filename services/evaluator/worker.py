"""python -m services.evaluator.worker SPEC_JSON WORK_DIR [REQUEST_CACHE]: one evaluation in its own
process."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from services.evaluator.harness import run
from services.evaluator.wire import spec_from_record
from shared.errors import ServiceError
from shared.jobs import Reporter

logger = logging.getLogger("services.evaluator.worker")


def main(spec_path: str, work_dir: str, request_cache: str | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rep = Reporter()
    spec = spec_from_record(json.loads(Path(spec_path).read_text()))
    try:
        result = run(
            spec,
            Path(work_dir),
            lambda done, total, what: rep.progress(done, total, "requests", what),
            request_cache=Path(request_cache) if request_cache else None,
        )
    except ServiceError as e:
        rep.error(e.message)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the record, the traceback for the log
        logger.exception("evaluation failed")
        rep.error(f"{type(e).__name__}: {e}")
        return 1
    rep.progress(result["num_requests"], result["num_requests"], "requests", "done", force=True)
    rep.result(result)
    for line in result["summary"].splitlines():
        logger.info("%s", line)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # The record is written. Exit now: a gRPC future left pending by a run whose textgen went away can
    # deadlock in its __del__ while the interpreter shuts down (seen: the worker lived on, its job "running").
    os._exit(code)
