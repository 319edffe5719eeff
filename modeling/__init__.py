"""The EnergyGPT model files, exactly as they ship beside a checkpoint (installed as `energy_gpt.modeling`)."""

from .configuration_energy_gpt import EnergyGPTConfig
from .modeling_energy_gpt import (
    EnergyGPTForCausalLM,
    EnergyGPTForSequenceClassification,
    EnergyGPTModel,
    EnergyGPTPreTrainedModel,
)
from .solvers_energy_gpt import ATTENTION_SOLVERS

__all__ = [
    "ATTENTION_SOLVERS",
    "EnergyGPTConfig",
    "EnergyGPTForCausalLM",
    "EnergyGPTForSequenceClassification",
    "EnergyGPTModel",
    "EnergyGPTPreTrainedModel",
]
