"""On-policy distillation with PowerOPD rewards on Megatron-Core."""

__version__ = "0.1.0"
