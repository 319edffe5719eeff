"""How an EnergyGPT config and its weights relate to GPT-2: the config fields EnergyGPT adds, which state-dict tensors
belong to solver rules, the field values at which a config computes GPT-2, and why given weights do not.

Read by conversion (`energy_gpt.conversion.gpt2`), the model card, the documentation tables and the benchmarks; the
shipped model files (`modeling/`) do not need any of it to run a model.
"""

from typing import Any

import torch

from .modeling.solvers_energy_gpt import (
    ATTENTION_ENERGIES,
    LOCAL_ENERGIES,
    NO_PRESERVING_VALUE,
    Solver,
    layer_solver_names,
    parse_solver,
    solver_config_fields,
)


# Submodules that own every rule tensor (and, in checkpoints of EnergyGPT 0.1, `attn.solver`).
RULE_MODULE_NAMES = ("residual_rule", "head_rule", "solver")
# The fields of the energy axis itself; every registered rule adds its own (`solver_config_fields`).
ENERGY_AXIS_FIELDS = ("attention_solver", "attention_energy", "local_energy", "learn_solver_params", "num_loops")


def is_rule_tensor(key: str) -> bool:
    """Whether a state-dict key belongs to a solver rule rather than to GPT-2's own weights."""
    return any(f".{name}." in key for name in RULE_MODULE_NAMES)


def energy_axis_config_fields() -> tuple[str, ...]:
    """The config fields EnergyGPT adds to GPT-2's: the energy axis and every registered rule's own fields."""
    return (*ENERGY_AXIS_FIELDS, *solver_config_fields())


def schedule_rules(config) -> list[Solver]:
    """Every rule a config uses: its layers' residual and head rules, plus its energy's and local energy's."""
    rules = []
    for residual, head in (parse_solver(name) for name in layer_solver_names(config)):
        rules += [residual] + ([head] if head is not None else [])
    local = LOCAL_ENERGIES.get(getattr(config, "local_energy", "elastic"))
    rules += [ATTENTION_ENERGIES[getattr(config, "attention_energy", "softmax")]] + ([local] if local else [])
    return list(dict.fromkeys(rules))


def function_preserving_settings(config) -> dict[str, Any]:
    """The field values at which the config's rules compute GPT-2 (e.g. `momentum_beta=0`, `newton_lambda=0`)."""
    return {solver_field.name: solver_field.gpt2_value
            for rule in schedule_rules(config) for solver_field in rule.fields
            if solver_field.gpt2_value is not NO_PRESERVING_VALUE}


def gpt2_equivalence_problems(config, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Why a model with this config and these weights does not compute exactly GPT-2 (empty: it does)."""
    problems = []
    rules = schedule_rules(config)
    if never := [rule.name for rule in rules if not rule.reduces_to_gpt2]:
        problems.append(
            f"attention_energy={config.attention_energy!r}, local_energy={config.local_energy!r}: {never} never "
            "compute GPT-2 (declared `reduces_to_gpt2=False`)"
        )
    if config.num_loops != 1:
        problems.append(f"num_loops={config.num_loops} (GPT-2 applies its blocks once)")
    settings = function_preserving_settings(config)
    parameters = {parameter.name: parameter for rule in rules for parameter in rule.parameters}
    init_fields = {parameter.init for parameter in parameters.values() if isinstance(parameter.init, str)}
    for name, value in settings.items():
        if name not in init_fields and getattr(config, name) != value:
            problems.append(f"{name}={getattr(config, name)!r} (GPT-2 needs {value!r})")
    for key, tensor in state_dict.items():
        if not is_rule_tensor(key):
            continue
        parameter = parameters.get(key.rsplit(".", 1)[-1])
        if parameter is None:
            problems.append(f"{key} (a solver tensor GPT-2 has no place for)")
            continue
        gpt2_value = settings.get(parameter.init) if isinstance(parameter.init, str) else None
        if gpt2_value is None:
            problems.append(f"{key} (its rule declares no GPT-2 value for it)")
        elif bool(tensor.float().ne(gpt2_value).any()):
            problems.append(f"{key} = {tensor.float().flatten()[:4].tolist()} (GPT-2 needs {gpt2_value})")
    return problems


__all__ = [
    "ENERGY_AXIS_FIELDS",
    "RULE_MODULE_NAMES",
    "energy_axis_config_fields",
    "function_preserving_settings",
    "gpt2_equivalence_problems",
    "is_rule_tensor",
    "schedule_rules",
]
