"""`make bench`: run every tools/bench/<name>.py; each writes bench-results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"__init__.py", "common.py", "run_all.py"}


def main() -> int:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.name not in SKIP)
    only = set(sys.argv[1:])
    failed = []
    for name in names:
        if only and name not in only:
            continue
        print(f"\n=== bench: {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent.parent)
        print(
            f"=== {name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        if rc:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
