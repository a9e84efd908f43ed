"""The launcher (`annotated-resnet reproduce`) at a tiny scale on the CPU: runs as processes,
side by side, resumed, stopped at a budget, one failing alone; the reference-run files the
trainer writes, the paper's sets, and the reference-run loader."""

import json
import signal

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from annotated_resnet import reference_runs
from annotated_resnet.cli import build_parser, main, runs_from_args, train_options
from annotated_resnet.data import load_cifar10
from annotated_resnet.reference_runs import load_reference_run, longest_reference_run, shipped_runs
from annotated_resnet.model import cifar_resnet
from annotated_resnet.training.launcher import Run, _Timing, default_jobs, estimate_seconds
from annotated_resnet.training.checkpoints import LOG_NAME, PROVENANCE_NAME, WEIGHTS_NAME
from annotated_resnet.training.results import shipped_weights
from annotated_resnet.training.step import describe_precision
from annotated_resnet.training.train import paper_recipe, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_tree(make_image_tree):
    """5 train and 2 test PNGs per class: 5 iterations per epoch at batch 10."""
    return make_image_tree(5)


def job_args(image_tree, out, runs="plain20,resnet20", iterations=10):
    return ["--runs", runs, "--out", str(out), "--data", str(image_tree), "--iterations", str(iterations),
            "--batch-size", "10", "--device", "cpu", "--base-width", "4"]


class StopAfterEpoch(Callback):
    order = 90

    def after_epoch(self):
        raise CancelFitException()


