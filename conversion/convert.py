"""`energy-gpt convert`: GPT-2 checkpoints to EnergyGPT (any solver), and `gd` EnergyGPT back to GPT-2.

    energy-gpt convert --model_name_or_path gpt2 --attention_solver nag --output_dir out/
    energy-gpt convert --to_gpt2 --model_name_or_path out/ --output_dir gpt2_again/
"""

import argparse
import shlex
import sys

from ..solver_cli import add_solver_arguments, solver_field_names, solver_overrides
from .gpt2 import (
    DTYPES,
    TASKS,
    convert_energy_gpt_checkpoint_to_gpt2,
    convert_gpt2_checkpoint,
)


def forward_only_options() -> tuple[str, ...]:
    """Options that only make sense for GPT-2 -> EnergyGPT (default None, so an explicit use can be detected); read
    from the registry at call time, so solvers registered later have their flags."""
    return ("task", "num_labels", *solver_field_names())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energy-gpt convert",
        description="Convert a GPT-2 checkpoint into an EnergyGPT checkpoint with the attention solver of your choice "
        "(function preserving: beta = lambda = 0 unless overridden), or, with --to_gpt2, an EnergyGPT checkpoint whose "
        "solver reduces to GPT-2 back into a plain GPT-2 checkpoint.",
    )
    parser.add_argument("--model_name_or_path", required=True,
                        help="Hub id (gpt2, openai-community/gpt2-medium, a fine-tuned GPT-2, ...) or local directory.")
    parser.add_argument("--output_dir", required=True, help="Where the converted checkpoint is written.")
    parser.add_argument("--to_gpt2", action="store_true", help="Convert an EnergyGPT checkpoint back to GPT-2.")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model_name_or_path.")
    parser.add_argument("--dtype", default=None, choices=[*DTYPES, "auto"],
                        help="Weights dtype of the output (default float32; auto: the dtype the source was saved in).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output_dir.")

    forward = parser.add_argument_group("GPT-2 -> EnergyGPT")
    forward.add_argument("--task", default=None, choices=TASKS, help="Default: causal-lm.")
    forward.add_argument("--num_labels", type=int, default=None,
                         help="Labels of a new classification head (--task sequence-classification).")
    # Solver flags from the registry (default: gd; solver scalars at their function-preserving values, e.g. 0).
    add_solver_arguments(forward)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["energy-gpt", "convert", *argv])

    try:
        if args.to_gpt2:
            given = [f"--{name}" for name in forward_only_options() if getattr(args, name) is not None]
            if given:
                parser.error(f"{', '.join(given)} only apply to GPT-2 -> EnergyGPT; drop them with --to_gpt2.")
            output = convert_energy_gpt_checkpoint_to_gpt2(
                args.model_name_or_path, args.output_dir, revision=args.revision, dtype=args.dtype,
                overwrite=args.overwrite, command=command,
            )
            print(f"Wrote the GPT-2 checkpoint converted from {args.model_name_or_path} to {output}")
            return 0
        overrides = solver_overrides(args)
        attention_solver = overrides.pop("attention_solver", "gd")
        output = convert_gpt2_checkpoint(
            args.model_name_or_path, args.output_dir, attention_solver=attention_solver,
            task=args.task or "causal-lm", num_labels=args.num_labels, revision=args.revision, dtype=args.dtype,
            overwrite=args.overwrite, command=command, **overrides,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # ConversionError, config values, --output_dir
        print(f"energy-gpt convert: error: {error}", file=sys.stderr)
        return 1
    settings = {"attention_solver": attention_solver, **overrides}
    settings = ", ".join(f"{name}={value}" for name, value in settings.items())
    print(f"Wrote the EnergyGPT checkpoint ({settings}) converted from {args.model_name_or_path} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
