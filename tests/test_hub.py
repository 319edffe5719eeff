"""Hub publishing: what `energy-gpt push` uploads loads from a (fake, offline) Hub cache without energy_gpt installed,
the model card carries only the run's own numbers, the upload sends exactly the listed files, pipelines work."""

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import run_without_energy_gpt, tiny_config

from energy_gpt import ATTENTION_SOLVERS, EnergyGPTForCausalLM, EnergyGPTForSequenceClassification, hub
from energy_gpt.cli import main as cli_main
from energy_gpt.io_utils import atomic_directory
from energy_gpt.model_card import render_model_card, write_model_card


REPO_ID = "user/name"
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"
LABELS = {0: "negative", 1: "positive"}
WORDS = [first + second for first in "wxyz" for second in "abcdefghijklm"][:49]
PROMPT = "wa wb wc"
# What the recipes' Trainer writes (`Trainer.save_metrics`), with numbers no template could invent.
CAUSAL_RESULTS = {"epoch": 2.0, "eval_loss": 4.123456789, "perplexity": 61.7539812, "eval_runtime": 0.5,
                  "eval_samples": 12, "train_loss": 4.5678, "train_runtime": 1.25}
CLASSIFICATION_RESULTS = {"epoch": 1.0, "eval_accuracy": 0.8173, "eval_loss": 0.4412, "eval_samples_per_second": 99.5}
TRAINING_COMMAND = "energy-gpt pretrain --model_name_or_path gpt2 --attention_solver nag --output_dir out"


def word_tokenizer():
    """A tiny GPT-2 style word-level tokenizer (49 two-letter words, with and without the byte-level space marker),
    within the tiny config's vocab_size=101, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>"] + [space + word for space in ("", "\u0120") for word in WORDS]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>",
    )


def save_checkpoint(model, model_dir: Path, results: dict | None, trainer_state: dict | None = None) -> Path:
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    if results is not None:
        (model_dir / "all_results.json").write_text(json.dumps(results))
    if trainer_state is not None:
        (model_dir / "trainer_state.json").write_text(json.dumps(trainer_state))
    # Training leftovers that must stay local.
    (model_dir / "training_args.bin").write_bytes(b"pickle")
    (model_dir / "checkpoint-1").mkdir()
    (model_dir / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    return model_dir


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)  # module-scoped: created before the per-test seed
    model = EnergyGPTForCausalLM(tiny_config(attention_solver="nag", momentum_beta=0.3)).eval()
    state = {"global_step": 8, "epoch": 2.0, "log_history": [
        {"step": 4, "epoch": 1.0, "loss": 4.75}, {"step": 8, "epoch": 2.0, "loss": 4.3875},
        {"step": 8, "epoch": 2.0, "eval_loss": 4.123456789}]}
    model_dir = save_checkpoint(model, tmp_path_factory.mktemp("causal"), CAUSAL_RESULTS, state)
    write_model_card(model_dir, base_model="openai-community/gpt2", command=TRAINING_COMMAND,
                     datasets=["Salesforce/wikitext", "/data/local.txt"])
    return model_dir


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = tiny_config(attention_solver="newton", newton_lambda=0.2, num_labels=2, pad_token_id=0,
                         id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = EnergyGPTForSequenceClassification(config).eval()
    model_dir = save_checkpoint(model, tmp_path_factory.mktemp("classification"), CLASSIFICATION_RESULTS)
    write_model_card(model_dir, command="energy-gpt glue --task_name sst2", datasets=["nyu-mll/glue"],
                     dataset_config="sst2")
    return model_dir


def test_every_solver_declares_its_card_text():
    for solver in ATTENTION_SOLVERS.values():
        assert solver.paper_name and solver.description and solver.update_rule, solver.name


def test_upload_files_lists_exactly_what_loading_needs(causal_dir):
    files = hub.upload_files(causal_dir)
    names = [name for name, _ in files]
    assert sorted(names) == sorted([
        "config.json", "compat_energy_gpt.py", "configuration_energy_gpt.py", "modeling_energy_gpt.py", "solvers_energy_gpt.py",
        "energies_energy_gpt.py", "newton_kernels_energy_gpt.py", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
        "all_results.json", "trainer_state.json",
    ])
    assert all(reason.strip() for _, reason in files)
    assert hub.skipped_files(causal_dir, files) == ["checkpoint-1/optimizer.pt", "training_args.bin"]


def test_upload_files_names_everything_missing(causal_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(causal_dir, broken)
    for name in ("modeling_energy_gpt.py", "model.safetensors", "tokenizer.json", "README.md"):
        (broken / name).unlink()
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]["AutoModelForSequenceClassification"]
    (broken / "config.json").write_text(json.dumps(config))

    with pytest.raises(hub.CheckpointFolderError) as caught:
        hub.upload_files(broken)
    message = str(caught.value)
    for expected in ("modeling_energy_gpt.py", "model.safetensors", "tokenizer", "README.md",
                     "AutoModelForSequenceClassification"):
        assert expected in message
    assert len(caught.value.problems) == 5


def _logits(model_dir: Path, model_class) -> torch.Tensor:
    tokenizer = word_tokenizer()
    batch = tokenizer([PROMPT, "wg wh"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model_class.from_pretrained(model_dir).eval()(**batch).logits


def _fake_hub_snapshot(model_dir: Path, hf_home: Path, repo_id: str) -> None:
    """Place exactly the files `push` uploads where `from_pretrained(repo_id, revision=sha)` finds them offline."""
    repo_cache = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_cache / "snapshots" / FAKE_SHA
    snapshot.mkdir(parents=True)
    for name, _ in hub.upload_files(model_dir):
        shutil.copy(model_dir / name, snapshot / name)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(FAKE_SHA)


def test_pushed_folder_loads_from_hub_cache_without_energy_gpt(causal_dir, classification_dir, tmp_path):
    from transformers import pipeline

    hf_home = tmp_path / "hf_home"
    _fake_hub_snapshot(causal_dir, hf_home, "user/causal")
    _fake_hub_snapshot(classification_dir, hf_home, "user/classifier")
    torch.save({"causal": _logits(causal_dir, EnergyGPTForCausalLM),
                "classifier": _logits(classification_dir, EnergyGPTForSequenceClassification)},
               tmp_path / "expected.pt")
    generator = pipeline("text-generation", model=str(causal_dir), trust_remote_code=True)
    expected_text = generator(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]

    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline
expected = torch.load("expected.pt")
for repo_id, auto_class, key in [("user/causal", AutoModelForCausalLM, "causal"),
                                 ("user/classifier", AutoModelForSequenceClassification, "classifier")]:
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision="{FAKE_SHA}")
    model = auto_class.from_pretrained(repo_id, trust_remote_code=True, revision="{FAKE_SHA}").eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    batch = tokenizer([{PROMPT!r}, "wg wh"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected[key], rtol=0, atol=1e-6)
    print(key, "logits match", tuple(logits.shape))
generator = pipeline("text-generation", model="user/causal", trust_remote_code=True)  # revision from refs/main
print("GENERATED=" + generator({PROMPT!r}, max_new_tokens=6, do_sample=False)[0]["generated_text"])
"""
    result = run_without_energy_gpt(code, cwd=tmp_path, env_extra={"HF_HOME": str(hf_home)})
    assert "causal logits match (2, 3, 101)" in result.stdout
    assert "classifier logits match (2, 2)" in result.stdout
    assert f"GENERATED={expected_text}\n" in result.stdout


