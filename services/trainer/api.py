"""The trainer's public surface for tools/ (CLI, demo, benchmarks, gpu_check); tools/check_imports.py allows
tools/ no other module of this service. Names resolve lazily (shared/lazy.py)."""

from shared.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "TrainSpec": "services.trainer.spec",
        "validate": "services.trainer.spec",
        "resolve_arch": "services.trainer.spec",
        "spec_from_dict": "services.trainer.wire",
        "spec_to_pb": "services.trainer.wire",
        "spec_record": "services.trainer.wire",
        "load_yaml": "services.trainer.wire",
        "run_local": "services.trainer.torchrun",
        "RayLauncher": "services.trainer.launcher",
        "flops_per_token": "services.trainer.perf",
        "SAVES_FILE": "services.trainer.jobfiles",
    },
)
