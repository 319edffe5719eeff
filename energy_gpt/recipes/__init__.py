"""Trainer recipes: `pretrain` (run_clm.py style), `glue` (run_glue.py style) and `compare` (one run per solver).

Each recipe module exposes `main(argv: list[str] | None) -> int` for the `energy-gpt` command line; the shared
argument dataclasses live in `energy_gpt.recipes.arguments` and the shared helpers in `energy_gpt.recipes.common`.
"""
