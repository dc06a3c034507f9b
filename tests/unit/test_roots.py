"""shared/roots.py: job paths under the data roots (resolved first), model endpoints from an allow-list."""

from __future__ import annotations

import pytest

from services.trainer.spec import TrainSpec, check_roots
from shared.errors import InvalidArgument
from shared.paths import REPO_ROOT
from shared.roots import check_endpoint, data_roots, under_roots


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "data"
    r.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (r / "escape").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("MEGASTACK_DATA_ROOTS", f"{r},{tmp_path / 'second'}")
    return r


def test_paths_under_a_root_pass_resolved(root):
    assert under_roots(root / "a" / ".." / "b", "save_dir") == root / "b"
    assert under_roots(root, "save_dir") == root
    assert data_roots() == (root, root.parent / "second")


@pytest.mark.parametrize("bad", ["/etc/passwd", "{root}/../elsewhere", "{root}/escape/x", "{root}2", "~"])
def test_paths_outside_every_root_are_refused_naming_field_and_roots(root, bad):
    with pytest.raises(InvalidArgument, match="outside the data roots") as e:
        under_roots(bad.format(root=root), "data.paths")
    assert e.value.field == "data.paths" and str(root) in e.value.message


def test_default_roots_are_the_repositorys_runs_and_models_and_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MEGASTACK_DATA_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_roots() == (REPO_ROOT / "runs", REPO_ROOT / "models", tmp_path.resolve())


def test_a_training_job_is_confined_field_by_field(root):
    ok = TrainSpec(
        name="x",
        kind="pretrain",
        seq_length=8,
        train_iters=1,
        save_dir=str(root / "run"),
        data_paths=((str(root / "d_text_document"), 1.0),),
        init_from=str(root / "mc"),
    )
    check_roots(ok)
    import dataclasses

    for over, field in [
        ({"save_dir": "/var/tmp/run"}, "checkpoint.save_dir"),
        ({"init_from": "/opt/model"}, "model.init_from"),
        ({"data_paths": (("/srv/d", 1.0),)}, "data.paths"),
        ({"tokenizer": str(root / "escape")}, "model.tokenizer"),
        ({"data_cache_dir": "/"}, "data.cache_dir"),
        ({"architecture": "/etc"}, "model.architecture"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            check_roots(dataclasses.replace(ok, **over))
        assert e.value.field == field


@pytest.mark.parametrize(
    "address, ok",
    [
        ("127.0.0.1:50051", True),
        ("http://localhost:5000/v1/completions", True),
        ("textgen:50051", True),
        ("textgen:50052", False),
        ("http://169.254.169.254/latest", False),
        ("10.0.0.1:50051", False),
        ("http://gateway/v1/completions", True),
        ("https://gateway/v1", False),
        ("[::1]:50051", True),
    ],
)
def test_endpoints_match_host_or_host_port_entries(monkeypatch, address, ok):
    monkeypatch.setenv(
        "MEGASTACK_ALLOWED_ENDPOINTS", "127.0.0.1:50051,localhost,textgen:50051,gateway:80,[::1]:50051"
    )
    if ok:
        check_endpoint(address, "completions_url")
    else:
        with pytest.raises(InvalidArgument, match="not an allowed model endpoint") as e:
            check_endpoint(address, "completions_url")
        assert e.value.field == "completions_url"
