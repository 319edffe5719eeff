"""The `pretrain` and `glue` recipes end to end on tiny models and small slices of real data (offline), their
metrics against known values, LoRA save / reload / merge, push_to_hub through a fake Hub, per-document blocks, and
kill / resume. Two-process training is in test_distributed.py."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_autotokenizer_loads_without_a_prompt, shared_data_path

TINY_OVERRIDES = "n_layer=2,n_embd=32,n_head=4,n_positions=64,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
TINY_VOCAB = 320  # the tiny BPE tokenizer's vocabulary
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning", "--seed", "0"]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: data slices and a tiny byte-level BPE tokenizer (GPT-2 style: eos, no pad token) for fast LM runs.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_files(tmp_path_factory) -> tuple[Path, Path]:
    text = shared_data_path("tinyshakespeare", "input.txt").read_text()
    folder = tmp_path_factory.mktemp("shakespeare")
    (folder / "train.txt").write_text(text[:40_000])
    (folder / "valid.txt").write_text(text[-6_000:])
    return folder / "train.txt", folder / "valid.txt"


def train_bpe_tokenizer(text: str, folder: Path) -> Path:
    """A byte-level BPE tokenizer of TINY_VOCAB tokens trained on `text`, saved GPT-2 style (eos, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", model_max_length=64
    )
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory, shakespeare_files) -> Path:
    return train_bpe_tokenizer(shakespeare_files[0].read_text(), tmp_path_factory.mktemp("tiny-tokenizer"))


def write_local_corpus(folder: Path) -> tuple[Path, Path]:
    """Generated text (no data needed): documents of pseudo-words, one paragraph each, separated by blank lines."""
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ga", "vu", "sho", "el", "an", "or"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]

    def documents(count: int) -> str:
        docs = []
        for _ in range(count):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(rng.randint(1, 6))]
            docs.append("\n".join(lines))
        return "\n\n".join(docs) + "\n"

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(documents(400))
    (folder / "valid.txt").write_text(documents(40))
    return folder / "train.txt", folder / "valid.txt"


@pytest.fixture(scope="module")
def local_text_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_local_corpus(tmp_path_factory.mktemp("local-corpus"))


@pytest.fixture(scope="module")
def local_tokenizer_dir(tmp_path_factory, local_text_files) -> Path:
    return train_bpe_tokenizer(local_text_files[0].read_text(), tmp_path_factory.mktemp("local-tokenizer"))


