"""raco_ds: RACO multi-objective preference alignment for DeepSpeed and Megatron-core."""
