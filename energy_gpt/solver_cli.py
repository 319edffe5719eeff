"""Command-line flags for the energy axis and every registered solver's config fields, generated from the registry.

`energy-gpt pretrain`, `glue`, `convert` and `compare` all take `--attention_solver`, `--attention_energy`, ... and one
flag per solver field (`--momentum_beta`, `--newton_lambda`, ...) from here, so a newly registered solver's fields are
on every command line without touching the recipes.
"""

import argparse
import dataclasses
from typing import Any

from transformers.hf_argparser import string_to_bool

from .equivalence import ENERGY_AXIS_FIELDS
from .modeling.solvers_energy_gpt import ATTENTION_ENERGIES, LOCAL_ENERGIES, solver_config_fields


def parse_solver_schedule(value: str) -> str | list[str]:
    """`nag` -> "nag"; `gd,gd,nag,nag` -> one solver per layer."""
    names = [name.strip() for name in value.split(",")]
    return names[0] if len(names) == 1 else names


def _parse_optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null") else float(value)


def _flag_spec(name: str) -> tuple[Any, str]:
    """(parser for the string value, help) of a field, from its declared default's type."""
    if name == "attention_solver":
        return parse_solver_schedule, "Solver (see the README's table), `<residual>+<head>`, or one per layer: gd,gd,nag"
    if name in ENERGY_AXIS_FIELDS:
        helps = {"attention_energy": f"one of {', '.join(ATTENTION_ENERGIES)}",  # registered ones, plugins included
                 "local_energy": f"one of {', '.join(LOCAL_ENERGIES)}",
                 "learn_solver_params": "train the solver scalars (true) or keep them fixed (false)",
                 "num_loops": "looped depth: apply the block stack this many times"}
        parsers = {"learn_solver_params": string_to_bool, "num_loops": int}
        return parsers.get(name, str), helps[name]
    solver_field = solver_config_fields()[name]
    default = solver_field.default
    if isinstance(default, bool):
        parser = string_to_bool
    elif isinstance(default, (int, float)) or default is None:
        parser = _parse_optional_float
    else:
        parser = str
    return parser, f"{solver_field.doc} (config default: {default!r})"


def solver_field_names() -> tuple[str, ...]:
    return (*ENERGY_AXIS_FIELDS, *solver_config_fields())


def add_solver_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One `--<field>` flag per energy-axis / solver field, default None ("keep the config's value")."""
    for name in solver_field_names():
        value_parser, help_text = _flag_spec(name)
        parser.add_argument(f"--{name}", type=value_parser, default=None, help=help_text)


def solver_overrides(args: Any) -> dict[str, Any]:
    """The solver fields given on the command line, as config overrides."""
    return {name: getattr(args, name) for name in solver_field_names() if getattr(args, name, None) is not None}


def solver_arguments_dataclass() -> type:
    """A dataclass of the same flags, for `HfArgumentParser` (the recipes' `run_clm.py`-style arguments). Values are
    strings parsed by `SolverArguments.overrides()`, so every field type (lists, None) is accepted."""

    def overrides(self) -> dict[str, Any]:
        parsed = {}
        for name in solver_field_names():
            value = getattr(self, name, None)  # a solver registered after this class was made has no flag here
            if value is not None:  # strings from the command line; typed values from Python pass through
                parsed[name] = _flag_spec(name)[0](value) if isinstance(value, str) else value
        return parsed

    fields = [
        (name, str | None, dataclasses.field(default=None, metadata={"help": _flag_spec(name)[1]}))
        for name in solver_field_names()
    ]
    return dataclasses.make_dataclass("SolverArguments", fields, namespace={"overrides": overrides})


__all__ = [
    "add_solver_arguments",
    "parse_solver_schedule",
    "solver_arguments_dataclass",
    "solver_field_names",
    "solver_overrides",
]