def glue_split(tmp_path: Path, task: str, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """First `n_train` rows as train, the next `n_eval` as validation, in the file's own format."""
    source = shared_data_path("glue", task, "train.tsv")
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if task == "sst2":  # unquoted TSV: lines are rows
        header, rows = lines[0], lines[1:]
        train, valid = tmp_path / f"{task}_train.tsv", tmp_path / f"{task}_valid.tsv"
        train.write_text(header + "".join(rows[:n_train]), encoding="utf-8")
        valid.write_text(header + "".join(rows[n_train : n_train + n_eval]), encoding="utf-8")
        return train, valid
    with source.open(newline="", encoding="utf-8") as handle:  # quoted TSV: rows may span lines
        rows = list(csv.reader(handle, delimiter="\t"))
    paths = []
    for name, chunk in (("train", rows[1 : 1 + n_train]), ("valid", rows[1 + n_train : 1 + n_train + n_eval])):
        path = tmp_path / f"{task}_{name}.tsv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerows([rows[0], *chunk])
        paths.append(path)
    return paths[0], paths[1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def pretrain_args(tokenizer_dir, train, valid, output_dir, *extra) -> list[str]:
    files = ["--train_file", str(train)] + (["--validation_file", str(valid)] if valid is not None else [])
    return [
        *files, "--tokenizer_name", str(tokenizer_dir), "--config_overrides", f"{TINY_OVERRIDES},vocab_size={TINY_VOCAB}",
        "--block_size", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3", "--output_dir", str(output_dir),
        "--cache_dir", str(Path(output_dir).parent / "hf-datasets-cache"), *QUIET, *extra,
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: known predictions for every task type.
# ---------------------------------------------------------------------------------------------------------------------


def test_glue_metrics_known_values():
    from energy_gpt.recipes.metrics import GLUE_TASK_METRICS, glue_metrics

    refs = [1, 1, 0, 0, 1, 0]
    preds = [1, 0, 0, 1, 1, 0]  # TP=2, TN=2, FP=1, FN=1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / 9
    assert glue_metrics("cola", preds, refs) == pytest.approx({"matthews_correlation": 3 / 9})
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert glue_metrics(task, preds, refs) == pytest.approx({"accuracy": 4 / 6})
    for task in ("mrpc", "qqp"):  # F1 = 2TP / (2TP + FP + FN) = 4 / 6
        assert glue_metrics(task, preds, refs) == pytest.approx({"accuracy": 4 / 6, "f1": 4 / 6})
    # mnli, three classes: accuracy only.
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx({"accuracy": 0.75})
    # stsb: perfect linear relation -> pearson 1; monotone but not linear -> spearman 1, pearson < 1.
    scores = glue_metrics("stsb", [0.0, 1.0, 8.0, 27.0], [0.0, 1.0, 2.0, 3.0])
    assert scores["spearmanr"] == pytest.approx(1.0) and 0.9 < scores["pearson"] < 0.999
    assert glue_metrics("stsb", [1.0, 3.0, 5.0], [0.0, 1.0, 2.0]) == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})
    # Degenerate cases: constant predictions give MCC 0 (sklearn's convention), no positives give F1 0.
    assert glue_metrics("cola", [1, 1, 1], [0, 1, 0])["matthews_correlation"] == 0.0
    assert glue_metrics("mrpc", [0, 0], [0, 0])["f1"] == 0.0
    assert set(GLUE_TASK_METRICS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    with pytest.raises(ValueError, match="Unknown GLUE task 'mnli-mm'"):
        glue_metrics("mnli-mm", preds, refs)


def test_metrics_agree_with_sklearn_on_random_labels():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from energy_gpt.recipes.metrics import binary_f1, matthews_correlation

    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        refs, preds = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
        preds[:120] = refs[:120]
        assert matthews_correlation(preds, refs) == pytest.approx(sklearn_metrics.matthews_corrcoef(refs, preds))
    refs, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert binary_f1(preds, refs) == pytest.approx(sklearn_metrics.f1_score(refs, preds))


# ---------------------------------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------------------------------


def test_pretrain_lowers_validation_loss_and_writes_results(tmp_path, tiny_tokenizer_dir, shakespeare_files):
    from energy_gpt.cli import main as energy_gpt_main

    output_dir = tmp_path / "run"
    argv = pretrain_args(
        tiny_tokenizer_dir, *shakespeare_files, output_dir, "--do_train", "--do_eval", "--max_steps", "30",
        "--eval_strategy", "steps", "--eval_steps", "30", "--eval_on_start", "true", "--save_strategy", "no",
        "--attention_solver", "momentum", "--momentum_beta", "0.3",
    )
    assert energy_gpt_main(["pretrain", *argv]) == 0  # through the `energy-gpt` command line

    history = read_json(output_dir / "trainer_state.json")["log_history"]
    eval_losses = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    assert eval_losses[0][0] == 0 and eval_losses[-1][0] == 30
    assert eval_losses[-1][1] < eval_losses[0][1] - 0.5, eval_losses  # from ~ln(320) = 5.8 down

    eval_results = read_json(output_dir / "eval_results.json")
    assert eval_results["perplexity"] == pytest.approx(math.exp(eval_results["eval_loss"]))
    assert {"eval_loss", "eval_accuracy", "eval_samples", "perplexity"} <= set(eval_results)
    all_results = read_json(output_dir / "all_results.json")
    assert {"train_loss", "train_samples", "eval_loss", "perplexity"} <= set(all_results)
    assert "train_runtime" in read_json(output_dir / "train_results.json")

    # The saved folder is a complete EnergyGPT checkpoint: solver flags applied, remote code, auto_map, tokenizer, card.
    config = read_json(output_dir / "config.json")
    assert config["attention_solver"] == "momentum" and config["momentum_beta"] == 0.3 and config["n_layer"] == 2
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_energy_gpt.EnergyGPTForCausalLM"
    for name in ("modeling_energy_gpt.py", "configuration_energy_gpt.py", "tokenizer.json", "README.md"):
        assert (output_dir / name).is_file(), name
    assert "energy-gpt pretrain" in (output_dir / "README.md").read_text()


def test_pretrain_resume_continues_from_the_checkpoint_step(tmp_path, local_tokenizer_dir, local_text_files):
    from energy_gpt.recipes import pretrain

    common = ["--do_train", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1"]
    full, _ = pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, tmp_path / "full", *common))
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert read_json(checkpoint / "trainer_state.json")["global_step"] == 3

    resumed, _ = pretrain.run(pretrain_args(
        local_tokenizer_dir, *local_text_files, tmp_path / "resumed", *common,
        "--resume_from_checkpoint", str(checkpoint),
    ))
    state = read_json(tmp_path / "resumed" / "trainer_state.json")
    assert state["global_step"] == 6
    train_logs = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert train_logs == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's history, 4-6 are new
    # Same data order, optimizer and scheduler state: the resumed run ends on the uninterrupted run's weights.
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for name, tensor in full_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_per_document_blocks_never_cross_a_document(tmp_path, local_tokenizer_dir):
    """--pack_across_documents false: each block holds one document's tokens, in order, padded at its end (masked,
    label -100); the default (run_clm.py) packs across documents."""
    from datasets import Dataset, DatasetDict
    from transformers import TrainingArguments

    from energy_gpt.recipes import pretrain
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.common import build_tokenizer

    tokenizer = build_tokenizer(ModelArguments(tokenizer_name=str(local_tokenizer_dir)))
    assert tokenizer.pad_token == tokenizer.eos_token  # GPT-2 style tokenizer: the recipe pads with eos
    texts = ["kalo mine su" * n for n in (1, 7, 3, 12, 2)]
    raw = DatasetDict(train=Dataset.from_dict({"text": texts}))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    block = 8
    documents = [tokenizer(text)["input_ids"] for text in texts]

    train_file = tmp_path / "x.txt"  # the arguments check that it exists; the dataset itself is `raw`
    train_file.write_text("\n".join(texts))
    per_document = pretrain.build_lm_datasets(
        raw, pretrain.DataTrainingArguments(train_file=str(train_file), pack_across_documents=False), tokenizer, block,
        args
    )["train"]
    assert set(per_document.column_names) == {"input_ids", "attention_mask", "labels"}
    assert len(per_document) == sum(-(-len(ids) // block) for ids in documents)  # every token kept, tails padded
    rows = iter(per_document)
    for ids in documents:  # each document's blocks, in order, hold exactly its tokens
        n_blocks = -(-len(ids) // block)
        tokens = []
        for index in range(n_blocks):
            row = next(rows)
            real = sum(row["attention_mask"])
            assert real == block or index == n_blocks - 1  # only a document's last block is short
            assert row["attention_mask"] == [1] * real + [0] * (block - real)
            assert row["labels"] == row["input_ids"][:real] + [-100] * (block - real)
            assert row["input_ids"][real:] == [tokenizer.pad_token_id] * (block - real)
            tokens += row["input_ids"][:real]
        assert tokens == ids

    packed = pretrain.build_lm_datasets(raw, pretrain.DataTrainingArguments(train_file=str(train_file)), tokenizer, block,
                                        args)["train"]
    boundaries = set(np.cumsum([len(ids) for ids in documents])[:-1])
    assert any(i * block < b < (i + 1) * block for i in range(len(packed)) for b in boundaries)  # blocks span docs
    assert all(sum(row["attention_mask"]) == block for row in packed)


def test_pretrain_saves_a_tokenizer_and_config_with_a_pad_token(tmp_path, local_tokenizer_dir, local_text_files):
    """The saved model pads with eos (tokenizer, config, generation config): batched generation works as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from energy_gpt.recipes import pretrain

    output_dir = tmp_path / "run"
    pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, output_dir, "--do_train", "--max_steps", "2",
                               "--save_strategy", "no", "--pack_across_documents", "false",
                               "--text_sample_by", "paragraph"))
    tokenizer = AutoTokenizer.from_pretrained(output_dir, padding_side="left")
    config = read_json(output_dir / "config.json")
    assert tokenizer.pad_token == tokenizer.eos_token and config["pad_token_id"] == tokenizer.eos_token_id
    assert read_json(output_dir / "generation_config.json")["pad_token_id"] == tokenizer.eos_token_id
    assert "pad with the end-of-text token" in (output_dir / "README.md").read_text()
    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(output_dir), tokenizer=tokenizer)
    prompts = ["kalo", "mine su ta ri po de"]
    alone = [generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"] for prompt in prompts]
    together = [out[0]["generated_text"] for out in generator(prompts, max_new_tokens=4, do_sample=False, batch_size=2)]
    assert together == alone
    assert_autotokenizer_loads_without_a_prompt(output_dir)


def test_pretrain_streams_a_jsonl_file(tmp_path, local_tokenizer_dir, local_text_files):
    """--streaming: no dataset length; the validation split is carved from the stream (--validation_split_percentage)."""
    from energy_gpt.recipes import pretrain

    train_jsonl = tmp_path / "train.jsonl"
    paragraphs = local_text_files[0].read_text().split("\n\n")
    train_jsonl.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    argv = pretrain_args(local_tokenizer_dir, train_jsonl, None, tmp_path / "stream", "--streaming", "--do_train",
                         "--do_eval", "--max_steps", "3", "--max_eval_samples", "10", "--save_strategy", "no",
                         "--validation_split_percentage", "10")
    _, metrics = pretrain.run(argv)
    assert metrics["train_samples"] == 3 * 8 and metrics["eval_samples"] == 10
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_pretrain_rejects_bad_arguments(tmp_path, local_tokenizer_dir, local_text_files):
    from energy_gpt.recipes import pretrain

    with pytest.raises(ValueError, match="attention_solver"):
        pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, tmp_path / "a", "--do_train",
                                   "--config_overrides", "attention_solver=adam"))
    with pytest.raises(ValueError, match="--block_size 128 is longer than the model's n_positions"):
        pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, tmp_path / "b", "--do_train",
                                   "--block_size", "128"))
    bad_file = tmp_path / "train.docx"
    bad_file.write_text("x")
    with pytest.raises(ValueError, match=r"--train_file .*unsupported extension 'docx'"):
        pretrain.run(pretrain_args(local_tokenizer_dir, bad_file, local_text_files[1], tmp_path / "c", "--do_train"))


# ---------------------------------------------------------------------------------------------------------------------
# glue
# ---------------------------------------------------------------------------------------------------------------------


def glue_args(task, train, valid, tokenizer_dir, output_dir, *extra) -> list[str]:
    quoting = ["--tsv_quoting", "none"] if task == "sst2" else []
    return [
        "--task_name", task, "--train_file", str(train), "--validation_file", str(valid),
        "--tokenizer_name", str(tokenizer_dir), "--max_seq_length", "64", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--output_dir", str(output_dir),
        "--save_strategy", "no", "--cache_dir", str(Path(output_dir).parent / "hf-datasets-cache"),
        *quoting, *QUIET, *extra,
    ]


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_glue_writes_the_task_metrics(tmp_path, gpt2_tokenizer_dir, task):
    from energy_gpt.recipes import glue

    train, valid = glue_split(tmp_path, task, n_train=48, n_eval=24)
    output_dir = tmp_path / "run"
    glue.run(glue_args(
        task, train, valid, gpt2_tokenizer_dir, output_dir, "--config_overrides", TINY_OVERRIDES,
        "--attention_solver", "newton", "--do_train", "--do_eval", "--max_steps", "3",
    ))
    eval_results = read_json(output_dir / "eval_results.json")
    assert {"eval_loss", "eval_accuracy", "eval_samples"} <= set(eval_results)
    assert "eval_matthews_correlation" not in eval_results and "eval_f1" not in eval_results
    assert eval_results["eval_samples"] == 24 and 0.0 <= eval_results["eval_accuracy"] <= 1.0
    assert read_json(output_dir / "train_results.json")["train_samples"] == 48
    # GPT-2 tokenizer: padding with eos, and the classifier knows it (it pools the last non-pad token).
    config = read_json(output_dir / "config.json")
    assert config["pad_token_id"] == 50256 and config["attention_solver"] == "newton"
    assert config["id2label"] == {str(i): name for i, name in enumerate(glue.TASK_LABEL_NAMES[task])}
    assert config["finetuning_task"] == task
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith("EnergyGPTForSequenceClassification")
    if task == "sst2":  # the checkpoint's folder is the same for every task
        assert_autotokenizer_loads_without_a_prompt(output_dir)


def test_glue_mnli_from_the_hub_evaluates_matched_and_mismatched(tmp_path, monkeypatch, gpt2_tokenizer_dir):
    """--task_name mnli alone loads nyu-mll/glue (replaced here by a local stand-in, no network) and reports both
    validation splits, the mismatched one with `_mm` keys as run_glue.py."""
    import datasets

    from energy_gpt.recipes import glue

    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]), "idx": datasets.Value("int32"),
    })
    rows = {"premise": ["A man eats.", "Two dogs run in a park.", "It rains.", "She reads a long book."] * 4,
            "hypothesis": ["Someone eats.", "Cats sleep.", "It is dry.", "A person reads."] * 4,
            "label": [0, 2, 2, 0] * 4, "idx": list(range(16))}
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        def split(n):
            return datasets.Dataset.from_dict({key: values[:n] for key, values in rows.items()}, features=features)

        return datasets.DatasetDict(train=split(16), validation_matched=split(8), validation_mismatched=split(4))

    monkeypatch.setattr(glue, "load_dataset", fake_load_dataset)
    glue.run([
        "--task_name", "mnli", "--tokenizer_name", str(gpt2_tokenizer_dir), "--config_overrides", TINY_OVERRIDES,
        "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--output_dir", str(tmp_path / "mnli"), "--save_strategy", "no", *QUIET,
    ])
    assert calls == [("nyu-mll/glue", "mnli")]
    eval_results = read_json(tmp_path / "mnli" / "eval_results.json")
    assert eval_results["eval_samples"] == 8 and eval_results["eval_samples_mm"] == 4
    assert {"eval_accuracy", "eval_accuracy_mm", "eval_loss", "eval_loss_mm"} <= set(eval_results)
    config = read_json(tmp_path / "mnli" / "config.json")
    assert config["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}


@pytest.fixture(scope="module")
def tiny_base_checkpoint(tmp_path_factory) -> Path:
    """A tiny EnergyGPT causal-LM checkpoint with GPT-2's vocabulary (what `pretrain` would leave)."""
    from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM

    torch.manual_seed(0)
    config = EnergyGPTConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, attention_solver="nag", momentum_beta=0.4)
    out = tmp_path_factory.mktemp("base")
    EnergyGPTForCausalLM(config).save_pretrained(out)
    return out


def test_glue_lora_adapter_reloads_and_merge_gives_the_same_logits(tmp_path, gpt2_tokenizer_dir, tiny_base_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from energy_gpt import EnergyGPTForSequenceClassification
    from energy_gpt.recipes import glue

    train, valid = glue_split(tmp_path, "rte", n_train=32, n_eval=8)
    output_dir = tmp_path / "lora"
    trainer, metrics = glue.run(glue_args(
        "rte", train, valid, gpt2_tokenizer_dir, output_dir, "--model_name_or_path", str(tiny_base_checkpoint),
        "--use_lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--merge_lora",
        "--do_train", "--do_eval", "--max_steps", "4", "--learning_rate", "1e-2",
    ))
    adapter_dir = output_dir / "lora_adapter"
    adapter_config = read_json(adapter_dir / "adapter_config.json")
    assert set(adapter_config["target_modules"]) == {"c_attn", "c_proj"} and "score" in adapter_config["modules_to_save"]
    assert "eval_accuracy" in metrics

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    batch = tokenizer(["A short premise.", "A much longer premise sentence with more tokens in it."],
                      ["Hypothesis one.", "Hypothesis two."], padding=True, return_tensors="pt")
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # the padding path is exercised

    # The adapter on a fresh copy of the base model gives the trained model's outputs.
    base = EnergyGPTForSequenceClassification.from_pretrained(tiny_base_checkpoint, num_labels=2, pad_token_id=50256)
    with torch.no_grad():
        base_logits = base(**batch).logits.clone()
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        adapter_logits = adapted(**batch).logits
        merged = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()  # the merged full model
        merged_logits = merged(**batch).logits
        trained_logits = trainer.model.eval()(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # training changed something
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trained_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    # The merged model is a plain EnergyGPT model with the base's solver and no LoRA weights.
    assert type(merged).__name__ == "EnergyGPTForSequenceClassification" and merged.config.attention_solver == "nag"
    assert not any("lora" in name for name in merged.state_dict())


def test_pretrain_lora_saves_only_the_adapter(tmp_path, local_tokenizer_dir, local_text_files):
    from energy_gpt.recipes import pretrain

    output_dir = tmp_path / "lora-lm"
    pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, output_dir, "--do_train", "--max_steps", "2",
                               "--use_lora", "--lora_target_modules", "c_attn,c_fc", "--save_strategy", "no"))
    assert set(read_json(output_dir / "adapter_config.json")["target_modules"]) == {"c_attn", "c_fc"}
    assert (output_dir / "adapter_model.safetensors").is_file() and not (output_dir / "model.safetensors").exists()

    with pytest.raises(ValueError, match="--lora_target_modules 'q_proj'"):
        pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, tmp_path / "bad", "--do_train",
                                   "--max_steps", "1", "--use_lora", "--lora_target_modules", "q_proj"))

    # --lora_train_solver_params: the solver modules are trained in full and saved with the adapter.
    from safetensors.torch import load_file

    from energy_gpt.peft_utils import SOLVER_MODULE_NAMES

    solver_dir = tmp_path / "lora-solver"
    trainer, _ = pretrain.run(pretrain_args(
        local_tokenizer_dir, *local_text_files, solver_dir, "--do_train", "--max_steps", "2", "--use_lora",
        "--lora_train_solver_params", "--attention_solver", "nag", "--momentum_beta", "0.3", "--save_strategy", "no"))
    modules_to_save = read_json(solver_dir / "adapter_config.json")["modules_to_save"]
    assert modules_to_save and all(name.rsplit(".", 1)[-1] in SOLVER_MODULE_NAMES for name in modules_to_save)
    saved = load_file(solver_dir / "adapter_model.safetensors")
    assert len([key for key in saved if "lora_" not in key]) == len(modules_to_save)  # one beta per listed module
    with pytest.raises(ValueError, match="--lora_train_solver_params needs --use_lora"):
        pretrain.run(pretrain_args(local_tokenizer_dir, *local_text_files, tmp_path / "bad2", "--do_train",
                                   "--lora_train_solver_params"))


def test_push_to_hub_uploads_a_complete_checkpoint(tmp_path, monkeypatch, gpt2_tokenizer_dir):
    """--push_to_hub (TrainingArguments) uploads exactly what `energy-gpt push` validates; a fake Hub API records it."""
    import fnmatch

    from energy_gpt import hub
    from energy_gpt.recipes import glue

    uploads = []

    class FakeHubApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
            files = {
                str(p.relative_to(folder_path))
                for p in Path(folder_path).rglob("*")
                if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(folder_path)), pat) for pat in allow_patterns)
            }
            uploads.append((repo_id, files, (Path(folder_path) / "README.md").read_text()))

    import transformers.trainer

    monkeypatch.setattr(hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHubApi)  # the Trainer creates the repo at start
    train, valid = glue_split(tmp_path, "sst2", n_train=16, n_eval=8)
    glue.run(glue_args(
        "sst2", train, valid, gpt2_tokenizer_dir, tmp_path / "push", "--config_overrides", TINY_OVERRIDES,
        "--do_train", "--max_steps", "1", "--push_to_hub", "--hub_model_id", "someone/energy-gpt-sst2",
    ))
    assert len(uploads) == 1
    repo_id, files, card = uploads[0]
    assert repo_id == "someone/energy-gpt-sst2"
    assert files == {name for name, _ in hub.upload_files(tmp_path / "push")}
    expected = {"config.json", "model.safetensors", "modeling_energy_gpt.py", "configuration_energy_gpt.py",
                "solvers_energy_gpt.py", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert expected <= files, expected - files
    assert "training_args.bin" not in files
    assert "energy-gpt glue" in card and "--push_to_hub" in card


# ---------------------------------------------------------------------------------------------------------------------
# Model arguments (shared with `compare`)
# ---------------------------------------------------------------------------------------------------------------------


def test_model_arguments_build_the_config_with_clear_errors(tmp_path):
    from transformers import GPT2Config

    from energy_gpt import EnergyGPTConfig
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.common import build_config

    GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64).save_pretrained(tmp_path / "gpt2")
    config = build_config(ModelArguments(config_name=str(tmp_path / "gpt2"), config_overrides="n_layer=3",
                                         attention_solver="nag", momentum_beta=0.2, nag_lookahead="query"))
    assert isinstance(config, EnergyGPTConfig) and config.auto_map["AutoModelForCausalLM"]
    assert (config.n_layer, config.n_embd, config.attention_solver, config.momentum_beta, config.nag_lookahead) == (
        3, 32, "nag", 0.2, "query")
    assert build_config(ModelArguments(), num_labels=3).num_labels == 3

    with pytest.raises(ValueError, match="must be divisible by `n_head`"):
        build_config(ModelArguments(config_overrides="n_embd=30,n_head=4"))
    with pytest.raises(ValueError, match="--config_overrides 'foo=1'"):
        build_config(ModelArguments(config_overrides="foo=1"))
    with pytest.raises(ValueError, match="--config_overrides can't be used with --model_name_or_path"):
        ModelArguments(model_name_or_path="x", config_overrides="n_layer=1")
    with pytest.raises(ValueError, match="--merge_lora needs --use_lora"):
        ModelArguments(merge_lora=True)
    with pytest.raises(ValueError, match=r"`momentum_beta` must be a float in \[0, 1\)"):
        build_config(ModelArguments(momentum_beta="1.0"))  # every registered solver field is a flag, checked once
    assert ModelArguments().lora_target_list() == ["c_attn", "c_proj"]


