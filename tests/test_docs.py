"""Documentation that cannot go stale: the solver / energy tables are what the registry renders, the "Adding a solver"
section of docs/solvers.md runs as written, and the project's files speak of the project only."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
                       "`newton_lambda=0.1`, `newton_step_bound=0.5`, `newton_path='torch'` |")
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


# ---------------------------------------------------------------------------------------------------------------------
# "Adding a solver" in docs/solvers.md, word for word
# ---------------------------------------------------------------------------------------------------------------------


def doc_section_code(path, heading: str) -> list[str]:
    """The ```python blocks of one `## heading` section, in order."""
    text = path.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


@pytest.fixture
def documented_solver():
    """Runs the section's code blocks in one fresh module namespace (the user's `my_solvers.py`, then their script);
    yields (the names it registered, the namespace); unregisters them afterwards."""
    from energy_gpt import ATTENTION_SOLVERS

    blocks = doc_section_code(REPO_ROOT / "docs" / "solvers.md", "Adding a solver")
    assert len(blocks) >= 2, "the section shows the rule and its declaration as code"
    before = set(ATTENTION_SOLVERS)
    namespace = {"__name__": "my_solvers"}
    try:
        for block in blocks:
            exec(compile(block, "docs/solvers.md", "exec"), namespace)
        yield sorted(set(ATTENTION_SOLVERS) - before), namespace
    finally:
        for name in set(ATTENTION_SOLVERS) - before:
            del ATTENTION_SOLVERS[name]


def test_adding_a_solver_runs_as_documented(documented_solver):
    from energy_gpt import ATTENTION_SOLVERS, EnergyGPTConfig, EnergyGPTForCausalLM
    from energy_gpt.equivalence import function_preserving_settings

    names, namespace = documented_solver
    assert len(names) == 1, f"the section registers one solver, got {names}"
    solver = ATTENTION_SOLVERS[names[0]]
    assert torch.isfinite(namespace["logits"]).all()  # the section's own model ran its forward
    assert namespace["config"].attention_solver == solver.name
    # Every declared field is a validated config field with its declared default.
    config = EnergyGPTConfig(n_layer=2, n_embd=32, n_head=2, attention_solver=solver.name)
    for field in solver.fields:
        assert getattr(config, field.name) == field.default
        with pytest.raises(ValueError, match=f"`{field.name}`"):
            EnergyGPTConfig(attention_solver=solver.name, **{field.name: "not a valid value"})
    # At the declared GPT-2 values the new solver computes what `gd` computes with the same weights.
    settings = function_preserving_settings(config)
    torch.manual_seed(0)
    gd = EnergyGPTForCausalLM(EnergyGPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).eval()
    new = EnergyGPTForCausalLM(EnergyGPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                               attention_solver=solver.name, **settings)).eval()
    missing, unexpected = new.load_state_dict(gd.state_dict(), strict=False)
    assert not unexpected and all(solver.name in key or "rule" in key for key in missing)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, gd(ids).logits, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The project's files speak of the project only
# ---------------------------------------------------------------------------------------------------------------------


# Tracker numbers and names of the process that built the project; the repository must read without them.
PROCESS_WORDS = re.compile(r"\bissue #?\d+|\bwave[ -]\d|ARCH_V2", re.IGNORECASE)


def test_no_tracker_numbers_or_process_words_in_tracked_files():
    assert PROCESS_WORDS.search("see Issue 14") and PROCESS_WORDS.search("wave-1's clip")  # the pattern bites
    assert not PROCESS_WORDS.search("the GPU targets; a waveform; issues 1")
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    offending = []
    for name in listed.stdout.splitlines():
        path = REPO_ROOT / name
        text_file = path.suffix in {".py", ".md", ".jinja", ".json", ".toml", ".yml", ".yaml", ".sh", ".txt", ".cfg", ""}
        if not path.is_file() or not text_file or path.resolve() == Path(__file__).resolve():  # this file names them
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if PROCESS_WORDS.search(line):
                offending.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offending, "\n".join(offending)
