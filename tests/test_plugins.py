"""A solver declared in the user's own module: the declaration classes are public (`from energy_gpt import Solver,
...`), and `energy-gpt <command> --plugin MODULE` loads the module before the command, so its solver trains, compares
and gets its flags from the shell like a built-in one."""

import json
import os
import subprocess
import sys

import pytest
from test_compare import SHORT_BUDGET
from test_toy_solver import TOY_SOURCE


def test_declaration_classes_and_registries_are_exported():
    import energy_gpt
    from energy_gpt.modeling import solvers_energy_gpt as solvers

    for name in ("Solver", "SolverField", "SolverParameter", "register_solver", "ATTENTION_SOLVERS",
                 "ATTENTION_ENERGIES", "LOCAL_ENERGIES"):
        assert name in energy_gpt.__all__
        assert getattr(energy_gpt, name) is getattr(solvers, name), name


# The toy solver of tests/test_toy_solver.py as a user's module: the same declaration, with its imports.
TOY_PLUGIN = "from torch import nn\n\nfrom energy_gpt.modeling.solvers_energy_gpt import *  # noqa: F403\n" + TOY_SOURCE


def run_cli(arguments: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "energy_gpt", *arguments], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600, stdin=subprocess.DEVNULL)


def test_plugin_solver_compares_from_the_shell(tmp_path):
    (tmp_path / "toy_plugin.py").write_text(TOY_PLUGIN)
    result = run_cli(["compare", "--plugin", "toy_plugin", "--output_dir", str(tmp_path / "cmp"),
                      "--solvers", "gd,toy:toy_gamma_init=0.5", "--seeds", "1", *SHORT_BUDGET], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| toy:toy_gamma_init=0.5 |" in table and "toy_gamma" in table
    run = json.loads(next((tmp_path / "cmp" / "runs").glob("toy*/seed-1/run.json")).read_text())
    assert len(run["solver_report"]["parameters"]["toy_gamma"]) == 2

    # Installed as an entry point of `energy_gpt.plugins` (a distribution's metadata on the path), without --plugin:
    # the flags generated from the registry (the recipes' run_clm.py-style arguments) include the plugin's field.
    dist_info = tmp_path / "toy_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[energy_gpt.plugins]\ntoy = toy_plugin\n")
    help_text = run_cli(["pretrain", "--help"], tmp_path)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    assert "--toy_gamma_init" in help_text.stdout


def test_plugin_arguments_are_taken_out_before_the_command():
    from energy_gpt.cli import PluginError, split_plugin_arguments

    assert split_plugin_arguments(["--plugin", "a", "--solvers", "gd", "--plugin=b.c", "--seeds", "1"]) == (
        ["a", "b.c"], ["--solvers", "gd", "--seeds", "1"])
    for bad in (["--plugin"], ["--plugin", "--solvers"]):
        with pytest.raises(PluginError, match="^--plugin needs a module name, e.g. --plugin my_solvers$"):
            split_plugin_arguments(bad)


def test_missing_plugin_is_one_clear_line(tmp_path):
    result = run_cli(["compare", "--plugin", "no_such_plugin", "--solvers", "gd"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "energy-gpt compare: cannot import plugin 'no_such_plugin': no module named 'no_such_plugin' "
        "(is its folder on PYTHONPATH?)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    (tmp_path / "broken_plugin.py").write_text("import not_installed_dependency\n")
    result = run_cli(["convert", "--plugin", "broken_plugin"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("energy-gpt convert: plugin 'broken_plugin' failed to import: "
                                     "ModuleNotFoundError: No module named 'not_installed_dependency'")