def test_data_arguments_defaults_and_errors(tmp_path):
    from energy_gpt.recipes import glue, pretrain

    train_file = tmp_path / "a.txt"
    train_file.write_text("some text\n")
    assert pretrain.DataTrainingArguments().dataset_name == "JeanKaddour/minipile"
    assert pretrain.DataTrainingArguments(train_file=str(train_file)).dataset_name is None
    with pytest.raises(ValueError, match="either --dataset_name or --train_file"):
        pretrain.DataTrainingArguments(dataset_name="x", train_file=str(train_file))
    with pytest.raises(FileNotFoundError, match="--train_file .*: no such file"):
        pretrain.DataTrainingArguments(train_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--validation_split_percentage must be in 1..99"):
        pretrain.DataTrainingArguments(validation_split_percentage=0)

    rte = glue.DataTrainingArguments(task_name="RTE")
    assert (rte.task_name, rte.dataset_name, rte.dataset_config_name) == ("rte", "nyu-mll/glue", "rte")
    assert glue.DataTrainingArguments(task_name="sst2", train_file="t.tsv").dataset_name is None
    with pytest.raises(ValueError, match="--task_name 'mnli-mm' is not a GLUE task"):
        glue.DataTrainingArguments(task_name="mnli-mm")
    with pytest.raises(ValueError, match="Need --task_name, --dataset_name or --train_file"):
        glue.DataTrainingArguments()
    assert set(glue.TASK_TO_KEYS) == set(glue.TASK_LABEL_NAMES) == set(glue.GLUE_TASK_METRICS)


@pytest.mark.parametrize("data_mode", [
    [],  # map-style dataset, blocks across documents (run_clm.py)
    pytest.param(["--streaming", "true"], marks=pytest.mark.slow),  # skips the batches already seen in the stream
    pytest.param(["--pack_across_documents", "false", "--text_sample_by", "paragraph"], marks=pytest.mark.slow),
], ids=["packed", "streaming", "per-document"])
def test_pretrain_killed_mid_way_resumes_to_the_uninterrupted_result(data_mode, tmp_path, local_tokenizer_dir,
                                                                      local_text_files):
    """SIGKILL a real `energy-gpt pretrain` process after a checkpoint, mid-epoch; `--resume_from_checkpoint last` then
    ends on the weights of a run that was never interrupted (same seed, CPU): the data position is restored too."""
    import signal
    import time

    from safetensors.torch import load_file

    common = ["--do_train", "--max_steps", "40", "--save_steps", "5", "--logging_steps", "5", *data_mode]
    train_file = local_text_files[0]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "energy_gpt", "pretrain",
         *pretrain_args(local_tokenizer_dir, train_file, None, killed_dir, *common)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoint-10" / "trainer_state.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists()  # it really died before the end

    # Resume and reference run as processes like the killed one, so all three use the same threads and numerics.
    for output_dir, extra in ((killed_dir, ["--resume_from_checkpoint", "last"]), (tmp_path / "uninterrupted", [])):
        finished = subprocess.run(
            [sys.executable, "-m", "energy_gpt", "pretrain",
             *pretrain_args(local_tokenizer_dir, train_file, None, output_dir, *common, *extra)],
            cwd=tmp_path, capture_output=True, text=True,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
    resumed = load_file(killed_dir / "model.safetensors")
    uninterrupted = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert read_json(killed_dir / "trainer_state.json")["global_step"] == 40
    if "--streaming" not in data_mode:  # the kill came before the end of the first epoch: really mid-epoch
        epoch_at_kill = read_json(killed_dir / "checkpoint-10" / "trainer_state.json")["epoch"]
        assert 0 < epoch_at_kill < 1, epoch_at_kill


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path):
    from energy_gpt.recipes.common import resolve_resume_checkpoint

    (tmp_path / "checkpoint-5").mkdir()  # killed while saving: no trainer_state.json
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint("last", tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert resolve_resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-3")
    assert resolve_resume_checkpoint("some/path", tmp_path) == "some/path"
