"""The first hour with the project, as a new user meets it: results readable by colleagues (umask), progress visible
by default, `--help` pages that say which command they belong to, `make` that installs only when needed, checkpoints
with a pad token (batched pipelines and a `run_glue.py`-style script work out of the box), and a tokenizer that loads
without the custom-code prompt. Offline; the real GPT-2 tokenizer variants skip without ../shared/data."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import (REPO_ROOT, assert_autotokenizer_loads_without_a_prompt, run_without_energy_gpt,
                      tiny_gpt2_config)


# ---------------------------------------------------------------------------------------------------------------------
# Files readable by others: the atomic writer respects the umask
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                              (0o002, 0o664, 0o775)])
def test_atomic_writer_gives_the_modes_of_a_plain_write(umask, file_mode, dir_mode, tmp_path):
    from energy_gpt.io_utils import atomic_directory, atomic_write_json, atomic_write_text

    previous = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "results" / "table.md", "| a |\n")
        json_file = atomic_write_json(tmp_path / "results" / "all_results.json", {"loss": 1.0})
        with atomic_directory(tmp_path / "outdir") as staging:
            atomic_write_text(staging / "comparison.md", "x")
            (staging / "plain.txt").write_text("y")
        plain = tmp_path / "plain.txt"
        plain.write_text("reference")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(plain.stat().st_mode) == file_mode  # what the user's other files get
    for path in (written, json_file, tmp_path / "outdir" / "comparison.md", tmp_path / "outdir" / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((tmp_path / "outdir").stat().st_mode) == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "plain.txt", "results"]  # no temporary left


# ---------------------------------------------------------------------------------------------------------------------
# Progress at INFO, visible by default; --help pages
# ---------------------------------------------------------------------------------------------------------------------


LOGGING_PROBE = """
import logging
from energy_gpt import cli
cli.configure_logging()
logging.getLogger("energy_gpt.recipes.compare").info("progress line")
logging.getLogger("energy_gpt.recipes.compare").warning("a real warning")
logging.getLogger("some_other_library").info("library chatter")
"""


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_cli_shows_progress_at_info_on_the_main_process_only(rank, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RANK"}
    if rank is not None:
        env["RANK"] = rank
    result = subprocess.run([sys.executable, "-c", LOGGING_PROBE], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING - energy_gpt.recipes.compare - a real warning" in result.stderr
    assert ("INFO - energy_gpt.recipes.compare - progress line" in result.stderr) == (rank != "1")
    assert "library chatter" not in result.stderr


def help_text(command: str, capsys) -> str:
    from energy_gpt import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["pretrain", "glue", "compare", "convert", "push"])
def test_help_usage_line_names_the_command(command, capsys):
    assert help_text(command, capsys).startswith(f"usage: energy-gpt {command} ")


@pytest.mark.parametrize("command", ["pretrain", "glue", "compare", "convert", "push"])
def test_help_starts_with_a_summary(command, capsys):
    text = help_text(command, capsys)
    paragraphs = [block for block in text.split("\n\n") if block.strip()]
    assert not paragraphs[1].lstrip().startswith(("options:", "-")), "no summary after the usage line"
    if command in ("pretrain", "glue", "compare"):  # the summary comes before the long option list
        assert text.index(f"`energy-gpt {command}`") < text.index("--output_dir")


def test_sys_argv_is_restored_after_a_command(capsys):
    from energy_gpt import cli

    before = list(sys.argv)
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    assert sys.argv == before


# ---------------------------------------------------------------------------------------------------------------------
# make: install only when needed
# ---------------------------------------------------------------------------------------------------------------------


def dry_run(folder: Path, target: str) -> str:
    result = subprocess.run(["make", "-n", target, f"PYTHON={sys.executable}"], cwd=folder, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_installs_on_a_fresh_clone_then_only_when_pyproject_changes(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    for target in ("test", "demo"):  # a fresh clone (no stamp): everything, as .ci/run expects
        assert "pip install -e" in dry_run(tmp_path, target) and "pip install torch==" in dry_run(tmp_path, target)
    stamps = list((tmp_path / "build").glob(".installed-*")) if (tmp_path / "build").exists() else []
    assert not stamps  # -n wrote nothing
    # What `make install` leaves behind (the stamp of this interpreter), then nothing to install.
    subprocess.run(["make", "-n", "install", f"PYTHON={sys.executable}"], cwd=tmp_path, check=True, capture_output=True)
    env_id = subprocess.run(
        [sys.executable, "-c", "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])"],
        capture_output=True, text=True, check=True).stdout.strip()
    stamp = tmp_path / "build" / f".installed-{env_id}"
    stamp.parent.mkdir()
    stamp.touch()
    os.utime(tmp_path / "pyproject.toml", (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "Makefile", (1_000_000_000, 1_000_000_000))
    assert "pip install" not in dry_run(tmp_path, "test")
    assert "pytest" in dry_run(tmp_path, "test")
    os.utime(tmp_path / "pyproject.toml")  # dependencies edited: newer than the stamp
    assert "pip install -e" in dry_run(tmp_path, "test")
    assert "build/" in (REPO_ROOT / ".gitignore").read_text().split()  # the stamp is never committed


# ---------------------------------------------------------------------------------------------------------------------
# Pad token: converted checkpoints pad with eos; batched pipelines and a run_glue.py-style script work as they are
# ---------------------------------------------------------------------------------------------------------------------


WORDS = ("the a one two three red blue green cat dog bird runs sleeps sings fast slow good bad film story plot "
         "actor great awful fine not very quite it is was and but so").split()


def build_word_tokenizer(folder: Path) -> Path:
    """A tiny GPT-2-style tokenizer built here (no data needed): eos = bos = unk = `<|endoftext|>` (id 0), no pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{word: index for index, word in enumerate(WORDS, start=1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=64)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(params=["local", "gpt2"])
def gpt2_source(request, tmp_path) -> tuple[Path, str]:
    """A tiny GPT-2 checkpoint folder with a tokenizer that has no pad token: built here, or the real GPT-2 one."""
    source = tmp_path / f"gpt2-{request.param}"
    if request.param == "local":
        build_word_tokenizer(source)
        config = tiny_gpt2_config()
    else:
        tokenizer_dir = request.getfixturevalue("gpt2_tokenizer_dir")  # skips without ../shared/data
        shutil.copytree(tokenizer_dir, source)
        config = tiny_gpt2_config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(config).save_pretrained(source)
    return source, request.param


def sentences(kind: str) -> list[str]:
    if kind == "local":
        return ["the cat runs", "a very good film and a great story", "dog"]
    return ["Hello", "The quick brown fox jumps over the lazy dog", "An energy based view of attention"]


def test_converted_checkpoint_pads_with_eos_and_batched_pipelines_work(gpt2_source, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from energy_gpt import cli

    source, kind = gpt2_source
    for task, folder in (("causal-lm", tmp_path / "lm"), ("sequence-classification", tmp_path / "cls")):
        assert cli.main(["convert", "--model_name_or_path", str(source), "--output_dir", str(folder),
                         "--attention_solver", "nag", "--momentum_beta", "0.3", "--task", task]) == 0
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert tokenizer_config["pad_token"] == tokenizer_config["eos_token"] == "<|endoftext|>"
        assert "auto_map" not in tokenizer_config  # the tokenizer is GPT-2's: no custom code
        config = json.loads((folder / "config.json").read_text())
        assert config["pad_token_id"] == config["eos_token_id"] is not None
        assert "pad with the end-of-text token" in (folder / "README.md").read_text()
    assert AutoTokenizer.from_pretrained(source).pad_token is None  # the source had none: the conversion added it

    texts = sentences(kind)
    # text-generation, batched with left padding, gives what one prompt at a time gives (greedy).
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm", padding_side="left")
    generator = pipeline("text-generation", model=str(tmp_path / "lm"), tokenizer=tokenizer)
    one_by_one = [generator(text, max_new_tokens=5, do_sample=False)[0]["generated_text"] for text in texts]
    batched = [out[0]["generated_text"] for out in generator(texts, max_new_tokens=5, do_sample=False, batch_size=3)]
    assert batched == one_by_one
    # text-classification, batched (right padding; the classifier pools the last non-pad token).
    classifier = pipeline("text-classification", model=str(tmp_path / "cls"), top_k=None)
    single = [classifier([text])[0] for text in texts]  # one text per call: no padding
    together = classifier(texts, batch_size=3)
    for alone, in_batch in zip(single, together):
        scores = {entry["label"]: entry["score"] for entry in alone}
        for entry in in_batch:
            assert entry["score"] == pytest.approx(scores[entry["label"]], abs=1e-5)


RUN_GLUE_STYLE = """
# What transformers' examples/pytorch/text-classification/run_glue.py does with --model_name_or_path,
# --trust_remote_code, --train_file/--validation_file (csv), --pad_to_max_length (its default) and --max_seq_length.
import sys
import numpy as np
from datasets import load_dataset
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments,
                          default_data_collator)

model_name_or_path, train_file, validation_file, output_dir = sys.argv[1:5]
raw_datasets = load_dataset("csv", data_files={"train": train_file, "validation": validation_file})
label_list = sorted(raw_datasets["train"].unique("label"))
config = AutoConfig.from_pretrained(model_name_or_path, num_labels=len(label_list), finetuning_task="sst2",
                                    trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, config=config, trust_remote_code=True)
model.config.label2id = {v: i for i, v in enumerate(label_list)}
model.config.id2label = {i: v for i, v in enumerate(label_list)}

def preprocess_function(examples):
    return tokenizer(examples["sentence"], padding="max_length", max_length=16, truncation=True)

raw_datasets = raw_datasets.map(preprocess_function, batched=True)

def compute_metrics(p):
    return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4,
                         per_device_eval_batch_size=4, learning_rate=1e-3, report_to="none", use_cpu=True,
                         save_strategy="no", disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=raw_datasets["train"], eval_dataset=raw_datasets["validation"],
                  compute_metrics=compute_metrics, processing_class=tokenizer, data_collator=default_data_collator)
train_result = trainer.train()
metrics = trainer.evaluate()
print("MODEL", type(model).__name__, type(model).__module__)
print("EVAL", metrics["eval_accuracy"], metrics["eval_loss"])
"""


def test_run_glue_style_script_fine_tunes_a_converted_checkpoint_with_remote_code(tmp_path):
    """No energy_gpt in the process: everything comes from the checkpoint's remote code, as for a Hub user."""
    from energy_gpt.conversion import convert_gpt2_checkpoint

    source = build_word_tokenizer(tmp_path / "gpt2")
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(source)
    checkpoint = convert_gpt2_checkpoint(source, tmp_path / "energy", attention_solver="newton_light")
    rows = [("a very good film", 1), ("an awful story", 0), ("great actor", 1), ("bad plot", 0)] * 4
    for name, chunk in (("train.csv", rows), ("validation.csv", rows[:6])):
        lines = ["sentence,label", *(f"{text},{label}" for text, label in chunk)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    script = tmp_path / "run_glue_style.py"
    script.write_text(RUN_GLUE_STYLE)
    argv = [str(script), str(checkpoint), str(tmp_path / "train.csv"), str(tmp_path / "validation.csv"),
            str(tmp_path / "out")]
    code = f"import sys, runpy; sys.argv = {argv!r}; runpy.run_path({str(script)!r}, run_name='__main__')"
    result = run_without_energy_gpt(code, cwd=tmp_path, env_extra={"HF_DATASETS_OFFLINE": "1",
                                                                   "HF_HOME": str(tmp_path / "hf_home")})
    assert "MODEL EnergyGPTForSequenceClassification transformers_modules" in result.stdout
    accuracy, loss = (float(value) for value in result.stdout.split("EVAL ")[1].split())
    assert 0.0 <= accuracy <= 1.0 and loss == loss  # ran to the end, finite


# ---------------------------------------------------------------------------------------------------------------------
# AutoTokenizer: no custom-code prompt
# ---------------------------------------------------------------------------------------------------------------------


def test_autotokenizer_loads_a_converted_checkpoint_without_a_prompt(gpt2_source, tmp_path):
    """GPT-2's tokenizer saved beside the model has no `auto_map` of its own; in a fresh process it loads with no
    custom-code prompt (see `assert_autotokenizer_loads_without_a_prompt` for the two ways)."""
    from energy_gpt.conversion import convert_gpt2_checkpoint

    source, kind = gpt2_source
    folders = [convert_gpt2_checkpoint(source, tmp_path / solver, attention_solver=solver)
               for solver in ("momentum", "newton_light")]
    for folder in folders:
        assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert_autotokenizer_loads_without_a_prompt(*folders)


def test_hub_docs_and_card_load_the_tokenizer_without_the_prompt():
    hub_doc = (REPO_ROOT / "docs" / "hub.md").read_text()
    card = (REPO_ROOT / "model_cards" / "energy_gpt_card.md.jinja").read_text()
    for text in (hub_doc, card):
        assert "AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=False)" in text
