"""Model cards for EnergyGPT checkpoints, rendered from a run's own outputs (placeholder: issue 5 fleshes it out)."""

from pathlib import Path

from .io_utils import atomic_write_text


def write_model_card(
    model_dir: str | Path,
    *,
    base_model: str | None = None,
    command: str | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Render `README.md` in `model_dir` from its config.json (and all_results.json / trainer_state.json if present).

    `base_model`: the Hub id or path it was converted from; `command`: the exact command that produced it.
    """
    model_dir = Path(model_dir)
    text = f"# EnergyGPT checkpoint\n\nbase_model: {base_model}\n\ncommand: `{command}`\n"
    return atomic_write_text(model_dir / "README.md", text)