def test_the_launch_writes_reference_runs_resumes_and_skips_what_is_finished(image_tree, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(tmp_path)  # the data cache goes to ./data
    out = tmp_path / "job"
    # a run stopped after its first epoch, as a budget would leave it
    recipe = paper_recipe("resnet20").scaled(iterations=10, batch_size=10)
    torch.manual_seed(0)
    partial = train(cifar_resnet(20, base_width=4), load_cifar10(image_tree), recipe, progress=False,
                    out=out / "resnet20", cbs=[StopAfterEpoch()], channels_last=True)
    assert partial.history[-1]["iteration"] == 5

    assert main(["reproduce", *job_args(image_tree, out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet20: resuming" in printed and "plain20: starting" in printed
    assert "plain20: epoch 2, iteration 10" in printed  # each run's epoch lines, relayed with its name
    for name in ("plain20", "resnet20"):
        run = load_reference_run(out / name)
        history, provenance, state_dict = run.history, run.provenance, run.state_dict
        assert [r["iteration"] for r in history] == [5, 10]
        assert provenance["status"] == "finished" and provenance["torch"] == torch.__version__
        assert provenance["recipe"]["iterations"] == 10 and provenance["recipe"]["milestones"] == [5, 8]
        assert provenance["device"].startswith("CPU ") and "cores" in provenance["device"]
        assert provenance["precision"] == "fp32; channels_last" and provenance["threads"] == 1
        assert provenance["processes"] == 1 and provenance["batch_norm"] == "per process"
        assert str(image_tree) in provenance["data"]["source"]
        assert provenance["training_set"] == run.training_set() == \
            "50 training images (no split: all 50k, as we read the paper's reported models)"
        assert provenance["command"].startswith(f"annotated-resnet train {name} --out {out / name} --seed 0 ")
        assert "--resume" not in provenance["command"] and "--scale-to 10" in provenance["command"]
        assert 0 < provenance["job_wall_seconds"] == pytest.approx(history[-1]["seconds"], abs=0.051)
        assert state_dict["fc.weight"].dtype == torch.float16
        assert state_dict["bn1.running_var"].dtype == state_dict["layer3.2.bn2.running_mean"].dtype == torch.float32
        model = cifar_resnet(**provenance["model"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    # resnet20 continued from its checkpoint: its first epoch is the one trained before the launch
    history = load_reference_run(out / "resnet20").history
    assert history[0] == partial.history[0]
    # a rerun finds both runs finished and trains nothing
    files = ("checkpoint.pt", "provenance.json", "weights-fp16.pt")
    before = [(out / "plain20" / f).stat().st_mtime_ns for f in files]
    assert main(["reproduce", *job_args(image_tree, out)]) == 0
    assert "plain20: already finished" in capsys.readouterr().out
    assert [(out / "plain20" / f).stat().st_mtime_ns for f in files] == before


def test_a_budget_stops_every_run_with_a_checkpoint_and_leaves_the_rest_for_the_next_launch(image_tree, tmp_path,
                                                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job"
    args = job_args(image_tree, out, runs="plain20,resnet20,plain20@1", iterations=100_000)
    assert main(["reproduce", *args, "--jobs", "2", "--budget-minutes", "0.4"]) == 3  # past a first epoch
    printed = capsys.readouterr().out
    assert "2 at a time, 1 thread(s) each" in printed
    assert "plain20: stopped by SIGTERM at iteration" in printed and "resnet20: stopped by SIGTERM" in printed, printed
    assert "plain20-seed1: not started (the time budget); run the same command again" in printed
    assert "timing: iterations per second" in printed
    for name in ("plain20", "resnet20"):
        assert (out / name / "checkpoint.pt").exists() and not (out / name / "provenance.json").exists()
    assert not (out / "plain20-seed1").exists()


def test_a_failing_run_fails_alone(image_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job"
    recipe = paper_recipe("resnet20").scaled(iterations=20, batch_size=10)  # another recipe in resnet20's folder
    torch.manual_seed(0)
    train(cifar_resnet(20, base_width=4), load_cifar10(image_tree), recipe, progress=False,
          out=out / "resnet20", cbs=[StopAfterEpoch()])
    assert main(["reproduce", *job_args(image_tree, out)]) == 1
    printed = capsys.readouterr().out
    assert "plain20: finished" in printed
    assert "resnet20: failed (exit status 1): error: the checkpoint in" in printed and "is another run" in printed
    assert f"see {out / 'resnet20' / 'train.log'}" in printed


@pytest.mark.parametrize("flags, message", [
    (["--runs", "resnet20,resnet21"], "unknown run 'resnet21'"),
    (["--runs", "resnet110@x"], "the seed after @ must be a whole number"),
    (["fig7"], "no set 'fig7'; the sets are fig1, fig6, table6"),
    (["--runs", "resnet20", "--iterations", "0"], "expected a positive whole number"),
    (["--runs", "resnet20", "--budget-minutes", "-1"], "expected a positive number"),
    (["--runs", "resnet20", "--jobs", "0"], "expected a positive whole number"),
])
def test_bad_options_are_explained(capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", "x", *flags])
    assert message in capsys.readouterr().err


def test_the_paper_sets_once_each_in_the_order_named_with_the_options_each_run_gets(capsys):
    args = build_parser().parse_args(["reproduce", "fig1", "fig6", "table6", "--runs", "resnet110@1",
                                      "--iterations", "500", "--split", "--device", "cpu"])
    runs = runs_from_args(args)
    assert [run.name for run in runs] == ["plain20", "plain56", "plain32", "plain44", "resnet20", "resnet32",
                                          "resnet44", "resnet56", "resnet110", "resnet110-seed1"]
    assert runs[-1] == Run("resnet110-seed1", "resnet110", 1) and runs[0].seed == 0
    assert train_options(args) == ["--scale-to", "500", "--split", "--device", "cpu"]
    assert main(["reproduce", "--out", "x"]) == 1 and "name the runs" in capsys.readouterr().err


def test_the_command_of_a_run_resumes_where_a_checkpoint_is(tmp_path):
    run = Run("resnet110-seed1", "resnet110", 1)
    command = run.command(tmp_path, ["--device", "cpu"])
    assert command[1:] == ["-m", "annotated_resnet.cli", "train", "resnet110", "--out", str(tmp_path / run.name),
                           "--seed", "1", "--no-progress", "--device", "cpu"]
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "checkpoint.pt").write_bytes(b"")
    assert run.command(tmp_path, [])[-1] == "--resume"


def test_a_cpu_runs_one_process_per_core_and_a_gpu_one_at_a_time(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_jobs(2, "cpu") == (2, 4)
    assert default_jobs(9, "cpu") == (8, 1)
    assert default_jobs(3, "cuda") == (1, None)


def test_the_timing_reads_the_speed_of_an_epoch_trained_within_the_launch(tmp_path):
    """A resumed run's first epoch spans a 10-hour stop; the estimate waits for the next."""
    reports, runs = [], {"resnet20": Run("resnet20", "resnet20", 0)}
    timing = _Timing(tmp_path, runs, 1_000, reports.append)
    log = [{"iteration": 100, "seconds": 100.0}]
    (tmp_path / "resnet20").mkdir()

    def logged(*records):
        log.extend(records)
        (tmp_path / "resnet20" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        timing.update({"resnet20": None}, [])

    logged()  # the launch sees one epoch
    logged({"iteration": 200, "seconds": 36_200.0})  # trained across the stop
    assert reports == []
    logged({"iteration": 300, "seconds": 36_300.0})  # 1 iteration per second
    assert reports == [reports[0]] and "resnet20 1.00; the 700 iterations left need about 11.7 min" in reports[0]


def test_the_estimate_is_the_work_left_over_the_work_done_per_second():
    # two runs side by side at 2 and 1 iterations per second; the second costs twice the first per iteration
    rates, costs = {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0, "c": 1.0}
    assert estimate_seconds({"a": 100, "b": 100, "c": 400}, rates, costs) == pytest.approx((100 + 200 + 400) / 4)


def test_reference_run_loader_explains_missing_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(reference_runs, "REFERENCE_RUNS", tmp_path / "reference_runs")
    assert shipped_runs() == []
    with pytest.raises(FileNotFoundError, match="no run folder 'resnet56'.*none \\(this copy of the package ships none"):
        load_reference_run("resnet56")
    (tmp_path / "reference_runs" / "resnet56").mkdir(parents=True)
    (tmp_path / "reference_runs" / "resnet56" / "log.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(FileNotFoundError, match="weights-fp16.pt, provenance.json missing"):
        load_reference_run(tmp_path / "reference_runs" / "resnet56")


@pytest.mark.parametrize("device, settings, cuda_graph, expected", [
    ("cuda", {"precision": "bf16", "channels_last": True}, True, "bf16 autocast; channels_last; CUDA-graphed step"),
    ("cuda", {"precision": "bf16"}, False, "bf16 autocast; channels_last; eager step"),  # older: CUDA meant channels_last
    ("cuda", {"precision": "fp16", "channels_last": True, "compile": True}, True,
     "fp16 autocast with gradient scaling; channels_last; torch.compile; CUDA-graphed step"),
    ("cuda", {"precision": "bf16, then fp16"}, True,
     "bf16 autocast, then fp16 autocast with gradient scaling; channels_last; CUDA-graphed step"),
    ("cpu", {"precision": "fp32"}, True, "fp32"),
    ("cpu", {"precision": "bf16", "channels_last": True}, True, "bf16 autocast; channels_last"),
])
def test_provenance_names_how_a_run_computed(device, settings, cuda_graph, expected):
    assert describe_precision(torch.device(device), settings, cuda_graph) == expected


def test_longest_reference_run_picks_the_most_iterations_of_that_model(tmp_path):
    def ship(folder, run, iterations, status="finished"):
        folder.mkdir(parents=True)
        (folder / LOG_NAME).write_text("")
        torch.save({}, folder / WEIGHTS_NAME)
        (folder / PROVENANCE_NAME).write_text(json.dumps(
            {"run": run, "status": status, "iterations_done": iterations, "data": {"validation_images": 0}}))

    ship(tmp_path / "resnet20", "resnet20", 3_000)
    ship(tmp_path / "full_schedule" / "resnet20", "resnet20", 64_000)
    ship(tmp_path / "longer" / "resnet20", "resnet20", 90_000, status="stopped")
    ship(tmp_path / "full_schedule" / "plain20", "plain20", 64_000)
    assert longest_reference_run("resnet20", tmp_path).folder == tmp_path / "full_schedule" / "resnet20"
    with pytest.raises(FileNotFoundError, match="resnet56"):
        longest_reference_run("resnet56", tmp_path)


def test_the_package_ships_its_full_schedule_resnet20():
    assert longest_reference_run("resnet20").folder.parent.name == "full_schedule"


def test_shipped_weights_keep_batchnorm_statistics_that_pass_fp16s_largest_number():
    model = cifar_resnet(20, base_width=4)
    model.bn1.running_var.fill_(1e6)     # as in plain-56 after training: above 65,504
    stored = shipped_weights(model.state_dict())
    assert torch.equal(stored["bn1.running_var"], model.bn1.running_var)
    assert stored["conv1.weight"].dtype == torch.float16
    assert stored["bn1.num_batches_tracked"].dtype == torch.int64
    restored = cifar_resnet(20, base_width=4)
    restored.load_state_dict(stored)
    assert torch.isfinite(restored.bn1.running_var).all()
