"""Differences between transformers releases live in `modeling/compat_energy_gpt.py` only, and its helpers agree with
the installed release (run this file under each tested release)."""

import re

import pytest
import torch
from conftest import REPO_ROOT
from transformers.cache_utils import DynamicLayer

from energy_gpt.modeling.compat_energy_gpt import tokens_kept_by_crop

MODELING = REPO_ROOT / "modeling"
# Ways a shipped file could test which release it runs on; only the compat module may.
VERSION_PROBES = re.compile(r"inspect\.signature|__dataclass_fields__|__version__|hasattr\((ALL_|transformers)")
# `except ImportError` is for optional packages only (Triton in the kernels file), never for transformers names.
IMPORT_FALLBACK = re.compile(r"except ImportError")


def shipped_files():
    return sorted(path for path in MODELING.glob("*_energy_gpt.py") if path.name != "compat_energy_gpt.py")


@pytest.mark.parametrize("path", shipped_files(), ids=lambda path: path.name)
def test_release_checks_only_in_the_compat_module(path):
    source = path.read_text()
    assert not VERSION_PROBES.findall(source), path.name
    if path.name != "newton_kernels_energy_gpt.py":
        assert not IMPORT_FALLBACK.findall(source), path.name


@pytest.mark.parametrize("path", sorted(MODELING.glob("*.py")), ids=lambda path: path.name)
def test_no_private_torch_function(path):
    assert not re.findall(r"torch\._[a-z]", path.read_text()), path.name


def cropped_length(argument: int, length: int) -> int | None:
    """The length the installed release's `DynamicLayer.crop(argument)` leaves, None where it refuses the argument."""
    layer = DynamicLayer()
    layer.update(torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2))
    try:
        layer.crop(argument)
    except ValueError:
        return None
    return layer.get_seq_length()


@pytest.mark.parametrize("argument", [-3, -1, 1, 4, 6, 9])
def test_crop_argument_read_as_the_installed_release_reads_it(argument):
    length = 6
    expected = cropped_length(argument, length)
    if expected is None:  # a positive target length, refused from transformers 5.20
        assert argument > 0
        return
    assert tokens_kept_by_crop(argument, length) == expected