def test_pipelines_on_tiny_checkpoints(causal_dir, classification_dir):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(causal_dir), trust_remote_code=True)
    text = generator(PROMPT, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    # Greedy decoding through the pipeline is exactly the model's own argmax continuation.
    model, tokenizer = generator.model, generator.tokenizer
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert text == tokenizer.decode(greedy[0], skip_special_tokens=True)
    assert text.startswith(PROMPT + " ") and len(text.split()) > len(PROMPT.split())
    assert set(text.split()) <= set(WORDS)

    classifier = pipeline("text-classification", model=str(classification_dir), trust_remote_code=True)
    scores = classifier(PROMPT, top_k=None)
    assert {entry["label"] for entry in scores} == set(LABELS.values())
    assert sum(entry["score"] for entry in scores) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        logits = classifier.model(**classifier.tokenizer(PROMPT, return_tensors="pt")).logits[0]
    assert classifier(PROMPT)[0]["label"] == LABELS[int(logits.argmax())]
    assert classifier(PROMPT)[0]["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-6)


def test_card_yaml_parses_and_carries_measured_numbers(causal_dir, classification_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(causal_dir / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"energy-gpt", "nag"} <= set(data.tags)
    assert data.base_model == "openai-community/gpt2" and data.license == "mit"
    assert data.datasets == ["Salesforce/wikitext"]  # the local path is text only, not Hub metadata
    metrics = {result.metric_name: result.metric_value for result in data.eval_results}
    assert metrics == {"eval_loss": CAUSAL_RESULTS["eval_loss"], "perplexity": CAUSAL_RESULTS["perplexity"]}
    assert {result.dataset_type for result in data.eval_results} == {"Salesforce/wikitext"}
    body = card.text
    assert TRAINING_COMMAND in body and "/data/local.txt" in body
    assert ATTENTION_SOLVERS["nag"].update_rule in body
    assert "trust_remote_code=True" in body and "revision=revision" in body
    assert "4.12346" in body and "61.754" in body and "4.3875" in body  # all_results + trainer_state
    assert "not the\n  authors' code" in body
    # Solver scalars read back from the weights.
    assert "| 1 | 0.3 |" in body and "| 2 | 0.3 |" in body and "| 0 | 0.3 |" not in body

    card = ModelCard.load(classification_dir / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "newton" in card.data.tags
    assert card.data.base_model is None and card.data.license == "apache-2.0"
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "eval_accuracy": 0.8173, "eval_loss": 0.4412}  # eval_samples_per_second is bookkeeping
    assert {(r.dataset_type, r.dataset_config) for r in card.data.eval_results} == {("nyu-mll/glue", "sst2")}
    assert "newton_step_bound" in card.text and "AutoModelForSequenceClassification" in card.text


def test_card_without_results_states_nothing_was_measured(tmp_path):
    from huggingface_hub import ModelCard

    # Rendered inside the staging folder, as the conversion does: the card names the final folder.
    with atomic_directory(tmp_path / "converted") as staging:
        EnergyGPTForCausalLM(tiny_config(attention_solver="momentum", momentum_beta=0.0)).save_pretrained(staging)
        card = ModelCard(render_model_card(staging, base_model="gpt2", command="energy-gpt convert ..."))
    assert card.text.lstrip().startswith("# converted\n")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "No evaluation or training results were recorded" in card.text
    assert "Converted from `gpt2`" in card.text and "computes exactly the function of the base model" in card.text


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records calls, resolves `allow_patterns` like the real upload."""

    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        from huggingface_hub import CommitInfo
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        every_file = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        sent = sorted(filter_repo_objects(every_file, allow_patterns=allow_patterns))
        self.calls.append(("upload_folder", repo_id, sent, kwargs))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{FAKE_SHA}", commit_message="m",
                          commit_description="", oid=FAKE_SHA)


def test_push_uploads_exactly_the_listed_files(classification_dir, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "to_push"
    shutil.copytree(classification_dir, model_dir)
    (model_dir / "README.md").unlink()  # push renders the missing card
    RecordingHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")

    code = cli_main(["push", "--model_dir", str(model_dir), "--repo_id", REPO_ID, "--private",
                     "--revision", "dev", "--commit_message", "first upload"])
    assert code == 0
    listed = sorted(name for name, _ in hub.upload_files(model_dir))
    assert "README.md" in listed
    init, create_repo, create_branch, upload = RecordingHfApi.calls
    assert init == ("init", "hf_test_token")
    assert create_repo == ("create_repo", REPO_ID, {"private": True, "exist_ok": True})
    assert create_branch == ("create_branch", REPO_ID, {"branch": "dev", "exist_ok": True})
    assert upload[:3] == ("upload_folder", REPO_ID, listed)
    assert upload[3]["revision"] == "dev" and upload[3]["commit_message"] == "first upload"
    assert f"revision='{FAKE_SHA}'" in capsys.readouterr().out
    assert f'repo_id = "{REPO_ID}"' in (model_dir / "README.md").read_text()


def test_dry_run_touches_no_network(causal_dir, monkeypatch, capsys):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run must not touch the network or the token")

    monkeypatch.setattr(hub, "HfApi", refuse)
    monkeypatch.setattr(hub, "get_token", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert hub.main(["--model_dir", str(causal_dir), "--repo_id", REPO_ID, "--dry_run"]) == 0
    out = capsys.readouterr().out
    for name, reason in hub.upload_files(causal_dir):
        assert f"{name}" in out and reason in out
    assert "training_args.bin" in out.split("Not uploaded")[1]


def test_push_without_token_says_so(causal_dir, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(hub, "HfApi", lambda **kwargs: pytest.fail("HfApi used without a token"))
    assert hub.main(["--model_dir", str(causal_dir), "--repo_id", REPO_ID]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err


def test_push_offline_and_unreachable_hub_say_so(causal_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # The real HfApi: its request hook refuses to send anything in offline mode.
    assert hub.main(["--model_dir", str(causal_dir), "--repo_id", REPO_ID]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err

    class UnreachableHfApi(RecordingHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(hub, "HfApi", UnreachableHfApi)
    assert hub.main(["--model_dir", str(causal_dir), "--repo_id", REPO_ID]) == 1
    assert "could not reach the Hugging Face Hub" in capsys.readouterr().err


def test_push_rejects_bad_arguments(causal_dir, tmp_path, capsys):
    assert hub.main(["--model_dir", str(causal_dir), "--repo_id", "not a repo id", "--dry_run"]) == 2
    assert "--repo_id 'not a repo id'" in capsys.readouterr().err
    assert hub.main(["--model_dir", str(tmp_path / "nowhere"), "--repo_id", REPO_ID, "--dry_run"]) == 2
    assert "is not a directory" in capsys.readouterr().err
