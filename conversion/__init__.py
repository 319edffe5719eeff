"""GPT-2 <-> EnergyGPT conversion (installed as `energy_gpt.conversion`).

`gpt2_to_energy_gpt` / `energy_gpt_to_gpt2` return models; `convert_gpt2_checkpoint` /
`convert_energy_gpt_checkpoint_to_gpt2` write complete checkpoint directories (what `energy-gpt convert` runs).
"""

from . import gpt2
from .gpt2 import (
    CheckpointNotFoundError,
    ConversionError,
    convert_energy_gpt_checkpoint_to_gpt2,
    convert_gpt2_checkpoint,
    energy_gpt_to_gpt2,
    gpt2_to_energy_gpt,
)


__all__ = gpt2.__all__
