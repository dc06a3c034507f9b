"""The Ray Jobs entrypoint of a training job: one actor per rank, gang-scheduled, with retries.

    python -m services.trainer.ray_driver SPEC_JSON     (submitted by the trainer service)
    python -m services.trainer.ray_driver SPEC.yaml     (a RayJob's entrypoint: deploy/kuberay/rayjob.yaml)

A placement group reserves ``world_size`` bundles (``cpus_per_worker`` CPU and ``gpus_per_worker``
GPU each) at once; rank 0's actor picks MASTER_ADDR/MASTER_PORT, and every actor runs
``services.trainer.train.run`` in its own process with RANK/WORLD_SIZE set. If a rank fails or dies,
the others are stopped and, while ``max_retries`` allows, a new attempt resumes from the last
checkpoint; Ray Jobs itself never retries. Attempts are recorded in ``<save_dir>/megastack-attempt.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.trainer import heartbeat
from services.trainer.jobfiles import ATTEMPT_FILE, RESOURCE_WAIT_ENV
from services.trainer.spec import TrainSpec, check_save_dir
from shared.atomic import mark_output, write_text_atomic
from shared.net import free_port
from shared.proc import die_with_parent

logger = logging.getLogger("services.trainer.ray_driver")


def _child_setup() -> None:
    """In the rank process: die with the actor (PR_SET_PDEATHSIG) and run at normal priority.

    Ray starts workers at nice 15, which makes a training rank yield the CPU to every other
    process; where permitted, the rank goes back to nice 0.
    """
    die_with_parent()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        pass


@ray.remote
class RankWorker:
    """One training rank: an actor holding the resources, running the rank as a clean child process.

    Running training inside the Ray worker itself measured ~7% slower per step (Ray's threads share
    the process); a child process is what torchrun would start, and it cannot outlive its actor.
    """

    def address(self) -> tuple[str, int]:
        # Not an ephemeral port (see shared.net): an outgoing connection could take it before rank 0 binds it.
        return ray.util.get_node_ip_address(), free_port("")

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec_json: str, rank: int, world: int, master_addr: str, master_port: int) -> int:
        import subprocess

        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "PYTHONUNBUFFERED": "1",
        }
        # The spec goes through a pipe: a spec file in /tmp was left behind whenever the actor was killed.
        with subprocess.Popen(
            [sys.executable, "-m", "services.trainer.train", "-"],
            env=env,
            stdin=subprocess.PIPE,
            text=True,
            preexec_fn=_child_setup,
        ) as child:
            child.stdin.write(spec_json)
            child.stdin.close()
            return child.wait()


def unfit_reason(bundle: dict[str, float], world: int, cluster: dict[str, float]) -> str:
    """Why the cluster as it stands can never hold ``world`` ranks of ``bundle`` (empty when it can): a job
    asking GPUs of a CPU-only cluster fails at once, naming the field, instead of waiting for a placement."""
    for resource, per_rank in bundle.items():
        have = cluster.get(resource, 0.0)
        if per_rank * world > have:
            field = {"GPU": "resources.gpus_per_worker", "CPU": "resources.cpus_per_worker"}.get(
                resource, "resources"
            )
            return (
                f"the Ray cluster has {have:g} {resource} in all; the job asks {world} rank(s) x "
                f"{per_rank:g} {resource} "
                f"({field}){' - set it to 0 to train on CPU' if resource == 'GPU' else ''}"
            )
    return ""


def wait_for_resources(bundle: dict[str, float], world: int, wait_s: float) -> str:
    """Empty once the cluster holds enough in all for the job; else, after ``wait_s`` seconds (an autoscaling
    cluster adding nodes: the trainer's MEGASTACK_TRAINER_RESOURCE_WAIT_S), why it does not."""
    deadline = time.monotonic() + wait_s
    while True:
        why = unfit_reason(bundle, world, ray.cluster_resources())
        if not why or time.monotonic() >= deadline:
            return why
        logger.info("waiting for the cluster to grow: %s", why)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def rank_bundle(spec: TrainSpec) -> dict[str, float]:
    return {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}


def restart_reason(why: str) -> str:
    return "hang" if why.startswith("hang:") else "rank_failed"


def attempt_once(spec: TrainSpec, spec_json: str, attempt: int, previous: str = "") -> tuple[bool, str]:
    world = spec.world_size
    bundle = rank_bundle(spec)
    pg = placement_group([bundle] * world, strategy="PACK", name=f"megastack-{spec.name}-{attempt}")
    ready, _ = ray.wait([pg.ready()], timeout=600)
    if not ready:
        remove_placement_group(pg)
        return False, f"the cluster could not reserve {world} x {bundle} within 10 minutes"
    actors = [
        RankWorker.options(
            num_cpus=spec.cpus_per_worker,
            num_gpus=spec.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote()
        for i in range(world)
    ]
    try:
        addr, port = ray.get(actors[0].address.remote())
        pids = ray.get([a.pid.remote() for a in actors])
        write_text_atomic(
            Path(spec.save_dir) / ATTEMPT_FILE,
            json.dumps(
                {
                    "attempt": attempt,
                    "max_retries": spec.max_retries,
                    "pids": pids,
                    "started_unix_s": time.time(),
                    **(
                        {"restart_reason": restart_reason(previous), "previous_failure": previous}
                        if previous
                        else {}
                    ),
                }
            ),
        )
        started = time.time()
        pending = [a.run.remote(spec_json, rank, world, addr, port) for rank, a in enumerate(actors)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=min(10.0, spec.hang_timeout_s / 4))
            if not done:
                stale = heartbeat.stale_ranks(spec.save_dir, world, spec.hang_timeout_s, since=started)
                if stale:
                    rank, silent = stale[0]
                    return False, (
                        f"hang: rank {rank} made no progress for {silent:.0f}s "
                        f"(resources.hang_timeout_s={spec.hang_timeout_s:g})"
                    )
                continue
            try:
                code = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                return False, f"a rank failed: {str(e).splitlines()[0][:300]}"
            if code != 0:
                return False, f"a rank exited with code {code}"
        return True, ""
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def load_spec(path: Path) -> TrainSpec:
    """The trainer service's JSON, or a TrainJobSpec YAML as `megastack train submit` takes (validated
    here)."""
    if path.suffix in (".yaml", ".yml"):
        from services.trainer.spec import validate
        from services.trainer.wire import load_yaml

        spec = load_yaml(path)
        validate(spec)
        return spec
    return TrainSpec.from_json(path.read_text())


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s driver %(levelname)s: %(message)s"
    )
    if len(argv) != 1:
        logger.error("usage: python -m services.trainer.ray_driver SPEC.json|SPEC.yaml")
        return 2
    from shared.errors import ServiceError

    try:
        spec = load_spec(Path(argv[0]))
        check_save_dir(spec)  # again: the folder may have changed since the job was submitted
    except ServiceError as e:
        logger.error("%s", e.message)
        return 2
    spec_json = spec.to_json()
    Path(spec.save_dir).mkdir(parents=True, exist_ok=True)
    mark_output(Path(spec.save_dir))  # the job's folder from now on (its attempt file goes in first)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
    why = wait_for_resources(
        rank_bundle(spec), spec.world_size, float(os.environ.get(RESOURCE_WAIT_ENV) or 0)
    )
    if why:  # retrying cannot help
        logger.error("%s", why)
        return 1
    why = ""
    for attempt in range(1, spec.max_retries + 2):
        logger.info(
            "attempt %d of %d: %d ranks (TP=%d PP=%d DP=%d)",
            attempt,
            spec.max_retries + 1,
            spec.world_size,
            spec.tp,
            spec.pp,
            spec.dp,
        )
        ok, why = attempt_once(spec, spec_json, attempt, previous=why if attempt > 1 else "")
        if ok:
            logger.info("training finished")
            return 0
        logger.error("attempt %d failed: %s", attempt, why)
    logger.error("giving up after %d attempts: %s", spec.max_retries + 1, why)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
