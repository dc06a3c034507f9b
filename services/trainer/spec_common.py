"""What every kind of training spec shares: the names of kinds, precisions and schedules, and the paths a
job reads (its inputs) and writes (its save folder), with the rule that keeps the two apart. Apart from
``spec`` so that the per-kind checks (``hf_spec``) and ``spec`` both import it.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import InvalidArgument

PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "full", "selective")
DECAY_STYLES = ("cosine", "linear", "constant")
HF_DEEPSPEED = "hf-deepspeed"
KINDS = ("pretrain", "sft", HF_DEEPSPEED)


def dataset_prefixes(spec) -> list[str]:
    """The indexed-dataset prefixes the job reads (SFT: the input_ids/labels/attention_mask trio)."""
    return _prefixes(spec.kind, [*spec.data_paths, *spec.valid_data_paths])


def _prefixes(kind: str, paths) -> list[str]:
    if kind == HF_DEEPSPEED:  # reads JSON records, no indexed datasets
        return []
    if kind == "sft":
        return [
            f"{p}_packed_{k}_document" for p, _ in paths for k in ("input_ids", "labels", "attention_mask")
        ]
    return [p for p, _ in paths]


def trainer_owned(folder: Path) -> bool:
    """A save folder an earlier megastack trainer wrote (before the output marker existed)."""
    try:
        return (
            json.loads((Path(folder) / "megastack.json").read_text()).get("created_by") == "megastack trainer"
        )
    except (OSError, ValueError, AttributeError):
        return False


def job_inputs(spec) -> list[Path]:
    """Every path the job reads: the save folder may not equal, contain or sit inside any of them."""
    out = [Path(p) for p in (spec.init_from, spec.architecture, spec.tokenizer, spec.hf_model) if p]
    out += [Path(p) for p in (*spec.data_files, *spec.valid_data_files)]
    for prefix in dataset_prefixes(spec):
        out += [Path(prefix + ".bin"), Path(prefix + ".idx")]
    return out


def check_save_dir(spec) -> Path:
    """The resolved save folder, or InvalidArgument: it must be new, empty, or one megastack's trainer wrote
    (resume), and never overlap an input; the trainer cleans old ``iter_*`` folders and rewrites
    ``tokenizer/`` there, so it must not hold anything else."""
    from shared.atomic import check_output_folder

    return check_output_folder(
        Path(spec.save_dir), inputs=job_inputs(spec), field="checkpoint.save_dir", owned=trainer_owned
    )


def check_resources(spec) -> None:
    """The retry and hang settings every kind shares (400 naming the field)."""
    if not spec.hang_timeout_s > 0:
        raise InvalidArgument("resources.hang_timeout_s must be > 0", field="resources.hang_timeout_s")
    if spec.max_retries < 0:
        raise InvalidArgument("resources.max_retries must be >= 0", field="resources.max_retries")
