"""Benchmarks: every EnergyGPT solver against Hugging Face `GPT2LMHeadModel` (run `python -m benchmarks.run`)."""
