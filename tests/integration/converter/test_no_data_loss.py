"""A conversion never destroys what megastack did not write (hostile tests: each tries to, and every byte of
the tree it aimed at must be unchanged): targets that equal, contain or are inside an input (also through
`..` and symlinks), files, `/` and the home directory, and `--overwrite` of a folder megastack did not
write."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.converter.conversion import ConvertSpec, convert
from shared.errors import AlreadyExists, InvalidArgument
from shared.paths import REPO_ROOT


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = (
                "dir"
                if p.is_dir()
                else "link"
                if p.is_symlink()
                else hashlib.sha256(p.read_bytes()).hexdigest()
            )
    return out


@pytest.fixture()
def models(tmp_path, tiny_models) -> Path:
    """/x/models/llama/{hf, notes.txt} and a sibling model, as a user keeps them."""
    root = tmp_path / "models"
    shutil.copytree(tiny_models["llama"], root / "llama" / "hf")
    (root / "llama" / "notes.txt").write_text("my notes")
    shutil.copytree(tiny_models["qwen2"], root / "qwen2")
    return root


@pytest.mark.parametrize(
    "save",
    [
        lambda m: m / "llama",  # the issue's case: the parent of the source
        lambda m: m,  # a grandparent
        lambda m: m / "llama" / "hf",  # the source itself
        lambda m: m / "llama" / "hf" / "out",  # inside the source
        lambda m: m / "llama" / "hf" / ".." / ".." / "llama",  # the parent, spelled with ..
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_target_over_the_source_is_refused_and_nothing_changes(models, save, overwrite):
    before = tree_digest(models)
    with pytest.raises(InvalidArgument, match="a job never writes over its inputs"):
        convert(
            ConvertSpec(
                load_dir=models / "llama" / "hf",
                save_dir=save(models),
                target_format="mcore",
                overwrite=overwrite,
            )
        )
    assert tree_digest(models) == before


def test_a_symlink_to_the_source_parent_is_refused(models, tmp_path):
    link = tmp_path / "innocent-looking"
    link.symlink_to(models / "llama")
    before = tree_digest(models)
    with pytest.raises(InvalidArgument, match="a job never writes over its inputs"):
        convert(
            ConvertSpec(load_dir=models / "llama" / "hf", save_dir=link, target_format="hf", overwrite=True)
        )
    assert tree_digest(models) == before


def test_a_lora_adapter_inside_the_target_is_refused(models, tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="a job never writes over its inputs"):
        convert(
            ConvertSpec(
                load_dir=models / "llama" / "hf",
                save_dir=tmp_path / "run",
                lora_dir=adapter,
                target_format="hf",
                overwrite=True,
            )
        )
    assert adapter.is_dir()


def test_overwrite_never_replaces_a_folder_megastack_did_not_write(models, tmp_path):
    user = tmp_path / "my-project"
    (user / "src").mkdir(parents=True)
    (user / "src" / "train.py").write_text("print('years of work')")
    before = tree_digest(user)
    with pytest.raises(InvalidArgument, match=r"was not written by megastack \(no \.megastack-output"):
        convert(
            ConvertSpec(load_dir=models / "llama" / "hf", save_dir=user, target_format="hf", overwrite=True)
        )
    assert tree_digest(user) == before
    with pytest.raises(AlreadyExists):
        convert(ConvertSpec(load_dir=models / "llama" / "hf", save_dir=user, target_format="hf"))
    assert tree_digest(user) == before


def test_a_file_root_or_home_is_refused(models, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(InvalidArgument, match="is a file"):
        convert(ConvertSpec(load_dir=models / "llama" / "hf", save_dir=f, target_format="hf", overwrite=True))
    assert f.read_text() == "x"
    for target in (Path("/"), Path.home(), Path("~")):
        with pytest.raises(
            InvalidArgument, match="filesystem root or the home directory|never writes over its inputs"
        ):
            convert(
                ConvertSpec(
                    load_dir=models / "llama" / "hf", save_dir=target, target_format="hf", overwrite=True
                )
            )


def test_the_issue_command_line_exits_2_and_loses_nothing(models):
    before = tree_digest(models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "convert",
            "--load-dir",
            str(models / "llama" / "hf"),
            "--save-dir",
            str(models / "llama"),
            "--target-format",
            "mcore",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "a job never writes over its inputs" in out.stderr
    assert tree_digest(models) == before
