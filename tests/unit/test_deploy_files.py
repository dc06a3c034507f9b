"""deploy/ stays true to the code: manifests name real settings, real modules, real gRPC services and ports;
the specs they run parse; the Prometheus layout matches what the stack renders."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from shared.config import env_name
from shared.paths import REPO_ROOT
from shared.roots import ENDPOINTS_ENV, ROOTS_ENV
from tools.gen_docs import CONFIGS

DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = sorted([*DEPLOY.glob("k8s/*.yaml"), *DEPLOY.glob("kuberay/*.yaml"), *DEPLOY.glob("ray/*.yaml")])
SERVICE_NAMES = {
    svc: importlib.import_module(f"services.{svc}.__main__").SERVICE
    for svc in ("textgen", "converter", "trainer", "evaluator")
}


SHARED_SETTINGS = {ROOTS_ENV, ENDPOINTS_ENV}  # shared/roots.py, read by every job service


def _settings() -> dict[str, object]:
    out = {}
    for svc, ref in CONFIGS.items():
        module, cls = ref.split(":")
        config = getattr(importlib.import_module(module), cls)
        for f in config.__dataclass_fields__.values():
            out[env_name(f"MEGASTACK_{svc.upper()}_", f.name)] = f
    return out


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(doc: dict):
    def walk(node):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                yield from node["containers"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    yield from walk(doc)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_parses_and_names_only_real_settings(path):
    docs = _docs(path)
    assert docs
    known = _settings()
    for doc in docs:
        for c in _containers(doc):
            for e in c.get("env", []):
                if e["name"].startswith("MEGASTACK_"):
                    assert e["name"] in known or e["name"] in SHARED_SETTINGS, (
                        f"{path.name}: {e['name']} is not a setting"
                    )


def test_service_manifests_run_real_modules_with_matching_ports_and_probes():
    known = _settings()
    for svc in ("textgen", "converter", "trainer", "evaluator", "gateway"):
        docs = _docs(DEPLOY / "k8s" / f"{svc}.yaml")
        (c,) = [c for d in docs for c in _containers(d)]
        assert c["command"] == ["python", "-m", f"services.{svc}"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[f"MEGASTACK_{svc.upper()}_HOST"] == "0.0.0.0"
        port = int(env.get(f"MEGASTACK_{svc.upper()}_PORT") or known[f"MEGASTACK_{svc.upper()}_PORT"].default)
        assert port in {p["containerPort"] for p in c["ports"]}
        service = next(d for d in docs if d["kind"] == "Service")
        assert port in {p["port"] for p in service["spec"]["ports"]}
        if svc == "gateway":
            assert (
                c["readinessProbe"]["httpGet"]["path"] == "/ready"
                and c["livenessProbe"]["httpGet"]["path"] == "/health"
            )
            # SIGTERM drains in-flight streams for graceful_timeout_s: Kubernetes must wait longer before
            # SIGKILL
            pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
            graceful = float(
                env.get("MEGASTACK_GATEWAY_GRACEFUL_TIMEOUT_S")
                or known["MEGASTACK_GATEWAY_GRACEFUL_TIMEOUT_S"].default
            )
            assert pod["terminationGracePeriodSeconds"] > graceful
            for name, value in env.items():
                if name.endswith("_ADDR") and value:
                    target = value.split(":")[0]
                    assert (DEPLOY / "k8s" / f"{target}.yaml").is_file(), value
            continue
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAMES[svc]}
        assert c["livenessProbe"]["grpc"]["port"] == port
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))
        metrics_port = int(
            env.get(f"MEGASTACK_{svc.upper()}_METRICS_PORT")
            or known[f"MEGASTACK_{svc.upper()}_METRICS_PORT"].default
        )
        assert workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
            metrics_port
        )


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_rayjob_runs_the_driver_on_a_spec_that_parses():
    from services.trainer.wire import spec_from_dict

    job = _docs(DEPLOY / "kuberay" / "rayjob.yaml")[0]
    m = re.fullmatch(r"python -m services\.trainer\.ray_driver /specs/(\S+\.yaml)", job["spec"]["entrypoint"])
    assert m, job["spec"]["entrypoint"]
    spec = spec_from_dict(yaml.safe_load((DEPLOY / "kuberay" / m.group(1)).read_text()))
    assert spec.world_size == 8 and spec.gpus_per_worker == 1 and spec.precision == "bf16"
    assert spec.global_batch_size % (spec.micro_batch_size * spec.dp) == 0
    cluster = _docs(DEPLOY / "kuberay" / "raycluster.yaml")[0]
    trainer_env = {
        e["name"]: e.get("value")
        for c in _containers(_docs(DEPLOY / "k8s" / "trainer.yaml")[1])
        for e in c["env"]
    }
    assert (
        trainer_env["MEGASTACK_TRAINER_RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    )


def test_ray_driver_accepts_a_yaml_spec_and_refuses_a_bad_one(tmp_path, train_assets):
    from services.trainer.ray_driver import load_spec, main
    from tests.fixtures.training import spec_doc

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_doc(train_assets, tmp_path / "run")))
    spec = load_spec(good)
    assert spec.tp == 2 and spec.train_iters == 20 and spec.init_from == str(train_assets["mcore"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: pretrain\n")
    assert main([str(bad)]) == 2
    with pytest.raises(Exception, match="seq_length must be >= 1"):
        load_spec(bad)


def test_prometheus_layout_matches_what_the_stack_renders():
    from tools.stack import StackOptions, plan, scrape_targets

    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in shipped["scrape_configs"]}
    rendered = scrape_targets(
        plan(StackOptions(services=("textgen", "converter", "trainer", "evaluator", "gateway")))
    )
    assert jobs == rendered
    assert shipped["rule_files"] == ["alerts.yml"]


def test_job_services_are_confined_to_the_shared_volume():
    """Issue 17: on k8s a job may name paths only on the /data volume, and the evaluator calls only the
    stack's models."""
    for svc in ("converter", "trainer", "evaluator"):
        env = {
            e["name"]: e.get("value")
            for d in _docs(DEPLOY / "k8s" / f"{svc}.yaml")
            for c in _containers(d)
            for e in c.get("env", [])
        }
        assert env.get("MEGASTACK_DATA_ROOTS") == "/data", svc
        if svc == "evaluator":
            assert set(env["MEGASTACK_ALLOWED_ENDPOINTS"].split(",")) == {"textgen:50051", "gateway:5000"}


