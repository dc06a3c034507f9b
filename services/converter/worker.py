"""python -m services.converter.worker JOB_JSON: one conversion in its own process (run by the service).

Progress goes to stdout as Reporter lines; SIGTERM (cancel) raises inside the conversion, so the
temporary output folder is removed before the process exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys

from services.converter.conversion import convert
from services.converter.wire import spec_from_record
from shared.errors import ServiceError
from shared.jobs import Reporter

logger = logging.getLogger("services.converter.worker")


class Cancelled(BaseException):
    pass


def _on_sigterm(*_):
    raise Cancelled()


def main(path: str) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    rep = Reporter()
    spec = spec_from_record(json.loads(open(path).read()))
    try:
        result = convert(spec, lambda done, total, msg: rep.progress(done, total, "tensors", msg))
    except ServiceError as e:
        rep.error(e.message)
        return 1
    except Cancelled:
        logger.info("cancelled: the partial output was removed")
        return 1
    except Exception as e:  # noqa: BLE001 - report it as one line; the traceback goes to the job log
        logger.exception("conversion failed")
        rep.error(f"{type(e).__name__}: {e}")
        return 1
    rep.progress(result.num_tensors, result.num_tensors, "tensors", "done", force=True)
    rep.result(dataclasses.asdict(result))
    for line in result.summary.splitlines():
        logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
