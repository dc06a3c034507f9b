"""The gateway's job endpoints (/v1/jobs/...) in front of a real converter service (real gRPC, real worker
processes)."""

from __future__ import annotations

import json

import pytest
import requests

from shared.net import free_port
from tests.fixtures.servers import start_converter, start_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, textgen):
    servicer, server = start_converter(tmp_path_factory.mktemp("jobs"))
    # the trainer is "not deployed" (no address); the evaluator's address answers nothing
    gw = start_gateway(
        (textgen.address,),
        converter_addr=server.address,
        trainer_addr="",
        evaluator_addr=f"127.0.0.1:{free_port()}",
    )
    yield gw
    gw.stop()
    servicer.runner.shutdown()
    server.stop(0)


def events(url: str) -> list[dict]:
    with requests.get(url, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        return [
            json.loads(line[len("data: ") :])
            for line in r.iter_lines(decode_unicode=True)
            if line.startswith("data: ")
        ]


def test_submit_follow_get_list_a_conversion(gateway, tiny_models, tmp_path):
    spec = {
        "load_dir": str(tiny_models["gpt2"]),
        "save_dir": str(tmp_path / "out"),
        "target_format": "CHECKPOINT_FORMAT_MCORE",
        "verify": True,
    }
    r = requests.post(
        f"{gateway.url}/v1/jobs/conversions", json={"spec": spec, "labels": {"who": "http"}}, timeout=30
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    assert r.headers["Location"] == f"/v1/jobs/conversions/{job_id}"

    seen = events(f"{gateway.url}/v1/jobs/conversions/{job_id}/events")
    states = [e["status"]["state"] for e in seen]
    assert states[-1] == "JOB_STATE_SUCCEEDED", seen[-1]
    assert all(e["status"]["job_id"] == job_id for e in seen)

    got = requests.get(f"{gateway.url}/v1/jobs/conversions/{job_id}", timeout=30).json()
    assert got["kind"] == "conversions" and got["status"]["labels"] == {"who": "http"}
    assert got["result"]["parity"]["max_abs_logit_diff"] <= 1e-5 and (tmp_path / "out" / "release").is_dir()

    listed = requests.get(f"{gateway.url}/v1/jobs", params={"state": "succeeded"}, timeout=30).json()
    assert job_id in [j["status"]["job_id"] for j in listed["jobs"] if j["kind"] == "conversions"]
    # a kind that is not deployed or not reachable is named, the others still listed
    assert set(listed["unavailable"]) == {"training", "evaluations"}
    again = requests.post(
        f"{gateway.url}/v1/jobs/conversions/{job_id}/cancel", json={"reason": "too late"}, timeout=30
    )
    assert 400 <= again.status_code < 500 and again.json()["message"]


@pytest.mark.parametrize(
    "method,path,body,status,fragment,field",
    [
        ("POST", "/v1/jobs/conversions", {"spec": {"load_dirr": "/x"}}, 400, "load_dirr", "load_dirr"),
        (
            "POST",
            "/v1/jobs/conversions",
            {"spec": {"target_format": "NOT_A_FORMAT"}},
            400,
            "NOT_A_FORMAT",
            None,
        ),
        ("POST", "/v1/jobs/conversions", {"labels": {}}, 400, "'spec'", "spec"),
        (
            "POST",
            "/v1/jobs/conversions",
            {
                "spec": {
                    "load_dir": "/tmp/nowhere-megastack",
                    "save_dir": "/tmp/megastack-test-never-made",
                    "target_format": "CHECKPOINT_FORMAT_MCORE",
                }
            },
            404,
            "does not exist",
            None,
        ),
        (
            "POST",
            "/v1/jobs/conversions",
            {"spec": {"load_dir": "/x", "save_dir": "/tmp/x"}},
            400,
            "target_format",
            None,
        ),
        ("GET", "/v1/jobs/conversions/conv-nope", None, 404, "conv-nope", None),
        ("GET", "/v1/jobs/conversions/conv-nope/events", None, 404, "conv-nope", None),
        ("GET", "/v1/jobs/recipes", None, 404, "unknown job kind", "kind"),
        ("GET", "/v1/jobs/conversions?limit=abc", None, 400, "limit", "limit"),
        ("GET", "/v1/jobs?state=sleeping", None, 400, "state must be one of", "state"),
        ("GET", "/v1/jobs/training", None, 503, "MEGASTACK_GATEWAY_TRAINER_ADDR", None),
        ("GET", "/v1/jobs/evaluations", None, 503, "evaluator service is unavailable", None),
        ("POST", "/v1/jobs/conversions/x/cancel", {"reason": 3}, 400, "reason", "reason"),
    ],
)
def test_bad_requests_are_4xx_or_503_naming_what_is_wrong(
    gateway, method, path, body, status, fragment, field
):
    r = requests.request(method, gateway.url + path, json=body, timeout=30)
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert fragment in doc["message"], doc
    if field:
        assert doc["field"] == field, doc


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"save_dir": "{outside}", "overwrite": True}, "save_dir"),  # the reviewer's reproduction
        ({"save_dir": "{root}/../outside", "overwrite": True}, "save_dir"),  # .. resolved
        ({"save_dir": "{root}/link", "overwrite": True}, "save_dir"),  # a symlink resolved
        ({"load_dir": "{outside}"}, "load_dir"),
        ({"lora_load": "/etc"}, "lora_load"),
    ],
)
def test_job_paths_outside_the_data_roots_are_refused_and_nothing_changes(
    gateway, tiny_models, tmp_path, monkeypatch, spec, field
):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / ".megastack-output").write_text(
        "{}"
    )  # even a folder megastack once wrote, when outside the roots
    (outside / "precious.txt").write_text("keep me")
    (root / "link").symlink_to(outside)
    model = root / "model"
    import shutil

    shutil.copytree(tiny_models["gpt2"], model)
    monkeypatch.setenv("MEGASTACK_DATA_ROOTS", str(root))
    body = {"load_dir": str(model), "save_dir": str(root / "out"), "target_format": "CHECKPOINT_FORMAT_MCORE"}
    body.update(
        {k: v.format(root=root, outside=outside) if isinstance(v, str) else v for k, v in spec.items()}
    )
    before = _tree(tmp_path)
    r = requests.post(f"{gateway.url}/v1/jobs/conversions", json={"spec": body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and "data roots" in r.json()["message"], r.json()
    assert _tree(tmp_path) == before and not (root / "out").exists()
