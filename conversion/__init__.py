"""GPT-2 <-> EnergyGPT conversion (installed as `energy_gpt.conversion`)."""
