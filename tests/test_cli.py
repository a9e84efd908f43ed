"""The command line: help, clear errors, a tiny training run, evaluation, SIGTERM."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from annotated_resnet.cli import build_parser, main, recipe_from_args
from annotated_resnet.data import SOURCE_VARIABLE
from annotated_resnet.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def work_in_tmp(tmp_path, monkeypatch):
    """Runs write their data cache to ./data: keep it out of the project folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def image_tree(make_image_tree):
    """10 train and 2 test PNGs per class."""
    return make_image_tree(10)


def tiny_run(image_tree, out, *extra):
    return ["train", "resnet20", "--data", str(image_tree), "--out", str(out), "--batch-size", "10",
            "--base-width", "4", "--device", "cpu", "--no-progress", *extra]


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--resume" in help_text and SOURCE_VARIABLE in help_text


def test_unknown_model_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "resnet57"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'resnet57'" in error and "resnet56" in error and "plain110" in error


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "expected a positive whole number"),
    (["--lr", "-1"], "expected a positive number"),
    (["--iterations", "10", "--scale-to", "10"], "not allowed with argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_flags_get_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "resnet20", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_iterations_stop_the_schedule_and_scale_to_shrinks_it():
    parser = build_parser()
    stopped = recipe_from_args(parser.parse_args(["train", "resnet56", "--iterations", "500"]))
    assert stopped.iterations == 500 and stopped.milestones == (32_000, 48_000)
    shrunk = recipe_from_args(parser.parse_args(["train", "resnet56", "--scale-to", "1000", "--split",
                                                 "--batch-size", "64", "--lr", "0.05"]))
    assert shrunk.milestones == (500, 750) and (shrunk.validation, shrunk.batch_size, shrunk.lr) == (5_000, 64, 0.05)
    assert recipe_from_args(parser.parse_args(["train", "resnet56"])).validation == 0  # all 50k by default
    assert recipe_from_args(parser.parse_args(["train", "resnet110"])).warmup_lr == 0.01


def test_missing_data_says_where_to_point(tmp_path, capsys):
    assert main(["train", "resnet20", "--data", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path)]) == 1
    assert SOURCE_VARIABLE in capsys.readouterr().err


def test_train_then_evaluate(image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_run(image_tree, out, "--scale-to", "20")) == 0
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in history] == [10, 20]
    printed = capsys.readouterr().out
    assert "iteration 20" in printed and "done: 20 iterations" in printed and "precision: fp32" in printed
    assert main(["evaluate", str(out / "checkpoint.pt"), "--data", str(image_tree), "--device", "cpu"]) == 0
    assert f"test error {history[-1]['test_error']:.2%}" in capsys.readouterr().out
    assert main(tiny_run(image_tree, out, "--scale-to", "20")) == 1  # the folder holds a run: --resume or another
    assert "--resume" in capsys.readouterr().err


def test_seed_sets_the_initial_weights(image_tree, tmp_path):
    """--seed seeds the initialisation too: two runs with one seed end with the same weights,
    a run with another seed does not (one iteration each)."""
    weights = []
    for seed, folder in ((1, "a"), (1, "b"), (2, "c")):
        assert main(tiny_run(image_tree, tmp_path / folder, "--iterations", "1", "--seed", str(seed))) == 0
        weights.append(load_checkpoint(tmp_path / folder)["model_state"]["conv1.weight"])
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


@pytest.mark.parametrize("content", [b"not a checkpoint", "state_dict"])
def test_evaluating_a_file_that_is_not_a_checkpoint_is_explained(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    if content == "state_dict":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(content)
    assert main(["evaluate", str(path)]) == 1
    error = capsys.readouterr().err
    assert "annotated-resnet train" in error and "Traceback" not in error


def test_resume_without_a_checkpoint_is_explained(image_tree, tmp_path, capsys):
    assert main(tiny_run(image_tree, tmp_path / "new", "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err


def test_sigterm_saves_and_exits_cleanly(image_tree, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "annotated_resnet.cli", *tiny_run(image_tree, out, "--scale-to", "100000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    # the command it prints continues the run as printed: the same options, and --resume
    printed = stdout.split("Continue with: ", 1)[1].strip()
    assert printed == shlex.join(["annotated-resnet", *tiny_run(image_tree, out, "--scale-to", "100000"), "--resume"])
    checkpoint = load_checkpoint(out)
    assert 10 <= checkpoint["run"]["iteration"] < 100_000
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary file left behind


def test_new_cli_runs_train_in_channels_last_and_the_fastest_cpu_precision(image_tree, tmp_path, capsys,
                                                                            monkeypatch):
    from annotated_resnet import cli
    monkeypatch.setattr(cli, "fastest_cpu_precision", lambda: "bf16")  # as on a CPU with native bf16
    assert main(tiny_run(image_tree, tmp_path / "run", "--iterations", "5")) == 0
    assert "precision: bf16, channels_last layout" in capsys.readouterr().out
    checkpoint = load_checkpoint(tmp_path / "run")
    assert (checkpoint["precision"], checkpoint["channels_last"]) == ("bf16", True)


def test_a_precision_this_cpu_runs_slowly_is_warned_of(monkeypatch):
    from annotated_resnet.training import step
    monkeypatch.setattr(step, "cpu_has_native_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert "no native bf16" in step.slow_precision_warning(cpu, "bf16")
    assert "fp16 autocast on a CPU is very slow" in step.slow_precision_warning(cpu, "fp16")
    assert step.slow_precision_warning(cpu, "fp32") is None and step.fastest_cpu_precision() == "fp32"
    monkeypatch.setattr(step, "cpu_has_native_bf16", lambda: True)
    assert step.slow_precision_warning(cpu, "bf16") is None and step.fastest_cpu_precision() == "bf16"