# -- closed by default (issue 17, item 5) -------------------------------------------------------------
def _pod_specs(node):
    if isinstance(node, dict):
        if "containers" in node and isinstance(node["containers"], list):
            yield node
        for v in node.values():
            yield from _pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pod_specs(v)


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_only_the_gateway_reaches_the_services():
    docs = {d["metadata"]["name"]: d for d in _docs(DEPLOY / "k8s" / "networkpolicy.yaml")}
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "networkpolicy.yaml" in kustomization["resources"]
    deny = docs["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    allowed = {
        "textgen": ({"gateway", "evaluator"}, 50051),
        "converter": ({"gateway"}, 50052),
        "trainer": ({"gateway"}, 50053),
        "evaluator": ({"gateway"}, 50054),
    }
    for svc, (callers, port) in allowed.items():
        (policy,) = [d for d in docs.values() if d["spec"]["podSelector"].get("matchLabels") == {"app": svc}]
        rules = policy["spec"]["ingress"]
        to_grpc = [r for r in rules if any(p["port"] == port for p in r.get("ports", []))]
        assert to_grpc and all("from" in r for r in to_grpc), svc  # never open to everyone
        assert {f["podSelector"]["matchLabels"]["app"] for r in to_grpc for f in r["from"]} == callers, svc
        open_rules = [r for r in rules if "from" not in r]  # open to any pod: only the metrics port
        assert all(p["port"] in range(9401, 9405) for r in open_rules for p in r["ports"]), svc


def test_gateway_keys_are_required_and_come_from_a_file():
    (dep,) = [d for d in _docs(DEPLOY / "k8s" / "gateway.yaml") if d["kind"] == "Deployment"]
    text = (DEPLOY / "k8s" / "gateway.yaml").read_text()
    assert "optional: true" not in text
    (c,) = list(_containers(dep))
    env = _env(c)
    assert env["MEGASTACK_GATEWAY_HOST"]["value"] == "0.0.0.0" and "MEGASTACK_GATEWAY_ALLOW_OPEN" not in env
    assert "MEGASTACK_GATEWAY_API_KEYS" not in env  # keys never in the environment
    path = env["MEGASTACK_GATEWAY_API_KEYS_FILE"]["value"]
    (vol,) = dep["spec"]["template"]["spec"]["volumes"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    assert (
        path.startswith(mount["mountPath"] + "/") and vol["secret"]["optional"] is False and mount["readOnly"]
    )


def test_ray_needs_its_token_everywhere_and_its_dashboard_stays_inside():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in _docs(DEPLOY / "kuberay" / name):
            text = yaml.safe_dump(doc)
            assert "LoadBalancer" not in text and "NodePort" not in text, name
            for c in _containers(doc):
                env = _env(c)
                assert env["RAY_AUTH_MODE"]["value"] == "token", (name, c["name"])
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "megastack-ray-token", (
                    name,
                    c["name"],
                )
    (head,) = [d for d in _docs(DEPLOY / "kuberay" / "raycluster.yaml")]
    assert head["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    (trainer,) = [c for d in _docs(DEPLOY / "k8s" / "trainer.yaml") for c in _containers(d)]
    assert _env(trainer)["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in _env(trainer)
    ray_up = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    starts = [
        c for c in ray_up["head_start_ray_commands"] + ray_up["worker_start_ray_commands"] if "ray start" in c
    ]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    import tempfile

    from tools.stack import ray_head

    with tempfile.TemporaryDirectory() as d:  # the local head too (its token file: see tests/conftest.py)
        env = ray_head(Path(d), free_ports=True, num_cpus=1).env
        assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()


def test_everything_runs_as_a_non_root_user():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    for path in [
        *DEPLOY.glob("k8s/*.yaml"),
        *DEPLOY.glob("kuberay/raycluster.yaml"),
        *DEPLOY.glob("kuberay/rayjob.yaml"),
    ]:
        for doc in _docs(path):
            for pod in _pod_specs(doc):
                sc = pod.get("securityContext", {})
                assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, (path.name, sc)
