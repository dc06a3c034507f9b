"""Megatron-compatible preprocessing: `python tools/preprocess_data.py --input ... --output-prefix ...`.

The same program as `megastack preprocess`; see `--help`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.preprocess.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
