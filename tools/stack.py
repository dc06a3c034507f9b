"""`megastack up | down | status`: run every service locally in the background.

Each service is a real process (``python -m services.<svc>``) in its own session, with its pid and log
under the run folder (``.run/`` by default). ``up`` waits until each one is healthy (gRPC health or
HTTP /health) and fails with the log tail of any that dies; ``down`` stops them (SIGTERM, then SIGKILL
after a grace period) and leaves no process behind. e2e tests use the same code with a temporary run
folder and free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.net import free_port  # noqa: F401 - re-exported
from shared.paths import DEFAULT_MODEL_DIR, REPO_ROOT, RUN_DIR
from shared.roots import ENDPOINTS_ENV, ROOTS_ENV, allowed_endpoints, data_roots

STATE_FILE = "stack.json"


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    health: str  # "grpc:host:port" | "http:url"
    endpoints: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    log: str = ""
    stage: int = 0  # processes of a stage start together, after the previous stage is healthy
    grace_s: float = 10.0  # SIGTERM -> SIGKILL
    cleanup: list[str] = field(default_factory=list)  # folders removed once the process is stopped


@dataclass
class StackOptions:
    run_dir: Path = RUN_DIR
    model_dir: Path = DEFAULT_MODEL_DIR
    replicas: int = 1
    free_ports: bool = False
    services: tuple[str, ...] = ("textgen", "converter", "trainer", "evaluator", "gateway")
    extra_env: dict[str, str] = field(default_factory=dict)
    textgen_env: dict[str, str] = field(default_factory=dict)
    gateway_port: int = 5000
    prometheus: bool = (
        False  # also start a real Prometheus scraping every service (needs `prometheus` on PATH)
    )
    data_roots: tuple[
        Path, ...
    ] = ()  # folders jobs may use besides MEGASTACK_DATA_ROOTS (or its local default)


BASE_PORTS = {"textgen": 50051, "converter": 50052, "trainer": 50053, "evaluator": 50054}
BASE_METRICS = {"textgen": 9401, "converter": 9402, "trainer": 9403, "evaluator": 9404}
RAY_DASHBOARD_PORT = 8265
RAY_GCS_PORT = 6380
RAY_METRICS_PORT = 8080
PROMETHEUS_PORT = 9090
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"


def ray_auth_env(run_dir: Path) -> dict[str, str]:
    """RAY_AUTH_MODE=token and the path of this stack's token: the operator's (RAY_AUTH_TOKEN_PATH), or one
    made on first use in ``run_dir`` (0600; the token itself never goes into an environment)."""
    import secrets

    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given and Path(given).is_file():
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(given).resolve())}
    path = Path(run_dir) / "ray-auth-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path.resolve())}


def ray_head(run_dir: Path, *, free_ports: bool, num_cpus: int) -> Proc:
    """A local Ray head in the foreground (`--block`), so stopping its process group stops all of Ray."""
    gcs, dash, metrics = (
        (free_port(), free_port(), free_port())
        if free_ports
        else (RAY_GCS_PORT, RAY_DASHBOARD_PORT, RAY_METRICS_PORT)
    )
    temp = Path(f"/tmp/megastack-ray-{dash}")  # Ray's unix sockets need a short path
    ray = str(Path(sys.executable).with_name("ray"))
    # The daemons of a local head run at lower priority than training ranks (which go back to nice 0)
    # and poll less often: on a 2-core machine their wake-ups stalled 2-thread training by ~10%.
    argv = [
        "nice",
        "-n",
        "10",
        ray,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={metrics}",
    ]
    url = f"http://127.0.0.1:{dash}"
    # Token authentication on (Ray's Jobs API runs code): a fresh token per head in <run_dir>/ray-auth-token
    # (mode 0600); the trainer and the jobs' drivers read it through RAY_AUTH_TOKEN_PATH (see ray_auth_env).
    # Fewer wake-ups: no idle workers prestarted (every job's processes have their own runtime env, so
    # none would be reused), and the log monitor globs for new log files every 5 s, not every 0.1 s.
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        **ray_auth_env(run_dir),
        "REPORTER_UPDATE_INTERVAL_MS": "30000",
        "METRICS_RECORD_INTERVAL_S": "30",
        "RAY_DASHBOARD_AGENT_LOOP_MONITOR_INTERVAL_S": "5",
        "SCAN_EVENT_DIR_INTERVAL_SECONDS": "10",
        "RAY_task_events_report_interval_ms": "10000",
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
        "LOG_NAME_UPDATE_INTERVAL_S": "5",
    }
    return Proc(
        "ray",
        argv,
        env,
        f"http:{url}/api/version",
        {"dashboard": url, "gcs": f"127.0.0.1:{gcs}", "metrics": f"http://127.0.0.1:{metrics}/metrics"},
        grace_s=5.0,
        cleanup=[str(temp)],
    )


def plan(opts: StackOptions) -> list[Proc]:
    def port(base: int) -> int:
        return free_port() if opts.free_ports else base

    py = [sys.executable, "-m"]
    procs: list[Proc] = []
    if "trainer" in opts.services and "MEGASTACK_TRAINER_RAY_ADDRESS" not in opts.extra_env:
        procs.append(ray_head(opts.run_dir, free_ports=opts.free_ports, num_cpus=max(2, os.cpu_count() or 2)))
    textgen_addrs = []
    for i in range(opts.replicas if "textgen" in opts.services else 0):
        name = "textgen" if i == 0 else f"textgen-{i}"
        gp, mp = port(BASE_PORTS["textgen"] + 10 * i), port(BASE_METRICS["textgen"] + 10 * i)
        env = {
            "MEGASTACK_TEXTGEN_PORT": str(gp),
            "MEGASTACK_TEXTGEN_METRICS_PORT": str(mp),
            "MEGASTACK_TEXTGEN_MODEL_DIR": str(opts.model_dir),
            **opts.textgen_env,
        }
        procs.append(
            Proc(
                name,
                py + ["services.textgen"],
                env,
                f"grpc:127.0.0.1:{gp}",
                {"grpc": f"127.0.0.1:{gp}", "metrics": f"http://127.0.0.1:{mp}/metrics"},
            )
        )
        textgen_addrs.append(f"127.0.0.1:{gp}")
    for svc in ("converter", "trainer", "evaluator"):
        if svc not in opts.services:
            continue
        gp, mp = port(BASE_PORTS[svc]), port(BASE_METRICS[svc])
        env = {
            f"MEGASTACK_{svc.upper()}_PORT": str(gp),
            f"MEGASTACK_{svc.upper()}_METRICS_PORT": str(mp),
            f"MEGASTACK_{svc.upper()}_JOBS_DIR": str(opts.run_dir / svc),
        }
        if svc == "trainer" and procs and procs[0].name == "ray":
            env["MEGASTACK_TRAINER_RAY_ADDRESS"] = procs[0].endpoints["dashboard"]
            env.update(ray_auth_env(opts.run_dir))  # the head's token: the trainer's job client sends it
        procs.append(
            Proc(
                svc,
                py + [f"services.{svc}"],
                env,
                f"grpc:127.0.0.1:{gp}",
                {"grpc": f"127.0.0.1:{gp}", "metrics": f"http://127.0.0.1:{mp}/metrics"},
            )
        )
    if "gateway" in opts.services:
        hp = free_port() if opts.free_ports else opts.gateway_port
        env = {"MEGASTACK_GATEWAY_PORT": str(hp), "MEGASTACK_GATEWAY_TEXTGEN_ADDRS": ",".join(textgen_addrs)}
        for p in procs:
            if p.name in ("converter", "trainer", "evaluator"):
                env[f"MEGASTACK_GATEWAY_{p.name.upper()}_ADDR"] = p.endpoints["grpc"]
        url = f"http://127.0.0.1:{hp}"
        procs.append(
            Proc(
                "gateway",
                py + ["services.gateway"],
                env,
                f"http:{url}/ready",
                {"http": url, "metrics": f"{url}/metrics"},
                stage=1,
            )
        )
    grpc_of = {p.name: p.endpoints["grpc"] for p in procs if p.name in ("converter", "evaluator")}
    for p in procs:  # the trainer exports and scores the checkpoints a spec's `evaluate` asks for
        if p.name == "trainer":
            p.env.setdefault("MEGASTACK_TRAINER_CONVERTER_ADDR", grpc_of.get("converter", ""))
            p.env.setdefault("MEGASTACK_TRAINER_EVALUATOR_ADDR", grpc_of.get("evaluator", ""))
    for p in procs:  # an evaluation may call the stack's own model endpoints (and those the operator allows)
        if p.name == "evaluator":
            ours = [
                *textgen_addrs,
                *(q.endpoints["http"].removeprefix("http://") for q in procs if q.name == "gateway"),
            ]
            given = opts.extra_env.get(ENDPOINTS_ENV)
            p.env[ENDPOINTS_ENV] = ",".join(
                dict.fromkeys([*ours, *(given.split(",") if given else allowed_endpoints())])
            )
    if opts.prometheus:
        procs.append(prometheus_proc(opts.run_dir, procs, port(PROMETHEUS_PORT)))
    return procs


def scrape_targets(procs: list[Proc]) -> dict[str, list[str]]:
    """Prometheus job -> host:port targets: megastack-<service> for ours (replicas share a job), ray for
    Ray's."""
    jobs: dict[str, list[str]] = {}
    for p in procs:
        url = p.endpoints.get("metrics")
        if not url:
            continue
        base = p.name.split("-")[0]
        job = "ray" if base == "ray" else f"megastack-{base}"
        jobs.setdefault(job, []).append(url.removeprefix("http://").split("/")[0])
    return jobs


