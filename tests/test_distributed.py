"""Two-process data-parallel training on CPU (gloo) with the launchers users have: `torchrun` and `accelerate launch`.
Both ranks must end with identical weights, and the loss must equal a one-process run with the same global batch.
The commands are the ones docs/recipes.md shows. Generated text and tokenizer: no data needed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_recipes import local_text_files, local_tokenizer_dir, pretrain_args, read_json  # noqa: F401 (fixtures)

STEPS, GLOBAL_BATCH = 4, 8

# Runs `energy-gpt pretrain` exactly as the command line does (energy_gpt.cli.main), and records what each rank
# ended with: a hash of its weights, the world size and whether DDP wrapped the model.
DRIVER = """
import hashlib, json, os, sys
import torch
from energy_gpt import cli
from energy_gpt.recipes import pretrain

trainers = []
train_and_save = pretrain.train_and_save
def recording_train_and_save(trainer, *args, **kwargs):
    trainers.append(trainer)
    return train_and_save(trainer, *args, **kwargs)
pretrain.train_and_save = recording_train_and_save

assert cli.main(["pretrain", *sys.argv[1:]]) == 0
trainer = trainers[0]
model = trainer.accelerator.unwrap_model(trainer.model)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
report = {
    "sha256": digest.hexdigest(),
    "world_size": trainer.args.world_size,
    "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    "global_step": trainer.state.global_step,
}
with open(os.path.join(os.environ["CHECKSUM_DIR"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(report, handle)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_args(tokenizer_dir, train_file, output_dir, per_device_batch: int) -> list[str]:
    return pretrain_args(tokenizer_dir, train_file, None, output_dir, "--do_train", "--max_steps", str(STEPS),
                         "--logging_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size",
                         str(per_device_batch), "--dataloader_num_workers", "0")


def step_losses(output_dir: Path) -> list[float]:
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, local_tokenizer_dir, local_text_files) -> list[float]:
    """The reference: one process, the whole global batch per step."""
    from energy_gpt.recipes import pretrain

    output_dir = tmp_path_factory.mktemp("one-process") / "run"
    pretrain.run(run_args(local_tokenizer_dir, local_text_files[0], output_dir, GLOBAL_BATCH))
    losses = step_losses(output_dir)
    assert len(losses) == STEPS
    return losses


def launcher_command(launcher: str) -> list[str]:
    """What docs/recipes.md shows (with `python -m` for the launchers' own modules)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # accelerate 1.15: `--cpu` always means ONE process (simple launcher); `--multi_gpu --num_processes 2` starts two
    # processes through torch's elastic launcher even without a GPU, and the recipe then selects gloo on CPU.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_agree_and_match_one_process(launcher, tmp_path, local_tokenizer_dir, local_text_files,
                                                   one_process_losses):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output_dir = tmp_path / "ddp"
    env = {**os.environ, "CHECKSUM_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf_home")}
    args = run_args(local_tokenizer_dir, local_text_files[0], output_dir, GLOBAL_BATCH // 2)
    result = subprocess.run([*launcher_command(launcher), str(driver), *args], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    reports = [read_json(tmp_path / f"rank{rank}.json") for rank in (0, 1)]
    assert all(report["world_size"] == 2 and report["ddp"] and report["global_step"] == STEPS for report in reports)
    assert reports[0]["sha256"] == reports[1]["sha256"]  # both ranks end with identical weights
    # Same global batch (2 x 4 = 8 blocks, the same blocks as the one-process run): the same loss at every step.
    assert step_losses(output_dir) == pytest.approx(one_process_losses, rel=1e-4, abs=1e-5)
    # Only the main process writes the run's files, and they are complete.
    assert read_json(output_dir / "train_results.json")["train_samples"] > 0
    assert (output_dir / "model.safetensors").is_file()


def test_recipes_doc_shows_the_tested_launch_commands():
    doc = (REPO_ROOT / "docs" / "recipes.md").read_text()
    assert "torchrun --standalone --nproc_per_node 2 -m energy_gpt pretrain" in doc
    assert ("accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
            "--dynamo_backend no -m energy_gpt pretrain") in doc
