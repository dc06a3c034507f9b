"""The text-generation engine's public surface for tools/ (gpu_check, benchmarks); tools/check_imports.py
allows tools/ no other module of this service. Names resolve lazily (shared/lazy.py)."""

from shared.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "TextgenConfig": "services.textgen.config",
        "load_served_model": "services.textgen.loader",
        "DecoderLM": "services.textgen.modeling",
        "PagedKVCache": "services.textgen.modeling",
        "SamplingSpec": "services.textgen.sampling",
        "SequenceRequest": "services.textgen.sequences",
        "StopSpec": "services.textgen.sequences",
        "CANCELLED": "services.textgen.sequences",
        "ERROR": "services.textgen.sequences",
        "LENGTH": "services.textgen.sequences",
        "Constraints": "services.textgen.guided",
    },
)
