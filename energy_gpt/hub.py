"""`energy-gpt push`: check a checkpoint folder, render its model card if missing, upload it to the Hugging Face Hub.

    energy-gpt push --model_dir DIR --repo_id user/name [--private] [--revision BRANCH]
                    [--commit_message MSG] [--dry_run]

Only the files a reader needs to load the checkpoint are uploaded (`upload_files` lists them with the reason for
each): config, remote code, safetensors weights, tokenizer, model card and the result files the card cites. Training
leftovers (optimizer states, `training_args.bin` pickles, `checkpoint-*` folders) stay local. The token comes from
the usual places (`HF_TOKEN`, then `hf auth login`'s token file), through `huggingface_hub.get_token`.
"""

import argparse
import glob
import json
import sys
from importlib import resources
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from .model_card import RESULT_FILES, TRAINER_STATE_FILE, write_model_card
from .modeling.configuration_energy_gpt import ENERGY_GPT_AUTO_MAP


CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
# The model files exactly as `save_pretrained` copies them beside the weights: every file of the flat `modeling/` folder.
REMOTE_CODE_FILES = tuple(sorted(
    entry.name for entry in resources.files("energy_gpt.modeling").iterdir() if entry.name.endswith("_energy_gpt.py")
))
REQUIRED_AUTO_CLASSES = tuple(ENERGY_GPT_AUTO_MAP)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
OPTIONAL_MODEL_FILES = {"generation_config.json": "generation defaults used by `generate` and the pipeline"}
# Files `save_pretrained` of a (fast or slow) tokenizer may write; any present one is uploaded.
TOKENIZER_FILES = {
    "tokenizer_config.json": "tokenizer class and special tokens (AutoTokenizer reads it first)",
    "tokenizer.json": "fast tokenizer (vocabulary, merges, normalisation)",
    "vocab.json": "tokenizer vocabulary",
    "merges.txt": "BPE merges",
    "vocab.txt": "tokenizer vocabulary",
    "tokenizer.model": "sentencepiece tokenizer model",
    "spiece.model": "sentencepiece tokenizer model",
    "special_tokens_map.json": "special tokens",
    "added_tokens.json": "tokens added to the vocabulary",
    "chat_template.jinja": "chat template",
}
# At least one of these must be present for AutoTokenizer to rebuild the vocabulary.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
RESULT_FILE_REASON = "results measured by this run, cited by the model card"


