"""The LLM domain library under the services: model families and their key maps (``llm.models``), checkpoint
readers and writers (``llm.checkpoints``), megatron-core model building and its CPU shims (``llm.mcore``),
tokenizers and chat templates, Megatron's indexed datasets, device placement.

It may import torch, transformers and megatron-core; ``shared/`` (infrastructure: config, errors, gRPC, jobs,
metrics, paths) may not, and never imports this package. The gateway imports neither this package nor torch
(``tools/check_imports.py``)."""
