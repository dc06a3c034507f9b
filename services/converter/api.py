"""The converter's public surface for tools/ (CLI, benchmarks, gpu_check); tools/check_imports.py allows
tools/ no other module of this service. Names resolve lazily (shared/lazy.py)."""

from shared.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ConvertSpec": "services.converter.conversion",
        "convert": "services.converter.conversion",
        "validate": "services.converter.conversion",
        "EXPECTABLE": "services.converter.conversion",
        "spec_to_pb": "services.converter.wire",
    },
)
