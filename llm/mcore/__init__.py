"""megatron-core glue shared by the trainer, the converter and gpu_check (importing this package imports
nothing heavy)."""

# Layer specs a training job may ask for (TrainSpec.transformer_impl); see llm.mcore.model.resolve_impl.
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
