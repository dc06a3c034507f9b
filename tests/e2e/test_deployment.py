"""A deployment as `make up PROMETHEUS=1` starts it: every service, 2 textgen replicas, a local Ray head and a
real Prometheus, all as real processes. Monitoring, load, faults and malformed input at scale."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest
import requests

from shared.paths import REPO_ROOT
from tests.fixtures.training import spec_doc, wait_for
from tools.stack import PROMETHEUS_DIR, StackOptions, up

PROMPTS = [
    "the cat sat on",
    "one two three",
    "hello there",
    "a b c d e",
    "the quick brown fox",
    "once upon a time",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    run_dir = tmp_path_factory.mktemp("deploy")
    s = up(
        StackOptions(
            run_dir=run_dir,
            model_dir=tiny_models["llama"],
            replicas=2,
            free_ports=True,
            prometheus=True,
            services=("textgen", "converter", "trainer", "evaluator", "gateway"),
            textgen_env={"MEGASTACK_TEXTGEN_MAX_CONTEXT_TOKENS": "256"},
        ),
        log=lambda _: None,
    )
    yield s
    s.down()


def metrics_of(url: str) -> dict[str, float]:
    """Samples of a /metrics page: 'name{labels}' -> value."""
    out = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in samples.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
    )


def textgen_metrics(stack) -> list[str]:
    return [p.endpoints["metrics"] for p in stack.procs if p.name.startswith("textgen")]


def api(url: str, prompt: str, tokens: int = 8, timeout: float = 120) -> requests.Response:
    return requests.put(
        f"{url}/api", json={"prompts": [prompt], "tokens_to_generate": tokens, "top_k": 1}, timeout=timeout
    )


# -- monitoring --------------------------------------------------------------------------------------
def test_prometheus_scrapes_every_service(stack):
    prom = stack.endpoint("prometheus", "http")
    expected = {
        p.endpoints["metrics"].removeprefix("http://").split("/")[0]
        for p in stack.procs
        if "metrics" in p.endpoints
    }

    def all_up():
        r = requests.get(f"{prom}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]
        seen = {x["metric"]["instance"]: x["value"][1] for x in r}
        return seen if set(seen) == expected and all(v == "1" for v in seen.values()) else None

    seen = wait_for(all_up, 60, "every target up in Prometheus")
    jobs = {
        x["metric"]["job"]
        for x in requests.get(f"{prom}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"][
            "result"
        ]
    }
    assert jobs == {
        "megastack-gateway",
        "megastack-textgen",
        "megastack-converter",
        "megastack-trainer",
        "megastack-evaluator",
        "ray",
    }
    assert len(seen) == 7  # two textgen replicas
    rules = requests.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {
        "MegastackServiceDown",
        "MegastackTextgenQueueSaturated",
        "MegastackTrainingJobFailed",
    }


def test_promtool_accepts_every_metrics_page_and_the_rules(stack):
    for p in stack.procs:
        url = p.endpoints.get("metrics")
        if not url or p.name == "ray":  # Ray's own exposition is Ray's business
            continue
        page = requests.get(url, timeout=10).text
        out = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
        # textgen's vllm:* twins keep vLLM's names on purpose (dashboards made for vLLM): promtool's style
        # lint flags the colon in them, and nothing else may be flagged
        problems = [
            line
            for line in (out.stdout + out.stderr).splitlines()
            if line.strip()
            and not re.fullmatch(r"vllm:\w+ metric names should not contain ':'", line.strip())
        ]
        assert not problems, (p.name, out.stdout, out.stderr)
    rules = subprocess.run(
        ["promtool", "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True, text=True
    )
    assert rules.returncode == 0 and "SUCCESS: 8 rules found" in rules.stdout, rules.stdout + rules.stderr
    conf = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert conf.returncode == 0, conf.stdout + conf.stderr


def test_grafana_dashboard_queries_name_real_metrics(stack):
    dash = json.loads((REPO_ROOT / "deploy" / "grafana" / "megastack.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    known = set()  # every metric family a service declares ("# TYPE name kind"), labelled children or not
    for p in stack.procs:
        if "metrics" in p.endpoints and p.name != "ray":
            known |= set(
                re.findall(r"^# TYPE (\S+) ", requests.get(p.endpoints["metrics"], timeout=10).text, re.M)
            )
    for expr in exprs:
        for name in re.findall(r"megastack_[a-z_]+", expr):
            assert name in known or re.sub(r"_(bucket|count|sum|total)$", "", name) in known, (name, expr)


# -- load -----------------------------------------------------------------------------------------------
def test_load_200_requests_32_clients_two_replicas(stack):
    url = stack.endpoint("gateway", "http")
    gw_before = metrics_of(f"{url}/metrics")
    tg_before = [metrics_of(m) for m in textgen_metrics(stack)]

    def one(i: int) -> tuple[int, dict]:
        prompt = PROMPTS[i % len(PROMPTS)]
        r = api(url, prompt)
        return r.status_code, r.json()

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    codes = Counter(code for code, _ in results)
    assert sum(codes.values()) == 200 and set(codes) <= {200, 429}, codes
    for i, (code, body) in enumerate(results):
        if code == 200:
            assert (
                isinstance(body["text"], list)
                and len(body["text"]) == 1
                and body["text"][0].startswith(PROMPTS[i % len(PROMPTS)])
            )
        else:
            assert body["message"]
    gw_after = metrics_of(f"{url}/metrics")
    tg_after = [metrics_of(m) for m in textgen_metrics(stack)]
    served = [
        total(a, "megastack_textgen_request_success_total")
        - total(b, "megastack_textgen_request_success_total")
        for a, b in zip(tg_after, tg_before)
    ]
    refused = sum(
        total(a, "megastack_textgen_request_failure_total", err="overloaded")
        - total(b, "megastack_textgen_request_failure_total", err="overloaded")
        for a, b in zip(tg_after, tg_before)
    )
    # the server's counts are the client's counts; 429 only for sequences a full queue refused
    assert sum(served) == codes[200] and refused == codes[429]
    # the vLLM-named twins count the same, labelled with the served model's name (dashboards made for vLLM)
    for a, b in zip(tg_after, tg_before):
        for ours, theirs in (
            ("megastack_textgen_request_success_total", "vllm:request_success_total"),
            ("megastack_textgen_generation_tokens_total", "vllm:generation_tokens_total"),
            ("megastack_textgen_e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"),
        ):
            assert total(a, theirs) - total(b, theirs) == total(a, ours) - total(b, ours), theirs
        assert any(k.startswith("vllm:num_requests_running{") and 'model_name="' in k for k in a)
    assert (
        total(gw_after, "megastack_gateway_http_requests_total", route="/api", status="200")
        - total(gw_before, "megastack_gateway_http_requests_total", route="/api", status="200")
        == codes[200]
    )
    assert all(n > 0 for n in served), f"both replicas take load: {served}"


# -- faults --------------------------------------------------------------------------------------------
def test_killed_replica_is_routed_around_then_used_again(stack):
    url = stack.endpoint("gateway", "http")
    victim = stack.proc("textgen-1")
    addr = victim.endpoints["grpc"]
    stop = threading.Event()
    codes: list[int] = []

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                codes.append(api(url, PROMPTS[(k + i) % len(PROMPTS)], tokens=16).status_code)
            except requests.RequestException:
                codes.append(-1)
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(codes) > 20, 60, "load under way")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: (
                metrics_of(f"{url}/metrics").get(f'megastack_gateway_replica_up{{replica="{addr}"}}') == 0
            ),
            10,
            "gateway marks the killed replica down",
        )
        detected_s = time.monotonic() - killed_at
        n = len(codes)
        wait_for(lambda: len(codes) > n + 20, 60, "load continues on the other replica")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert detected_s < 5
    # requests in flight on the killed replica had not started a response: retried, none lost
    assert set(codes) == {200}, Counter(codes)
    stack.restart("textgen-1")
    wait_for(
        lambda: metrics_of(f"{url}/metrics").get(f'megastack_gateway_replica_up{{replica="{addr}"}}') == 1,
        15,
        "gateway sees the restarted replica",
    )
    with cf.ThreadPoolExecutor(8) as pool:
        assert {r.status_code for r in pool.map(lambda i: api(url, PROMPTS[i % 6]), range(24))} == {200}
    assert total(metrics_of(victim.endpoints["metrics"]), "megastack_textgen_request_success_total") > 0


def test_killed_trainer_launcher_keeps_its_job_after_restart(stack, train_assets, tmp_path):
    from google.protobuf import json_format

    from protos.trainer.v1 import trainer_pb2 as pb
    from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
    from services.trainer.wire import spec_from_dict, spec_to_pb
    from shared.grpc.channel import make_channel

    addr, gateway = stack.endpoint("trainer", "grpc"), stack.endpoint("gateway", "http")
    spec = spec_from_dict(spec_doc(train_assets, tmp_path / "run", training={"train_iters": 30}))
    # submitted through the gateway's job endpoint (the protos' JSON mapping), followed over gRPC and HTTP
    r = requests.post(
        f"{gateway}/v1/jobs/training", json={"spec": json_format.MessageToDict(spec_to_pb(spec))}, timeout=60
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    with make_channel(addr) as ch:
        stub = pb_grpc.TrainerServiceStub(ch)
        wait_for(
            lambda: stub.GetTrainJob(pb.GetTrainJobRequest(job_id=job_id)).job.metrics.step >= 2,
            180,
            "training under way",
        )
    os.kill(stack.proc("trainer").pid, signal.SIGKILL)
    stack.restart("trainer")
    with make_channel(addr) as ch:
        stub = pb_grpc.TrainerServiceStub(ch)
        assert job_id in [j.status.job_id for j in stub.ListTrainJobs(pb.ListTrainJobsRequest()).jobs]
    with requests.get(f"{gateway}/v1/jobs/training/{job_id}/events", stream=True, timeout=600) as ev:
        seen = [
            json.loads(line[6:]) for line in ev.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ]
    last = seen[-1]
    assert last["status"]["state"] == "JOB_STATE_SUCCEEDED", last
    assert last["metrics"]["step"] == 30 and last["status"]["attempt"] == 1
    assert any(
        "loss" in line
        for line in requests.get(f"{gateway}/v1/jobs/training/{job_id}/logs", timeout=60).json()["lines"]
    )
    listed = requests.get(f"{gateway}/v1/jobs", params={"state": "succeeded"}, timeout=60).json()
    assert job_id in [j["status"]["job_id"] for j in listed["jobs"]] and "unavailable" not in listed


# -- malformed input at scale -------------------------------------------------------------------------
FIELDS = [
    "prompts",
    "tokens_to_generate",
    "temperature",
    "top_k",
    "top_p",
    "logprobs",
    "add_BOS",
    "stop_token",
    "random_seed",
    "model",
    "prompt",
    "max_tokens",
    "messages",
    "n",
    "stream",
    "echo",
    "stop",
    "ids",
    "text",
    "seed",
    "best_of",
    "top_p_decay",
    "top_p_bound",
    "length_penalty",
    "prevent_newline_after_colon",
    "repetition_penalty",
    "user",
    "spec",
    "labels",
    "reason",
]


ROUTES = [
    ("PUT", "/api"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/api"),
    ("GET", "/v1/models"),
    ("POST", "/v1/jobs/conversions"),
    ("POST", "/v1/jobs/training"),
    ("POST", "/v1/jobs/evaluations"),
    ("POST", "/v1/jobs/training/train-x/cancel"),
]
WS_FIELDS = [
    "prompt",
    "max_new_tokens",
    "max_tokens",
    "tokens_to_generate",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "stop",
    "history",
    "stream",
]


def _values():
    from hypothesis import strategies as st

    extreme_floats = st.sampled_from(
        [
            1e-300,
            1e300,
            5e-324,
            -5e-324,
            2.2250738585072014e-308,
            -0.0,
            1e-40,
            -1e300,
            float("nan"),
            float("inf"),
            float("-inf"),
        ]
    )
    ints = st.integers(-(2**70), 2**70) | st.sampled_from(
        [2**31, 2**31 - 1, 2**32, 2**63, 2**63 - 1, 2**64, -(2**63) - 1]
    )
    strings = st.text(max_size=20) | st.sampled_from(
        ["x" * 2**20, "\u00e9" * 1000, "\x00\x01", "\ud7ff" * 10]
    )
    scalars = st.none() | st.booleans() | ints | st.floats() | extreme_floats | strings
    return st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=8,
    )


def _resources(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of a process."""
    import psutil

    p = psutil.Process(pid)
    return p.num_fds(), p.num_threads()


