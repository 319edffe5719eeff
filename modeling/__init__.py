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
    record_solver_statistics,
    register_solver,
    solver_report,
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
    "record_solver_statistics",
    "register_solver",
    "solver_report",
]
