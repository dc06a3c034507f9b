"""Reading a checkpoint never runs code: a torch_dist folder whose ``.metadata`` would run a command when
unpickled is refused, with a clear error, by every reader (converter CLI and service code, textgen,
the trainer's init and resume gate), and the command does not run."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm.checkpoints.megatron import iteration_dir
from llm.checkpoints.safe_pickle import check_dcp_checkpoint, read_dcp_metadata
from shared.errors import InvalidArgument
from shared.paths import REPO_ROOT


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def poisoned(train_assets, tmp_path) -> tuple[Path, Path]:
    """A copy of a real torch_dist checkpoint whose .metadata runs `touch <marker>` when unpickled."""
    ckpt = tmp_path / "poisoned"
    shutil.copytree(train_assets["mcore"], ckpt)
    marker = tmp_path / "pwned"
    with (iteration_dir(ckpt) / ".metadata").open("wb") as f:
        pickle.dump(_Exploit(marker), f)
    return ckpt, marker


def test_the_real_checkpoint_reads_with_the_allow_list(train_assets):
    md = read_dcp_metadata(iteration_dir(train_assets["mcore"]))
    assert md.state_dict_metadata and md.storage_data


def test_the_exploit_would_run_under_plain_pickle(poisoned):
    """The test's own control: plain pickle (what DCP's reader does) runs the command."""
    ckpt, marker = poisoned
    with (iteration_dir(ckpt) / ".metadata").open("rb") as f:
        pickle.load(f)  # noqa: S301 - the point of the control
    assert marker.exists()


def test_readers_refuse_it_and_nothing_runs(poisoned):
    from llm.checkpoints import open_checkpoint

    ckpt, marker = poisoned
    with pytest.raises(
        InvalidArgument, match=r"refused to load: posix\.system is not a class torch_dist metadata"
    ):
        open_checkpoint(ckpt)
    with pytest.raises(InvalidArgument, match="refused to load"):
        check_dcp_checkpoint(iteration_dir(ckpt))  # the gate in front of megatron-core's loader
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line(poisoned, tmp_path):
    ckpt, marker = poisoned
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "convert",
            "--load-dir",
            str(ckpt),
            "--save-dir",
            str(tmp_path / "out"),
            "--target-format",
            "hf",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "refused to load" in out.stderr, out.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_textgen_refuses_to_serve_it(poisoned):
    ckpt, marker = poisoned
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    env.update(
        {
            "MEGASTACK_TEXTGEN_MODEL_DIR": str(ckpt),
            "MEGASTACK_TEXTGEN_PORT": "0",
            "MEGASTACK_TEXTGEN_METRICS_PORT": "0",
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "services.textgen"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "refused to load" in out.stderr
    assert not marker.exists()


def test_a_byte_entry_that_would_run_code_is_refused_before_megatron_reads_it(train_assets, tmp_path):
    """DCP's planner torch.loads byte entries (_extra_state, RNG state) with weights_only=False; megastack
    checks each one with the weights-only unpickler first. The entry here is planted by pointing an
    _extra_state object at a pickle appended to the data file (the .metadata itself stays plain)."""
    import io

    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = tmp_path / "poisoned-entry"
    shutil.copytree(train_assets["mcore"], ckpt)
    it = iteration_dir(ckpt)
    md = read_dcp_metadata(it)
    marker = tmp_path / "pwned"
    idx = next(i for i in md.storage_data if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = md.storage_data[idx]
    data = it / info.relative_path
    blob = io.BytesIO()
    torch.save(_Exploit(marker), blob)
    offset = data.stat().st_size
    with data.open("ab") as f:
        f.write(blob.getvalue())
    info.offset, info.length = offset, len(blob.getvalue())
    with (it / ".metadata").open("wb") as f:
        pickle.dump(md, f)
    read_dcp_metadata(it)  # the metadata alone is clean
    with pytest.raises(InvalidArgument, match=rf"refused to load entry {idx.fqn}: it is not plain data"):
        check_dcp_checkpoint(it)
    assert not marker.exists()
    # and the planted entry is real: DCP's own way of reading it runs the command
    torch.load(io.BytesIO(blob.getvalue()), weights_only=False)
    assert marker.exists()
