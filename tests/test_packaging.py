"""The wheel installs only the `energy_gpt` namespace (modeling/ and conversion/ mapped inside it) and works."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("energy_gpt-*.whl")
    return path


def test_wheel_has_no_top_level_modeling_or_conversion(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"energy_gpt"}
    for expected in (
        "energy_gpt/modeling/modeling_energy_gpt.py",
        "energy_gpt/modeling/compat_energy_gpt.py",
        "energy_gpt/modeling/configuration_energy_gpt.py",
        "energy_gpt/modeling/solvers_energy_gpt.py",
        "energy_gpt/modeling/energies_energy_gpt.py",
        "energy_gpt/modeling/newton_kernels_energy_gpt.py",
        "energy_gpt/conversion/__init__.py",
        "energy_gpt/cli.py",
    ):
        assert expected in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "energy-gpt = energy_gpt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_install_imports_and_saves_remote_code(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = f"""
import os, importlib.util, energy_gpt
assert energy_gpt.__file__.startswith({str(target)!r}), energy_gpt.__file__
assert importlib.util.find_spec("modeling") is None and importlib.util.find_spec("conversion") is None
import energy_gpt.conversion
from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM
model = EnergyGPTForCausalLM(EnergyGPTConfig(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                                             bos_token_id=0, eos_token_id=0))
model.save_pretrained({str(tmp_path / "ckpt")!r})
print(sorted(f for f in os.listdir({str(tmp_path / "ckpt")!r}) if f.endswith(".py")))
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(
        ["compat_energy_gpt.py", "configuration_energy_gpt.py", "energies_energy_gpt.py", "modeling_energy_gpt.py",
         "newton_kernels_energy_gpt.py", "solvers_energy_gpt.py"]
    )