def _gateway_worker(stack) -> int:
    import psutil

    master = psutil.Process(stack.proc("gateway").pid)
    [worker] = master.children()  # one gunicorn worker: the process that serves requests
    return worker.pid


def _settle(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        ok, detail = check()
        if ok or time.monotonic() > deadline:
            return ok, detail
        time.sleep(0.5)


def test_random_and_malformed_bodies_get_4xx_and_the_gateway_keeps_serving(stack):
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    url = stack.endpoint("gateway", "http")
    worker = _gateway_worker(stack)
    api(url, "warm up")
    fds_before, _ = _resources(worker)
    session = requests.Session()
    values = _values()
    bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6) | values
    routes = st.sampled_from(ROUTES)
    seen: Counter = Counter()

    def check(method: str, path: str, r: requests.Response) -> None:
        seen[r.status_code // 100] += 1
        assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
        if r.status_code >= 400:
            body = r.json()
            assert body["message"] and body["error"]["code"] == r.status_code, body

    @seed(20261202)
    @settings(max_examples=2400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(routes, bodies)
    def json_bodies(route, body):
        method, path = route
        check(
            method,
            path,
            session.request(
                method,
                url + path,
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=120,
            ),
        )

    @seed(20261203)
    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        routes,
        st.binary(max_size=200),
        st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]),
    )
    def raw_bodies(route, raw, ctype):
        method, path = route
        check(
            method,
            path,
            session.request(
                method, url + path, data=raw, headers={"Content-Type": ctype} if ctype else {}, timeout=120
            ),
        )

    json_bodies()
    raw_bodies()
    for method, path in ROUTES:  # nesting past the parser's recursion limit, on every route
        for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
            check(
                method,
                path,
                session.request(
                    method, url + path, data=deep, headers={"Content-Type": "application/json"}, timeout=120
                ),
            )
    assert sum(seen.values()) >= 2500 and seen[4] > 1500, seen  # a few thousand bodies
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/ready", timeout=60).status_code == 200
    assert api(url, "still serving").status_code == 200
    session.close()
    _assert_nothing_leaks(stack, worker, fds_before)