def prometheus_config(procs: list[Proc], *, scrape_interval_s: float = 5.0) -> str:
    """deploy/prometheus/prometheus.yml's layout with the ports actually in use."""
    lines = [
        "# rendered by tools/stack.py from the running stack; layout as deploy/prometheus/prometheus.yml",
        "global:",
        f"  scrape_interval: {scrape_interval_s:g}s",
        f"  evaluation_interval: {scrape_interval_s:g}s",
        "rule_files:",
        "  - alerts.yml",
        "scrape_configs:",
    ]
    for job, targets in scrape_targets(procs).items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


def prometheus_proc(run_dir: Path, procs: list[Proc], port: int) -> Proc:
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError(
            "prometheus is not installed (make setup installs the Debian package `prometheus`)"
        )
    conf_dir = run_dir / "prometheus"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "prometheus.yml").write_text(prometheus_config(procs))
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", conf_dir / "alerts.yml")
    url = f"http://127.0.0.1:{port}"
    argv = [
        exe,
        f"--config.file={conf_dir / 'prometheus.yml'}",
        f"--storage.tsdb.path={conf_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    return Proc(
        "prometheus",
        argv,
        {},
        f"http:{url}/-/ready",
        {"http": url},
        stage=2,
        cleanup=[str(conf_dir / "data")],
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _healthy(check: str, env: dict[str, str] | None = None) -> bool:
    if check.startswith("grpc:"):
        from shared.grpc.channel import check_health, make_channel

        with make_channel(check[5:]) as ch:
            return check_health(ch, timeout_s=1.0)
    import urllib.request

    req = urllib.request.Request(check[5:])
    token_path = (env or {}).get("RAY_AUTH_TOKEN_PATH")
    if token_path:  # a Ray head with token authentication answers only with its token
        req.add_header("Authorization", "Bearer " + Path(token_path).read_text().strip())
    try:
        with urllib.request.urlopen(req, timeout=1.0) as r:
            return r.status == 200
    except OSError:
        return False


def _tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Stack:
    """A set of running service processes described by ``<run_dir>/stack.json``."""

    def __init__(self, run_dir: Path, procs: list[Proc]) -> None:
        self.run_dir = Path(run_dir)
        self.procs = procs

    def endpoint(self, name: str, kind: str) -> str:
        return next(p.endpoints[kind] for p in self.procs if p.name == name)

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STATE_FILE).write_text(json.dumps([asdict(p) for p in self.procs], indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> Stack | None:
        f = Path(run_dir) / STATE_FILE
        if not f.is_file():
            return None
        return cls(run_dir, [Proc(**d) for d in json.loads(f.read_text())])

    def start_one(self, p: Proc, base_env: dict[str, str]) -> None:
        log_path = self.run_dir / f"{p.name}.log"
        log = open(log_path, "ab")
        env = {**base_env, **p.env}
        proc = subprocess.Popen(
            p.argv,
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        p.pid, p.log = proc.pid, str(log_path)
        (self.run_dir / f"{p.name}.pid").write_text(f"{proc.pid}\n")

    def wait_healthy(self, p: Proc, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(p.pid):
                raise RuntimeError(f"{p.name} exited during start-up; last log lines:\n{_tail(p.log)}")
            if _healthy(p.health, p.env):
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"{p.name} did not become healthy within {timeout_s:.0f}s; last log lines:\n{_tail(p.log)}"
        )

    def stop_one(self, p: Proc) -> None:
        grace_s = p.grace_s
        if not p.pid or not _alive(p.pid):
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(p.pid):
            time.sleep(0.1)
        if _alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
            while _alive(p.pid):
                time.sleep(0.05)
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        for path in p.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def restart(self, name: str, timeout_s: float = 180.0) -> Proc:
        """Start one process again (after a crash or a stop), on the same ports, and wait until it is
        healthy."""
        p = self.proc(name)
        self.stop_one(p)
        self.start_one(p, _base_env())
        self.save()
        self.wait_healthy(p, timeout_s)
        return p

    def down(self) -> None:
        for p in reversed(self.procs):
            self.stop_one(p)
            (self.run_dir / f"{p.name}.pid").unlink(missing_ok=True)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


def up(opts: StackOptions, *, timeout_s: float = 180.0, log: Callable[[str], None] = print) -> Stack:
    existing = Stack.load(opts.run_dir)
    if existing is not None and any(_alive(p.pid) for p in existing.procs):
        raise RuntimeError(f"a stack is already running from {opts.run_dir} (run `megastack down` first)")
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(opts.run_dir, plan(opts))
    for p in stack.procs:
        p.env = {**opts.extra_env, **p.env}
    base_env = _base_env()
    # jobs may name paths under the data roots only: the operator's setting, or the repository's runs/ and
    # models/ and the folder the stack is started from; plus what the caller adds (the demo's folders)
    base_env[ROOTS_ENV] = ":".join(str(r) for r in (*data_roots(), *opts.data_roots))
    stages = sorted({p.stage for p in stack.procs})
    try:
        # Back-end services (and Ray) start together; the gateway once they are all healthy.
        for group in ([p for p in stack.procs if p.stage == st] for st in stages):
            for p in group:
                stack.start_one(p, base_env)
                stack.save()
            for p in group:
                stack.wait_healthy(p, timeout_s)
                log(f"  {p.name:<10} pid {p.pid:<7} {'  '.join(f'{k}={v}' for k, v in p.endpoints.items())}")
    except BaseException:
        stack.down()
        raise
    return stack


def _base_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def down(run_dir: Path = RUN_DIR) -> bool:
    stack = Stack.load(run_dir)
    if stack is None:
        return False
    stack.down()
    return True


def _cmd_up(a: argparse.Namespace) -> int:
    services = tuple(a.services.split(",")) if a.services else StackOptions.services
    opts = StackOptions(
        run_dir=a.run_dir,
        model_dir=a.model_dir,
        replicas=a.replicas,
        services=services,
        gateway_port=a.port,
        prometheus=a.prometheus,
    )
    print(f"starting {', '.join(services)} (logs in {a.run_dir}/)")
    try:
        stack = up(opts, timeout_s=a.timeout)
    except RuntimeError as e:
        print(f"megastack up: error: {e}", file=sys.stderr)
        return 1
    print(
        f"stack is up: {stack.endpoint('gateway', 'http') if 'gateway' in services else ''}  (stop with "
        "`make down`)"
    )
    if a.prometheus:
        print(
            f"prometheus: {stack.endpoint('prometheus', 'http')} (alerts: "
            f"{stack.endpoint('prometheus', 'http')}/alerts)"
        )
    return 0


def _cmd_down(a: argparse.Namespace) -> int:
    print("stopped" if down(a.run_dir) else f"no stack running from {a.run_dir}")
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    stack = Stack.load(a.run_dir)
    if stack is None:
        print(f"no stack running from {a.run_dir}")
        return 1
    rc = 0
    for p in stack.procs:
        alive = _alive(p.pid)
        ok = alive and _healthy(p.health, p.env)
        rc |= 0 if ok else 1
        print(
            f"{p.name:<10} pid {p.pid:<7} {'healthy' if ok else 'running, unhealthy' if alive else 'dead'}  "
            f"log {p.log}"
        )
    return rc


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run-dir", type=Path, default=RUN_DIR, help="pid, log and state folder (default .run/)"
    )
    p = sub.add_parser("up", parents=[common], help="start the services in the background")
    p.add_argument(
        "--services",
        default="",
        help="comma-separated subset (default: textgen,gateway + the job services that exist)",
    )
    p.add_argument("--replicas", type=int, default=1, help="textgen replicas behind the gateway")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint textgen serves")
    p.add_argument("--port", type=int, default=5000, help="gateway HTTP port")
    p.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for each service to be healthy"
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also start Prometheus on 127.0.0.1:9090 scraping every service, "
        "with deploy/prometheus/alerts.yml",
    )
    p.set_defaults(func=_cmd_up)
    d = sub.add_parser("down", parents=[common], help="stop the services started by `up`")
    d.set_defaults(func=_cmd_down)
    s = sub.add_parser("status", parents=[common], help="show the services and their health")
    s.set_defaults(func=_cmd_status)
