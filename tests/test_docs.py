"""Documentation that cannot go stale: the solver / energy tables are what the registry renders, the "Adding a solver"
section of docs/solvers.md runs as written, and the project's files speak of the project only."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT


# ---------------------------------------------------------------------------------------------------------------------
# Generated tables
# ---------------------------------------------------------------------------------------------------------------------


def test_generated_tables_are_what_the_registry_renders():
    """In a fresh process (only the solvers the package registers): `--check` passes, i.e. `--write` changes nothing."""
    from energy_gpt.docs_tables import DOCUMENTS, generated_regions

    expected = {"README.md": ["solvers", "energies"], "docs/solvers.md": ["solvers-with-fields"],
                "docs/energies.md": ["energies-with-fields"]}
    assert {name: generated_regions((REPO_ROOT / name).read_text()) for name in DOCUMENTS} == expected
    result = subprocess.run([sys.executable, "-m", "energy_gpt.docs_tables", "--check"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def test_tables_follow_the_registry():
    from energy_gpt import ATTENTION_SOLVERS, Solver, SolverField, register_solver
    from energy_gpt.docs_tables import energy_table, render_document, solver_table
    from energy_gpt.modeling.solvers_energy_gpt import HEAD, NewtonHeads

    register_solver(Solver("twin_newton", HEAD, NewtonHeads, "TwinMHA", "A copy of newton for this test.",
                           update_rule="o = mu + lambda |Sigma| mu", energies=("softmax", "linear"),
                           fields=ATTENTION_SOLVERS["newton"].fields))
    try:
        solvers = solver_table(with_fields=True)
        row = next(line for line in solvers.splitlines() if line.startswith("| `twin_newton` |"))
        assert row == ("| `twin_newton` | head | TwinMHA | `o = mu + lambda \\|Sigma\\| mu` | `newton_lambda=0` | "
                       "`newton_lambda=0.1`, `newton_step_bound=0.5` |")
        grid = energy_table().splitlines()
        columns = [cell.strip() for cell in grid[0].strip("|").split("|")]
        twin = columns.index("`twin_newton`")
        cells = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")[twin].strip() for line in grid[2:]}
        # Declared for softmax and linear only: the config accepts it there and refuses it on gated_linear.
        assert cells["`linear`"] == cells["`softmax` (default)"] == "yes"
        assert cells["`gated_linear`"] == "`ValueError`"
    finally:
        del ATTENTION_SOLVERS["twin_newton"]
    marked = ("<!-- generated: solvers (python -m energy_gpt.docs_tables --write) -->\nold\n"
              "<!-- end generated: solvers -->")
    assert render_document(f"before\n{marked}\nafter") == f"before\n{marked.replace('old', solver_table().rstrip())}\nafter"
    with pytest.raises(ValueError, match="unknown generated table 'nope'"):
        render_document(marked.replace("solvers", "nope"))