class CheckpointFolderError(ValueError):
    """A checkpoint folder that cannot be published; `problems` lists every reason at once."""

    def __init__(self, model_dir: Path, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{model_dir} cannot be pushed:\n{listing}")


def _auto_map_problems(model_dir: Path) -> list[str]:
    try:
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return [f"{CONFIG_FILE} is not valid JSON ({error})"]
    if config.get("model_type") != "energy_gpt":
        return [f"{CONFIG_FILE} has model_type {config.get('model_type')!r}; expected 'energy_gpt'"]
    auto_map = config.get("auto_map") or {}
    problems = []
    missing_classes = [name for name in REQUIRED_AUTO_CLASSES if name not in auto_map]
    if missing_classes:
        problems.append(
            f"{CONFIG_FILE} `auto_map` lacks {missing_classes}: loading with trust_remote_code needs all of "
            f"{list(REQUIRED_AUTO_CLASSES)} (save with energy_gpt installed, which writes the full auto_map)"
        )
    for auto_class, reference in auto_map.items():
        module_file = reference.split("--")[-1].rsplit(".", 1)[0] + ".py"
        if module_file not in REMOTE_CODE_FILES:
            problems.append(f"{CONFIG_FILE} `auto_map[{auto_class!r}]` = {reference!r} points outside {REMOTE_CODE_FILES}")
    return problems


def _weight_files(model_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((file, reason) for the safetensors weights, problems)."""
    if (model_dir / SAFETENSORS_INDEX).is_file():
        index = json.loads((model_dir / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        files = [(SAFETENSORS_INDEX, "which weight lives in which shard")]
        files += [(shard, "model weights (shard)") for shard in shards]
        return files, [f"weight shards listed in {SAFETENSORS_INDEX} are missing: {missing}"] if missing else []
    if (model_dir / SAFETENSORS_FILE).is_file():
        return [(SAFETENSORS_FILE, "model weights")], []
    hint = " (found pickle weights: re-save with save_pretrained, which writes safetensors)" if any(
        model_dir.glob("*.bin")) else ""
    return [], [f"weights: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}"]


def upload_files(model_dir: str | Path, *, require_card: bool = True) -> list[tuple[str, str]]:
    """The files `push` uploads from `model_dir`, each with why a reader needs it, in upload order.

    Raises `CheckpointFolderError` listing everything that is missing or wrong. The recipes' `--push_to_hub`
    output is checked against this list.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointFolderError(model_dir, [f"--model_dir {model_dir} is not a directory"])
    files: list[tuple[str, str]] = []
    problems: list[str] = []

    if (model_dir / CONFIG_FILE).is_file():
        files.append((CONFIG_FILE, "model configuration; its auto_map points the Auto classes at the remote code"))
        problems += _auto_map_problems(model_dir)
    else:
        problems.append(f"{CONFIG_FILE} (the model configuration)")

    missing_code = [name for name in REMOTE_CODE_FILES if not (model_dir / name).is_file()]
    if missing_code:
        problems.append(f"remote-code files {missing_code} (save_pretrained copies them when energy_gpt is installed)")
    files += [(name, "model code loaded by trust_remote_code=True") for name in REMOTE_CODE_FILES
              if name not in missing_code]

    weight_files, weight_problems = _weight_files(model_dir)
    files += weight_files
    problems += weight_problems
    files += [(name, reason) for name, reason in OPTIONAL_MODEL_FILES.items() if (model_dir / name).is_file()]

    tokenizer_files = [(name, reason) for name, reason in TOKENIZER_FILES.items() if (model_dir / name).is_file()]
    present = {name for name, _ in tokenizer_files}
    if "tokenizer_config.json" not in present or not present.intersection(TOKENIZER_VOCAB_FILES):
        problems.append(
            "tokenizer: tokenizer_config.json and one of "
            f"{list(TOKENIZER_VOCAB_FILES)} (call tokenizer.save_pretrained(model_dir))"
        )
    files += tokenizer_files

    if (model_dir / CARD_FILE).is_file():
        files.append((CARD_FILE, "model card: Hub metadata, how to load it, how it was made, measured results"))
    elif require_card:
        problems.append(f"{CARD_FILE} (the model card; `energy-gpt push` renders it when missing)")
    files += [(name, RESULT_FILE_REASON) for name in (*RESULT_FILES, TRAINER_STATE_FILE) if (model_dir / name).is_file()]

    if problems:
        raise CheckpointFolderError(model_dir, problems)
    return files


def skipped_files(model_dir: str | Path, uploaded: list[tuple[str, str]]) -> list[str]:
    """Everything else in `model_dir` (relative paths): not needed to load the checkpoint, so not uploaded."""
    model_dir = Path(model_dir)
    names = {name for name, _ in uploaded}
    return sorted(
        path.relative_to(model_dir).as_posix() for path in model_dir.rglob("*")
        if path.is_file() and path.relative_to(model_dir).as_posix() not in names
    )


def _is_network_error(error: BaseException) -> bool:
    """Connection / timeout errors of whichever HTTP client this huggingface_hub version uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for cls in type(error).__mro__)


def _hub_error_message(error: BaseException, repo_id: str) -> str | None:
    """A plain explanation of an upload failure, or None when it is not a Hub / network error."""
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset HF_HUB_OFFLINE (or use --dry_run)."
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return (f"the Hub refused the token (HTTP {status}) for {repo_id}: it needs write access to that "
                    "namespace. Set HF_TOKEN or run `hf auth login` with a write token.")
        return f"the Hub answered with an error (HTTP {status}): {error}"
    if _is_network_error(error):
        return f"could not reach the Hugging Face Hub ({type(error).__name__}: {error}). Check the network or HF_ENDPOINT."
    return None


def push(
    model_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Create the repo (and branch) if needed and upload exactly `upload_files(model_dir)`. Returns the CommitInfo."""
    files = upload_files(model_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=model_dir,
        revision=revision,
        commit_message=commit_message or f"Upload EnergyGPT checkpoint ({len(files)} files)",
        # Exact file names (escaped: upload_folder reads these as fnmatch patterns).
        allow_patterns=[glob.escape(name) for name, _ in files],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energy-gpt push",
        description="Validate an EnergyGPT checkpoint folder, render its model card if missing, upload it to the Hub.",
    )
    parser.add_argument("--model_dir", required=True, type=Path, help="folder written by save_pretrained / a recipe")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. user/energy-gpt-nag")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--commit_message", default=None, help="commit message")
    parser.add_argument("--dry_run", action="store_true", help="list what would be uploaded and why; no network")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"energy-gpt push: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        return _fail(f"--repo_id {args.repo_id!r} is not a valid Hub repository id (namespace/name): {error}", 2)
    if args.revision is not None and not args.revision.strip():
        return _fail("--revision must be a non-empty branch name.", 2)
    model_dir: Path = args.model_dir

    card_missing = not (model_dir / CARD_FILE).is_file()
    try:
        files = upload_files(model_dir, require_card=False)  # a missing card is rendered below
    except CheckpointFolderError as error:
        return _fail(str(error), 2)

    if args.dry_run:
        if card_missing:
            files.append((CARD_FILE, "model card (missing: a real push renders it from config.json and the results)"))
        target = f"{args.repo_id}@{args.revision}" if args.revision else args.repo_id
        print(f"Dry run: would upload {len(files)} files from {model_dir} to {target} "
              f"({'private' if args.private else 'public'}); nothing was sent.")
        width = max(len(name) for name, _ in files)
        for name, reason in files:
            print(f"  {name:<{width}}  {reason}")
        skipped = skipped_files(model_dir, files)
        if skipped:
            print("Not uploaded (not needed to load the checkpoint): " + ", ".join(skipped))
        return 0

    token = get_token()
    if token is None:
        return _fail("no Hugging Face token found. Set HF_TOKEN or run `hf auth login` (a write token), "
                     "or use --dry_run to check the folder without uploading.", 1)
    if card_missing:
        write_model_card(model_dir, repo_id=args.repo_id)
        print(f"Rendered {model_dir / CARD_FILE} (the folder had no model card).")
    try:
        commit = push(model_dir, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, token=token)
    except Exception as error:  # the Hub's and the HTTP client's errors, told plainly
        message = _hub_error_message(error, args.repo_id)
        if message is None:
            raise
        return _fail(message, 1)
    print(f"Pushed {model_dir} to {commit.commit_url}")
    print(f"Load it pinned to this commit: from_pretrained({args.repo_id!r}, trust_remote_code=True, "
          f"revision={commit.oid!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
