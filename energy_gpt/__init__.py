"""EnergyGPT: energy-based attention solvers (see `ATTENTION_SOLVERS`) as a transformers model family.

Importing this package registers the classes with the Auto factories, and EnergyGPT's default adapter targets with
PEFT when it is installed (`energy_gpt.peft_utils`). A new solver is declared with `Solver`, `SolverField` and
`SolverParameter` and added with `register_solver` (docs/solvers.md, "Adding a solver").
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from . import modeling
from .modeling import (
    ATTENTION_ENERGIES,
    ATTENTION_SOLVERS,
    LOCAL_ENERGIES,
    EnergyGPTConfig,
    EnergyGPTForCausalLM,
    EnergyGPTForSequenceClassification,
    EnergyGPTModel,
    EnergyGPTPreTrainedModel,
    register_solver,
)
from .modeling.solvers_energy_gpt import Solver, SolverField, SolverParameter
from .peft_utils import register_peft_target_modules
from .solver_stats import record_solver_statistics, solver_report


__version__ = "0.1.0"

AutoConfig.register(EnergyGPTConfig.model_type, EnergyGPTConfig, exist_ok=True)
AutoModel.register(EnergyGPTConfig, EnergyGPTModel, exist_ok=True)
AutoModelForCausalLM.register(EnergyGPTConfig, EnergyGPTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(EnergyGPTConfig, EnergyGPTForSequenceClassification, exist_ok=True)

# PEFT's default adapter targets for `energy_gpt` (so `LoraConfig(task_type=...)` alone works); a no-op without PEFT.
register_peft_target_modules()

__all__ = [
    *modeling.__all__,
    "Solver",
    "SolverField",
    "SolverParameter",
    "__version__",
    "record_solver_statistics",
    "solver_report",
]
