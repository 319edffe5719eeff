"""The `energy-gpt` command line. Each sub-command lives in its own module, imported only when used."""

import importlib
import sys


# sub-command -> (module, one-line help). Each module exposes `main(argv: list[str] | None) -> int`.
COMMANDS = {
    "convert": ("energy_gpt.conversion.convert", "convert GPT-2 checkpoints to EnergyGPT (any solver) and back"),
    "pretrain": ("energy_gpt.recipes.pretrain", "causal-LM pretraining with Trainer (run_clm.py arguments)"),
    "glue": ("energy_gpt.recipes.glue", "GLUE / text-classification fine-tuning (run_glue.py arguments)"),
    "compare": ("energy_gpt.recipes.compare", "train one model per solver and compare loss curves, speed, memory"),
    "push": ("energy_gpt.hub", "validate a checkpoint folder, render its model card and upload it to the Hub"),
}


def _usage() -> str:
    lines = ["usage: energy-gpt <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `energy-gpt <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"energy-gpt: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
