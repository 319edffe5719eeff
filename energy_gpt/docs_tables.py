"""The solver and energy tables of the README and docs, rendered from the registry so they cannot go stale.

Each table sits in a Markdown file between two markers:

    <!-- generated: solvers (python -m energy_gpt.docs_tables --write) -->
    | ... |
    <!-- end generated: solvers -->

`python -m energy_gpt.docs_tables --write` rewrites every marked region from the registered declarations (name, kind,
paper name, update rule, config fields, the energies a head rule exists for); `--check` (what the test runs) exits 1
when a file differs from what would be written. Which solver x energy pairs exist is read from the config's own
validation, so the grid says what `EnergyGPTConfig` accepts.
"""

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .equivalence import function_preserving_settings
from .modeling.configuration_energy_gpt import EnergyGPTConfig
from .modeling.solvers_energy_gpt import ATTENTION_ENERGIES, ATTENTION_SOLVERS, LOCAL_ENERGIES


REPO_ROOT = Path(__file__).resolve().parent.parent
# The files with generated tables, relative to the repository root.
DOCUMENTS = ("README.md", "docs/solvers.md", "docs/energies.md")
REGION = re.compile(
    r"(?P<begin><!-- generated: (?P<name>[a-z-]+) \(python -m energy_gpt\.docs_tables --write\) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a `|` inside the text (`||q - k||`) must not end the cell."""
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return _cell(f"`{text}`")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fields(rule) -> str:
    return ", ".join(_code(f"{field.name}={_value(field.default)}") for field in rule.fields) or "-"


def _config(**overrides: Any) -> EnergyGPTConfig | None:
    """A one-layer config with these settings, or None when `EnergyGPTConfig` rejects them."""
    try:
        return EnergyGPTConfig(n_layer=1, n_embd=8, n_head=2, **overrides)
    except ValueError:
        return None


def solver_table(with_fields: bool = False) -> str:
    """One row per registered solver: name, kind, paper name, update rule, where it computes GPT-2 (and its fields)."""
    header = ["`attention_solver`", "kind", "paper name", "update", "GPT-2 at (softmax energy)"]
    header += ["config fields (default)"] if with_fields else []
    rows = []
    for name, solver in ATTENTION_SOLVERS.items():
        config = _config(attention_solver=name)  # None: not defined for the softmax energy, so never GPT-2
        settings = function_preserving_settings(config) if config is not None else {}
        gpt2_at = ", ".join(_code(f"{field}={_value(value)}") for field, value in settings.items())
        gpt2_at = gpt2_at or ("always" if config is not None else "never")
        row = [_code(name), solver.kind, _cell(solver.paper_name), _code(solver.update_rule), gpt2_at]
        rows.append(row + ([_fields(solver)] if with_fields else []))
    return _table(header, rows)


def energies() -> list[tuple[str, dict[str, str]]]:
    """(row label, config settings) for every energy a config accepts: each attention energy with each local one."""
    default = EnergyGPTConfig()
    found = []
    for energy in ATTENTION_ENERGIES:
        for local in LOCAL_ENERGIES:
            if _config(attention_energy=energy, local_energy=local) is None:
                continue
            label = _code(energy)
            if local != default.local_energy:
                label += f" + {_code(f'local_energy={local!r}')}"
            elif energy == default.attention_energy:
                label += " (default)"
            found.append((label, {"attention_energy": energy, "local_energy": local}))
    return found


def energy_table(with_fields: bool = False) -> str:
    """The energy x optimiser grid: one row per energy, one column per registered solver ("yes" where the config
    accepts the pair, `ValueError` where it refuses it)."""
    header = ["energy", "one gradient step per head", *(_code(name) for name in ATTENTION_SOLVERS)]
    header += ["config fields (default)"] if with_fields else []
    rows = []
    for label, settings in energies():
        rule = LOCAL_ENERGIES[settings["local_energy"]] or ATTENTION_ENERGIES[settings["attention_energy"]]
        cells = ["yes" if _config(attention_solver=name, **settings) else "`ValueError`" for name in ATTENTION_SOLVERS]
        row = [label, _code(rule.update_rule.removeprefix("per head: ")), *cells]
        rows.append(row + ([_fields(rule)] if with_fields else []))
    return _table(header, rows)


TABLES: dict[str, Callable[[], str]] = {
    "solvers": solver_table,
    "solvers-with-fields": lambda: solver_table(with_fields=True),
    "energies": energy_table,
    "energies-with-fields": lambda: energy_table(with_fields=True),
}


def render_document(text: str) -> str:
    """`text` with every generated region replaced by the table it names."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"unknown generated table {name!r}; choose one of {sorted(TABLES)}")
        return match["begin"] + TABLES[name]() + match["end"]

    return REGION.sub(replace, text)


def generated_regions(text: str) -> list[str]:
    return [match["name"] for match in REGION.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m energy_gpt.docs_tables",
        description="Render the solver / energy tables of the README and docs from the registry.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the generated regions in place")
    action.add_argument("--check", action="store_true", help="exit 1 if a file differs from what --write would write")
    args = parser.parse_args(argv)
    stale = []
    for relative in DOCUMENTS:
        path = REPO_ROOT / relative
        text = path.read_text()
        rendered = render_document(text)
        if rendered == text:
            continue
        if args.write:
            path.write_text(rendered)
            print(f"updated {relative}")
        else:
            stale.append(relative)
    if stale:
        print(f"stale generated tables in {', '.join(stale)}: run `python -m energy_gpt.docs_tables --write`",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["DOCUMENTS", "TABLES", "energy_table", "generated_regions", "render_document", "solver_table"]


if __name__ == "__main__":
    sys.exit(main())
