"""PEFT support: EnergyGPT's default adapter targets, and the solver scalars as extra trainable modules.

`import energy_gpt` calls `register_peft_target_modules()` (when PEFT is installed), so that, as for GPT-2,

    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))

needs no `target_modules`. Without `energy_gpt` imported (a checkpoint loaded with `trust_remote_code=True` only),
pass `target_modules=["c_attn", "c_proj"]` (or `"all-linear"`).

The solver scalars (momentum beta per layer, Newton lambda per head) are a handful of parameters that decide what the
model computes; PEFT freezes them with the rest of the base model. `solver_modules_to_save(model)` names the modules
that own them, for `LoraConfig(modules_to_save=...)`: they are then trained, saved with the adapter and merged.
"""

import logging

from torch import nn


logger = logging.getLogger(__name__)

MODEL_TYPE = "energy_gpt"

# EnergyGPT's attention (`c_attn`: fused q, k, v; `c_proj`) and MLP (`c_fc`, `c_proj`) Linear layers have GPT-2's
# names: the LoRA default is the attention input and every output projection (the recipes' --lora_target_modules).
LORA_TARGET_MODULES = ["c_attn", "c_proj"]

# Names of the submodules that hold a solver's own parameters: `solver` (in the attention module, today), and
# `residual_rule` (block) / `head_rule` (attention) in the solver-registry layout. Modules are found by these names
# and by owning parameters directly, never by parameter names.
SOLVER_MODULE_NAMES = ("residual_rule", "head_rule", "solver")


def register_peft_target_modules() -> bool:
    """Add `energy_gpt` to PEFT's default target-module mappings; returns False when PEFT is not installed.

    The LoRA mapping (and every tuner mapping that copies it: LoRA's `["c_attn"]` for GPT-2) gets
    `LORA_TARGET_MODULES`; any other tuner mapping that knows GPT-2 (IA3, LN-tuning, FourierFT, ...) gets GPT-2's
    entry, since EnergyGPT keeps GPT-2's module names (its Linear layers are `nn.Linear`, not GPT-2's `Conv1D`, which
    every PEFT tuner handles). An entry the user already set is kept.
    """
    try:
        from peft.utils import constants
    except ImportError as error:
        # Not installed: nothing to do. Broken or incompatible: say so, but never break `import energy_gpt`.
        if not (isinstance(error, ModuleNotFoundError) and error.name == "peft"):
            logger.warning(f"PEFT could not be imported ({error}); EnergyGPT has no default PEFT targets.")
        return False
    gpt2_lora_default = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get("gpt2")
    for name in dir(constants):
        mapping = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_MODULES_MAPPING")):
            continue
        if not isinstance(mapping, dict) or "gpt2" not in mapping or MODEL_TYPE in mapping:
            continue
        gpt2_entry = mapping["gpt2"]
        mapping[MODEL_TYPE] = list(LORA_TARGET_MODULES) if gpt2_entry == gpt2_lora_default else gpt2_entry
    return True


def solver_modules_to_save(model: nn.Module) -> list[str]:
    """Qualified names of the modules that own trainable solver parameters (beta / lambda), for PEFT's
    `modules_to_save`: `LoraConfig(task_type="CAUSAL_LM", modules_to_save=solver_modules_to_save(model))`.

    A module counts when its attribute name is one of `SOLVER_MODULE_NAMES` and it has parameters of its own
    (`recurse=False`) that require grad: frozen solver constants (`learn_solver_params=False`) stay frozen. Empty for
    `gd`; layer 0 of momentum / nag has no beta and is not listed. Call it on the base model, before `get_peft_model`
    freezes everything. PEFT matches each name as a suffix of the wrapped model's module names.
    """
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in SOLVER_MODULE_NAMES:
            continue
        if any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
            names.append(name)
    return names


__all__ = ["LORA_TARGET_MODULES", "SOLVER_MODULE_NAMES", "register_peft_target_modules", "solver_modules_to_save"]
