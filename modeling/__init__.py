"""The EnergyGPT model files, exactly as they ship beside a checkpoint (installed as `energy_gpt.modeling`)."""

from .configuration_energy_gpt import EnergyGPTConfig
from .modeling_energy_gpt import (
    EnergyGPTForCausalLM,
    EnergyGPTForSequenceClassification,
    EnergyGPTModel,
    EnergyGPTPreTrainedModel,
)
from .solvers_energy_gpt import (
    ATTENTION_ENERGIES,
    ATTENTION_SOLVERS,
    LOCAL_ENERGIES,
    register_solver,
)

__all__ = [
    "ATTENTION_ENERGIES",
    "ATTENTION_SOLVERS",
    "LOCAL_ENERGIES",
    "EnergyGPTConfig",
    "EnergyGPTForCausalLM",
    "EnergyGPTForSequenceClassification",
    "EnergyGPTModel",
    "EnergyGPTPreTrainedModel",
    "register_solver",
]
