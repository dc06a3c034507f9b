"""Scoped API keys on a real gateway: 401 without a known key, 403 without the route's scope, open probes."""

from __future__ import annotations

import pytest
import requests

from tests.fixtures.servers import start_gateway


@pytest.fixture(scope="module")
def gateway(textgen, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# a mounted Secret\nops-key:jobs\nroot-key   # all scopes\n")
    gw = start_gateway(
        (textgen.address,),
        api_keys=("gen-key:generate",),
        api_keys_file=str(keys),
        converter_addr="",
        trainer_addr="",
        evaluator_addr="",
    )
    yield gw
    gw.stop()


def call(gw, method, path, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(
        method, gw.url + path, headers=headers, json={} if method == "POST" else None, timeout=30
    )


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_probes_and_metrics_stay_open(gateway, path):
    assert call(gateway, "GET", path).status_code == 200


@pytest.mark.parametrize("key", [None, "wrong", "gen-key:generate", "Bearer"])
def test_no_or_unknown_key_is_401(gateway, key):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs/conversions")):
        r = call(gateway, method, path, key)
        assert r.status_code == 401 and r.json()["field"] == "Authorization", (path, r.text)


def test_each_key_reaches_only_its_scopes(gateway):
    assert call(gateway, "GET", "/v1/models", "gen-key").status_code == 200
    r = call(gateway, "GET", "/v1/jobs/conversions", "gen-key")
    assert r.status_code == 403 and "lacks the 'jobs' scope" in r.json()["message"]
    r = call(gateway, "POST", "/v1/jobs/conversions", "gen-key")
    assert r.status_code == 403
    r = call(gateway, "GET", "/v1/models", "ops-key")
    assert r.status_code == 403 and "lacks the 'generate' scope" in r.json()["message"]
    assert (
        call(gateway, "GET", "/v1/jobs/conversions", "ops-key").status_code == 503
    )  # past auth: not deployed here
    assert call(gateway, "GET", "/v1/models", "root-key").status_code == 200
    assert call(gateway, "GET", "/v1/jobs/conversions", "root-key").status_code == 503
    # PAI-EAS clients send the bare key
    assert (
        requests.get(gateway.url + "/v1/models", headers={"Authorization": "gen-key"}, timeout=30).status_code
        == 200
    )
