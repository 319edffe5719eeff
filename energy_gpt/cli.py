"""The `energy-gpt` command line. Each sub-command lives in its own module, imported only when used."""

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"


# sub-command -> (module, one-line help). Each module exposes `main(argv: list[str] | None) -> int`.
COMMANDS = {
    "convert": ("energy_gpt.conversion.convert", "convert GPT-2 checkpoints to EnergyGPT (any solver) and back"),
    "pretrain": ("energy_gpt.recipes.pretrain", "causal-LM pretraining with Trainer (run_clm.py arguments)"),
    "glue": ("energy_gpt.recipes.glue", "GLUE / text-classification fine-tuning (run_glue.py arguments)"),
    "compare": ("energy_gpt.recipes.compare", "train one model per solver and compare loss curves, speed, memory"),
    "push": ("energy_gpt.hub", "validate a checkpoint folder, render its model card and upload it to the Hub"),
}


# Modules that register solvers (or energies) with the registry, loaded before every command: the entry points of
# this group (`[project.entry-points."energy_gpt.plugins"]` in a package's pyproject.toml), then each `--plugin`.
PLUGIN_ENTRY_POINT_GROUP = "energy_gpt.plugins"


def _usage() -> str:
    lines = ["usage: energy-gpt <command> [--plugin MODULE ...] [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += [
        "",
        "Run `energy-gpt <command> --help` for the options of a command (with the same --plugin options, to see the",
        "flags of a plugin's solvers). `--plugin MODULE` (repeatable, any command) imports MODULE first, so the",
        f"solvers it registers work like built-in ones; so do the entry points of the {PLUGIN_ENTRY_POINT_GROUP!r} group.",
    ]
    return "\n".join(lines)


class PluginError(Exception):
    """A plugin module that cannot be loaded; the message is one line for the user."""


def split_plugin_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--plugin` modules, the other arguments): `--plugin a --plugin=b rest` -> (["a", "b"], ["rest"])."""
    plugins, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--plugin":
            module = next(arguments, None)
            if module is None or module.startswith("-"):
                raise PluginError("--plugin needs a module name, e.g. --plugin my_solvers")
            plugins.append(module)
        elif argument.startswith("--plugin="):
            plugins.append(argument.split("=", 1)[1])
        else:
            rest.append(argument)
    return plugins, rest


def load_plugins(modules: list[str]) -> None:
    """Import every entry point of `energy_gpt.plugins`, then each named module (which registers its solvers)."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:
            raise PluginError(
                f"cannot load plugin entry point {entry_point.name!r} ({entry_point.value}): "
                f"{type(error).__name__}: {error}"
            ) from error
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not (module == error.name or module.startswith(error.name + ".")):
                # The plugin exists but something it imports does not.
                raise PluginError(f"plugin {module!r} failed to import: {type(error).__name__}: {error}") from error
            raise PluginError(
                f"cannot import plugin {module!r}: no module named {error.name!r} (is its folder on PYTHONPATH?)"
            ) from error
        except Exception as error:  # one line for the user; `python -c "import <module>"` shows the traceback
            raise PluginError(f"plugin {module!r} failed to import: {type(error).__name__}: {error}") from error


def is_main_process() -> bool:
    """Rank 0 (or no launcher): replicas started by torchrun / accelerate launch set RANK."""
    return os.environ.get("RANK", "0") == "0"


def configure_logging() -> None:
    """Progress lines of `energy_gpt` at INFO, visible by default; other libraries keep their own levels.

    The main process shows energy_gpt's INFO lines; replicas only warnings, and transformers' verbosity follows
    Trainer's default (`--log_level passive`: unchanged on the main process, warning on replicas). A program that
    already configured logging (a root handler) keeps its handlers; `--log_level` still applies in the recipes.
    """
    package_logger = logging.getLogger("energy_gpt")
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    if not is_main_process():
        import transformers

        transformers.utils.logging.set_verbosity_warning()
    if not logging.getLogger().handlers:
        # Root stays at WARNING: only energy_gpt's own INFO lines get through, not every library's.
        logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, stream=sys.stderr)


@contextlib.contextmanager
def command_prog(command: str) -> Iterator[None]:
    """While a sub-command runs, `sys.argv[0]` is `energy-gpt <command>`: every argparse / HfArgumentParser built
    without an explicit `prog` then prints `usage: energy-gpt <command> ...` (argparse's default prog is the
    basename of sys.argv[0])."""
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = f"energy-gpt {command}"
    else:
        sys.argv.append(f"energy-gpt {command}")
    try:
        yield
    finally:
        if saved is None:
            sys.argv.clear()
        else:
            sys.argv[0] = saved


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
    try:
        plugins, rest = split_plugin_arguments(rest)
        load_plugins(plugins)  # before the command's module: its flags are generated from the registry on import
    except PluginError as error:
        print(f"energy-gpt {command}: {error}", file=sys.stderr)
        return 2
    configure_logging()
    module = importlib.import_module(COMMANDS[command][0])
    with command_prog(command):
        return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
