"""One evaluation: lm-eval's simple_evaluate on a served model, results kept on disk.

Models: a textgen gRPC address (``TextgenLM``), an HF folder (lm-eval's own ``hf`` model) or an
OpenAI ``/v1/completions`` URL (lm-eval's ``local-completions`` with the server's tokenizer routes).
Task names are checked against lm-eval's index plus the shipped offline suite; a dataset that is not
available offline fails with the place it was expected. LM responses are cached per run
(``use_cache``), so a re-run after a failure does not redo the requests already answered.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    textgen_address: str = ""
    hf_checkpoint: str = ""
    completions_url: str = ""
    num_fewshot: int = -1  # -1 = the task's default
    limit: int = 0  # 0 = every document
    batch_size: int = 16
    seed: int = 1234
    include_paths: tuple[str, ...] = ()
    name: str = ""
    apply_chat_template: bool = False
    system_instruction: str = ""
    fewshot_as_multiturn: bool = False

    def model_kind(self) -> str:
        kinds = [k for k in ("textgen_address", "hf_checkpoint", "completions_url") if getattr(self, k)]
        if len(kinds) != 1:
            raise InvalidArgument(
                "give exactly one model: textgen_address, hf_checkpoint or completions_url", field="model"
            )
        return kinds[0]


def offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compile_templates_once() -> None:
    """lm-eval compiles a task's Jinja template again for every document it renders (about 0.7 ms each: 1.6 s
    of building a 600-request 5-shot task, most of a re-run answered from the request cache). Here each
    template string is compiled once and reused; the rendering is lm-eval's own, unchanged."""
    from functools import lru_cache

    import lm_eval.utils as U

    if getattr(U.apply_template, "megastack_cached", False):
        return
    compiled = lru_cache(maxsize=4096)(U.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.megastack_cached = True  # type: ignore[attr-defined]
    apply_template.original = U.apply_template  # type: ignore[attr-defined]
    U.apply_template = apply_template


def task_manager(include_paths: tuple[str, ...] = ()):
    from lm_eval.tasks import TaskManager

    from services.evaluator import index_cache
    from services.evaluator.suite import render

    index_cache.install()
    _compile_templates_once()

    for p in include_paths:
        if not Path(p).is_dir():
            raise InvalidArgument(f"include path {p} is not a folder", field="include_paths")
    return TaskManager(include_path=[str(render()), *include_paths])


def check_tasks(tasks: tuple[str, ...], known: list[str]) -> None:
    if not tasks:
        raise InvalidArgument("tasks is empty (try megastack_suite)", field="tasks")
    known_set = set(known)
    for t in tasks:
        if t not in known_set:
            close = difflib.get_close_matches(t, known, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise InvalidArgument(f"unknown task {t!r}{hint}", field="tasks")


def check_spec(spec: EvalSpec, known: list[str]) -> None:
    kind = spec.model_kind()
    if spec.limit < 0:
        raise InvalidArgument("limit must be > 0 (or unset for every document)", field="limit")
    if spec.batch_size < 1:
        raise InvalidArgument("batch_size must be >= 1", field="batch_size")
    if spec.fewshot_as_multiturn and not spec.apply_chat_template:
        raise InvalidArgument(
            "fewshot_as_multiturn lays few-shot examples out as chat turns: it needs apply_chat_template",
            field="fewshot_as_multiturn",
        )
    if kind == "hf_checkpoint" and not (Path(spec.hf_checkpoint) / "config.json").is_file():
        raise InvalidArgument(
            f"hf_checkpoint {spec.hf_checkpoint} is not an HF folder (no config.json)", field="hf_checkpoint"
        )
    check_tasks(spec.tasks, known)


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def task_datasets(tm, name: str, _depth: int = 0) -> list[tuple[str, str | None, str | None, Any]]:
    """(task, dataset_path, dataset_name, data_files) of every task a task/group/tag name runs, read from the
    task YAMLs (their ``include`` chains resolved) without loading any data."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    entry = tm.task_index.get(name)
    if entry is None or _depth > 8:
        return []
    cfg, path = dict(entry.cfg or {}), entry.yaml_path
    for _ in range(5):
        if "include" not in cfg or path is None:
            break
        inc = Path(path).parent / cfg.pop("include")
        cfg = {**(yaml.load(inc.read_text(), Loader=_Loader) or {}), **cfg}
        path = inc
    subs = cfg.get("task")
    if isinstance(subs, list) or entry.kind.name == "TAG":
        if not isinstance(subs, list):
            subs = [n for n, e in tm.task_index.items() if name in (e.tags or set())]
        out = []
        for sub in subs:
            sub_name = sub if isinstance(sub, str) else sub.get("task") if isinstance(sub, dict) else None
            if isinstance(sub_name, str):
                out += task_datasets(tm, sub_name, _depth + 1)
        return out
    return [
        (
            name,
            cfg.get("dataset_path"),
            cfg.get("dataset_name"),
            (cfg.get("dataset_kwargs") or {}).get("data_files"),
        )
    ]


def dataset_locations(path: str) -> list[Path]:
    """Where an HF dataset is found offline: the hub cache and the datasets cache."""
    from datasets import config as ds_config
    from huggingface_hub import constants as hub_constants

    return [
        Path(hub_constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}",
        Path(ds_config.HF_DATASETS_CACHE) / path.replace("/", "___"),
    ]


def check_data(tm, tasks: tuple[str, ...]) -> None:
    """Every dataset the tasks need is on this machine, else one error naming where each was looked for."""
    missing: dict[str, list[str]] = {}
    for task in tasks:
        for sub, path, _name, files in task_datasets(tm, task):
            if not path or path in LOCAL_BUILDERS or Path(path).exists():
                if path in LOCAL_BUILDERS and files:
                    listed = (
                        files.values()
                        if isinstance(files, dict)
                        else [files]
                        if isinstance(files, str)
                        else files
                    )
                    absent = [
                        f for f in listed if isinstance(f, str) and "*" not in f and not Path(f).exists()
                    ]
                    if absent:
                        raise FailedPrecondition(
                            f"{sub}: data file {absent[0]} does not exist", field="tasks"
                        )
                continue
            if not any(p.is_dir() for p in dataset_locations(path)):
                missing.setdefault(path, []).append(sub)
    if missing:
        parts = []
        for path, subs in missing.items():
            where = " or ".join(str(p) for p in dataset_locations(path))
            parts.append(
                f"{path} (needed by {subs[0]}{f' and {len(subs) - 1} more' if len(subs) > 1 else ''}; "
                f"looked in {where})"
            )
        first = next(iter(missing))
        raise FailedPrecondition(
            f"the data of {', '.join(tasks)} is not on this machine: {'; '.join(parts)}. On a connected "
            "machine load it once "
            f"(e.g. python -c \"import datasets; datasets.load_dataset('{first}', <config>)\") and copy its "
            "HF cache "
            "(~/.cache/huggingface) here or point HF_HOME at a copy; or define the task on local files "
            "(include_paths)",
            field="tasks",
        )


def check_confined(spec: EvalSpec) -> None:
    """A submitted evaluation reads task folders and checkpoints only under the data roots (task YAMLs can
    import Python with ``!function``) and calls only allowed model endpoints (shared/roots.py)."""
    from shared.roots import check_endpoint, under_roots

    for path in spec.include_paths:
        under_roots(path, "include_paths")
    if spec.hf_checkpoint:
        under_roots(spec.hf_checkpoint, "hf_checkpoint")
    if spec.textgen_address:
        check_endpoint(spec.textgen_address, "textgen_address")
    if spec.completions_url:
        check_endpoint(spec.completions_url, "completions_url")


def check_reachable(spec: EvalSpec) -> None:
    """The model must answer before a job exists (no run that only fails later)."""
    import requests

    from shared.grpc.channel import check_health, make_channel

    if spec.textgen_address:
        with make_channel(spec.textgen_address) as ch:
            if not check_health(ch, "megastack.textgen.v1.TextGenService", timeout_s=3):
                raise FailedPrecondition(
                    f"textgen at {spec.textgen_address} is not reachable or not serving",
                    field="textgen_address",
                )
            if spec.apply_chat_template:
                from protos.textgen.v1 import textgen_pb2, textgen_pb2_grpc

                info = textgen_pb2_grpc.TextGenServiceStub(ch).GetModelInfo(
                    textgen_pb2.GetModelInfoRequest(), timeout=10
                )
                if not info.has_chat_template:
                    raise InvalidArgument(
                        f"the model served at {spec.textgen_address} ({info.name}) has no chat template",
                        field="apply_chat_template",
                    )
    elif spec.completions_url:
        base = spec.completions_url.split("/v1/")[0]
        try:
            ok = requests.get(f"{base}/v1/models", timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        if not ok:
            raise FailedPrecondition(
                f"{spec.completions_url} is not reachable (GET {base}/v1/models failed)",
                field="completions_url",
            )


def _model(spec: EvalSpec, progress: Progress, request_cache: Path | None = None):
    """The lm-eval model object and, for the record, the arguments it was built with. lm-eval's own
    models (``hf``, ``local-completions``) are built as ``simple_evaluate`` would build them, with their
    requests counted and reported."""
    if spec.textgen_address:
        from services.evaluator.lm import TextgenLM
        from services.evaluator.request_cache import RequestCache

        cache = RequestCache(request_cache) if request_cache is not None else None
        lm = TextgenLM(spec.textgen_address, batch_size=spec.batch_size, progress=progress, cache=cache)
        return lm, None
    from lm_eval.api.registry import get_model

    if spec.hf_checkpoint:
        from llm.devices import resolve_device

        name, args = (
            "hf",
            {"pretrained": spec.hf_checkpoint, "dtype": "float32", "device": str(resolve_device("auto"))},
        )
    else:
        import requests

        base = spec.completions_url.split("/v1/")[0]
        model_name = requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        name, args = (
            "local-completions",
            {
                "model": model_name,
                "base_url": spec.completions_url,
                "tokenizer_backend": "remote",
                "num_concurrent": 1,
                "max_retries": 1,
                "tokenized_requests": True,
            },
        )
    lm = get_model(name).create_from_arg_obj(
        args, {"batch_size": spec.batch_size, "max_batch_size": None, "device": None}
    )
    return _counted(lm, progress), args


def _counted(lm, progress: Progress):
    """Count the requests of each request type as lm-eval hands them over (all of one type at once),
    reporting done/total before and after each, so runs of lm-eval's own models show progress too."""
    lm._done = lm._total = 0

    def wrap(method_name: str):
        method = getattr(lm, method_name)

        def counted(requests, *args, **kwargs):
            lm._total += len(requests)
            progress(lm._done, lm._total, method_name)
            out = method(requests, *args, **kwargs)
            lm._done += len(requests)
            progress(lm._done, lm._total, method_name)
            return out

        return counted

    for method_name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, method_name, wrap(method_name))
    return lm


def _dataset_hint(e: BaseException, tasks: tuple[str, ...]) -> FailedPrecondition | None:
    text = f"{type(e).__name__}: {e}"
    markers = (
        "offline",
        "Couldn't reach",
        "ConnectionError",
        "LocalEntryNotFoundError",
        "HF_HUB_OFFLINE",
        "not found on the Hub",
        "DatasetNotFoundError",
        "FileNotFoundError",
    )
    if not any(m in text for m in markers):
        return None
    cache = os.environ.get("HF_DATASETS_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"
    )
    return FailedPrecondition(
        f"the data of {', '.join(tasks)} is not available offline: put the dataset in the HF datasets cache "
        f"({cache}) "
        f"with `datasets` on a connected machine and copy it here, or define the task with local data files "
        f"(include_paths). Loader said: {text.splitlines()[0][:300]}",
        field="tasks",
    )


def write_samples(path: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    """One line per scored sample: task, doc_id, its numeric per-sample metrics and its (filtered) answer,
    what ``megastack eval compare`` pairs two runs on. Written whole, then renamed (atomic)."""
    lines = []
    for task, docs in samples.items():
        for d in docs:
            metrics = {
                k: v
                for k, v in d.items()
                if k not in SAMPLE_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            answer = d.get("filtered_resps", d.get("resps", ""))
            lines.append(
                json.dumps(
                    {"task": task, "doc_id": d.get("doc_id"), "metrics": metrics, "answer": str(answer)[:200]}
                )
            )
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


SAMPLE_FIELDS = (
    "doc_id",
    "doc",
    "target",
    "arguments",
    "resps",
    "filtered_resps",
    "doc_hash",
    "prompt_hash",
    "target_hash",
)


def run(
    spec: EvalSpec,
    work_dir: Path,
    progress: Progress = lambda d, t, w: None,
    *,
    request_cache: Path | None = None,
) -> dict[str, Any]:
    """Evaluate; write results.json and summary.md into ``work_dir``; return the result record. With
    ``request_cache`` (a sqlite file) a textgen model's answers are read from and kept in it."""
    offline_env()
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers the built-in models (lm-eval only does it while its registry is empty)
    from lm_eval.utils import make_table

    t0 = time.perf_counter()
    tm = task_manager(spec.include_paths)
    check_spec(spec, tm.all_tasks)
    check_data(tm, spec.tasks)
    model, model_args = _model(spec, progress, request_cache)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=list(spec.tasks),
            num_fewshot=spec.num_fewshot if spec.num_fewshot >= 0 else None,
            limit=spec.limit or None,
            batch_size=spec.batch_size,
            task_manager=tm,
            bootstrap_iters=0,
            log_samples=True,  # per-sample scores go to samples.jsonl (eval compare's paired tests)
            use_cache=str(work_dir / "lm-cache"),
            random_seed=spec.seed,
            numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
            apply_chat_template=spec.apply_chat_template,
            system_instruction=spec.system_instruction or None,
            fewshot_as_multiturn=spec.fewshot_as_multiturn,
        )
    except Exception as e:
        hint = _dataset_hint(e, spec.tasks)
        if hint is not None:
            raise hint from None
        raise
    seconds = time.perf_counter() - t0
    results_path = work_dir / "results.json"
    # what this run asked for, and the engine's numeric mode (whether its scores can move with the load)
    info = getattr(model, "info", None)
    determinism = model.determinism() if hasattr(model, "determinism") else None
    results["megastack"] = {
        "apply_chat_template": spec.apply_chat_template,
        "system_instruction": spec.system_instruction,
        "fewshot_as_multiturn": spec.fewshot_as_multiturn,
        "batch_invariant": info.batch_invariant if info is not None else None,
        "determinism": determinism,
        "request_cache": (
            {"hits": model.cache.hits, "misses": model.cache.misses, "sent": model.sent}
            if getattr(model, "cache", None) is not None
            else None
        ),
    }
    samples = results.pop("samples", None) or {}
    write_samples(work_dir / "samples.jsonl", samples)
    results_path.write_text(json.dumps(results, indent=1, default=str))
    summary = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
    (work_dir / "summary.md").write_text(summary)
    tasks = []
    for task, metrics in results["results"].items():
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k not in ("alias", "sample_len")
        }
        tasks.append(
            {
                "task": task,
                "metrics": values,
                "num_samples": int(results.get("n-samples", {}).get(task, {}).get("effective", 0)),
            }
        )
    return {
        "tasks": tasks,
        "results_path": str(results_path),
        "summary": summary,
        "seconds": seconds,
        "num_requests": int(model._total),
        "determinism": -1.0 if determinism is None else determinism,
        "requests_sent": int(getattr(model, "sent", model._total)),
        "cache_hits": int(model.cache.hits) if getattr(model, "cache", None) is not None else 0,
    }
