"""The evaluator's public surface for tools/ (benchmarks); tools/check_imports.py allows tools/ no other
module of this service. Names resolve lazily (shared/lazy.py)."""

from shared.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "TextgenLM": "services.evaluator.lm",
        "RequestCache": "services.evaluator.request_cache",
        "read_samples": "services.evaluator.significance",
        "compare_samples": "services.evaluator.significance",
        "offline_env": "services.evaluator.harness",
        "task_manager": "services.evaluator.harness",
    },
)