def test_websocket_messages_fuzzed_on_one_connection(stack):
    """Every message gets an answer on the same open connection: a 4xx error, or a generation."""
    import websocket
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    url = stack.endpoint("gateway", "http")
    worker = _gateway_worker(stack)
    fds_before, _ = _resources(worker)
    values = _values()
    bodies = st.dictionaries(st.sampled_from(WS_FIELDS), values, max_size=6) | values
    # prompts that generate (a few tokens) with extreme sampling values next to them
    small = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20), "max_new_tokens": st.integers(1, 4)},
        optional={
            "temperature": st.floats() | st.sampled_from([1e-300, 5e-324, 1e-40, 0.5]),
            "top_k": st.integers(-(2**70), 2**70) | st.integers(0, 50),
            "top_p": st.floats() | st.sampled_from([1e-300, 5e-324, 0.9]),
            "repetition_penalty": st.sampled_from([1e-300, 5e-324, 1e-40, 100.0]),
            "seed": st.integers(-(2**70), 2**70),
        },
    )
    conn = websocket.create_connection(url.replace("http://", "ws://") + "/api/predict/fuzz", timeout=120)
    codes: Counter = Counter()

    def exchange(text: str) -> None:
        conn.send(text)
        while True:
            msg = json.loads(conn.recv())
            if "error" in msg:
                assert msg["is_end"] and msg["error"]["code"] < 500, msg
                codes[msg["error"]["code"]] += 1
                return
            if msg["is_end"]:
                codes["generated"] += 1
                return

    @seed(20261204)
    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(bodies, small))
    def messages(body):
        exchange(json.dumps(body))

    try:
        messages()
        exchange("[" * 100_000 + "]" * 100_000)
        exchange("not json at all")
        exchange(json.dumps({"prompt": "still here", "max_new_tokens": 2}))
    finally:
        conn.close()
    assert codes[400] > 100 and codes["generated"] > 10, codes
    _assert_nothing_leaks(stack, worker, fds_before)


def _assert_nothing_leaks(stack, worker: int, fds_before: int) -> None:
    """After a fuzz run: no sequence left in any engine, every KV slot free, the gateway's descriptors back
    to where they were and its threads within the configured pool."""

    def idle():
        busy = {}
        for m in textgen_metrics(stack):
            sample = metrics_of(m)
            for name in (
                "megastack_textgen_num_requests_running",
                "megastack_textgen_num_requests_waiting",
                "megastack_textgen_kv_cache_usage_ratio",
            ):
                if sample.get(name, 0) != 0:
                    busy[(m, name)] = sample[name]
        return not busy, busy

    ok, busy = _settle(idle)
    assert ok, busy

    def descriptors():
        fds, threads = _resources(worker)
        return fds <= fds_before + 4, (fds, fds_before, threads)

    ok, detail = _settle(descriptors)
    assert ok, f"gateway file descriptors (now, before, threads): {detail}"
    _, threads = _resources(worker)
    assert threads <= 64 + 16, threads  # MEGASTACK_GATEWAY_THREADS (64) + gRPC and health threads
