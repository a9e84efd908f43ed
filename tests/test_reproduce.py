"""The GPU job (`annotated-resnet reproduce`) at a tiny scale on the CPU: two runs side by side,
the reference-run files, resuming from its own checkpoints, the paper's sets, and the
reference-run loader."""

import json
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from annotated_resnet import reference_runs
from annotated_resnet.cli import build_parser, main, runs_from_args
from annotated_resnet.data import load_cifar10
from annotated_resnet.reference_runs import list_reference_runs, load_reference_run, longest_reference_run
from annotated_resnet.model import cifar_resnet
from annotated_resnet.training.reproduce import shipped_weights
from annotated_resnet.training.step import describe_precision
from annotated_resnet.training.train import paper_recipe, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_tree(make_image_tree):
    """5 train and 2 test PNGs per class: 5 iterations per epoch at batch 10."""
    return make_image_tree(5)


def job_args(image_tree, out):
    return ["--runs", "plain20,resnet20", "--budget-minutes", "3", "--out", str(out), "--data", str(image_tree),
            "--iterations", "10", "--batch-size", "10", "--device", "cpu", "--base-width", "4"]


class StopAfterEpoch(Callback):
    order = 90

    def after_epoch(self):
        raise CancelFitException()


def test_job_writes_reference_runs_and_resumes(image_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the data cache goes to ./data
    out = tmp_path / "job"
    # a run stopped after its first epoch, as the budget would leave it
    recipe = paper_recipe("resnet20").scaled(iterations=10, batch_size=10)
    torch.manual_seed(0)
    partial = train(cifar_resnet(20, base_width=4), load_cifar10(image_tree), recipe, progress=False,
                    out=out / "resnet20", cbs=[StopAfterEpoch()])
    assert partial.history[-1]["iteration"] == 5

    assert main(["reproduce", *job_args(image_tree, out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet20: resuming at iteration 5" in printed and "plain20: starting" in printed
    for name in ("plain20", "resnet20"):
        history, provenance, state_dict = load_reference_run(out / name)
        assert [r["iteration"] for r in history] == [5, 10]
        assert provenance["status"] == "finished" and provenance["torch"] == torch.__version__
        assert provenance["recipe"]["iterations"] == 10 and provenance["recipe"]["milestones"] == [5, 8]
        assert "CPU" in provenance["device"] and provenance["precision"] == "fp32"
        assert provenance["processes"] == 1 and provenance["batch_norm"] == "per process"
        assert str(image_tree) in provenance["data"]["source"]
        assert provenance["training_set"] == "50 training images, no validation split"
        assert provenance["command"] == "annotated-resnet reproduce " + " ".join(job_args(image_tree, out))
        assert provenance["date"].startswith("20")
        assert state_dict["fc.weight"].dtype == torch.float16
        assert state_dict["bn1.running_var"].dtype == state_dict["layer3.2.bn2.running_mean"].dtype == torch.float32
        model = cifar_resnet(**provenance["model"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    # resnet20 continued from its checkpoint: its first epoch is the one trained before the job
    history, _, _ = load_reference_run(out / "resnet20")
    assert history[0] == partial.history[0]
    # a rerun finds both runs finished and trains nothing
    files = ("checkpoint.pt", "provenance.json", "weights-fp16.pt")
    before = [(out / "plain20" / f).stat().st_mtime_ns for f in files]
    assert main(["reproduce", *job_args(image_tree, out)]) == 0
    assert "plain20: already finished" in capsys.readouterr().out
    assert [(out / "plain20" / f).stat().st_mtime_ns for f in files] == before


@pytest.mark.parametrize("flags, message", [
    (["--runs", "resnet20,resnet21"], "unknown run 'resnet21'"),
    (["--runs", "resnet110@x"], "the seed after @ must be a whole number"),
    (["fig7"], "no set 'fig7'; the sets are fig6, table6"),
    (["--runs", "resnet20", "--iterations", "0"], "expected a positive whole number"),
    (["--runs", "resnet20", "--budget-minutes", "-1"], "expected a positive number"),
])
def test_bad_options_are_explained(capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", "x", *flags])
    assert message in capsys.readouterr().err


def test_the_paper_sets_are_fig6_and_table6_once_each(capsys):
    args = build_parser().parse_args(["reproduce", "fig6", "table6", "--runs", "resnet110@1"])
    runs = runs_from_args(args)
    assert [run.name for run in runs] == ["plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32",
                                          "resnet44", "resnet56", "resnet110", "resnet110-seed1"]
    assert [run.seed for run in runs][-2:] == [0, 1]
    assert all(run.recipe == paper_recipe(run.recipe.model) for run in runs)  # the paper's, on all 50k
    assert main(["reproduce", "--out", "x"]) == 1 and "name the runs" in capsys.readouterr().err


def test_a_folder_of_another_recipe_is_refused(image_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job"
    recipe = paper_recipe("resnet20").scaled(iterations=10, batch_size=10)
    torch.manual_seed(0)
    train(cifar_resnet(20, base_width=4), load_cifar10(image_tree), recipe, progress=False,
          out=out / "resnet20", cbs=[StopAfterEpoch()])
    args = job_args(image_tree, out)
    args[args.index("--iterations") + 1] = "20"
    assert main(["reproduce", *args]) == 1
    assert "holds a run of another recipe" in capsys.readouterr().err


def test_reference_run_loader_explains_missing_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(reference_runs, "REFERENCE_RUNS", tmp_path / "reference_runs")
    assert list_reference_runs() == []
    with pytest.raises(FileNotFoundError, match="ships no reference runs"):
        load_reference_run("resnet56")
    (tmp_path / "reference_runs" / "resnet56").mkdir(parents=True)
    (tmp_path / "reference_runs" / "resnet56" / "log.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(FileNotFoundError, match="weights-fp16.pt, provenance.json missing"):
        load_reference_run(tmp_path / "reference_runs" / "resnet56")


@pytest.mark.parametrize("device, precisions, cuda_graph, expected", [
    ("cuda", "bf16", True, "bf16 autocast; channels_last, CUDA-graphed step"),
    ("cuda", "bf16", False, "bf16 autocast; channels_last, eager step"),
    ("cuda", "fp16", True, "fp16 autocast with gradient scaling; channels_last, CUDA-graphed step"),
    ("cuda", "bf16, then fp16", True, "bf16 autocast, then fp16 autocast with gradient scaling; channels_last, "
                                "CUDA-graphed step"),
    ("cpu", "fp32", True, "fp32"),
])
def test_provenance_names_the_precision_a_run_trained_in(device, precisions, cuda_graph, expected):
    assert describe_precision(torch.device(device), precisions, cuda_graph) == expected


def test_longest_reference_run_picks_the_most_iterations_of_that_model(tmp_path):
    def ship(folder, run, iterations, status="finished"):
        folder.mkdir(parents=True)
        for name in (reference_runs.LOG_NAME, reference_runs.WEIGHTS_NAME):
            (folder / name).write_text("")
        (folder / reference_runs.PROVENANCE_NAME).write_text(json.dumps(
            {"run": run, "status": status, "iterations_done": iterations}))

    ship(tmp_path / "resnet20", "resnet20", 3_000)
    ship(tmp_path / "full_schedule" / "resnet20", "resnet20", 64_000)
    ship(tmp_path / "longer" / "resnet20", "resnet20", 90_000, status="stopped")
    ship(tmp_path / "full_schedule" / "plain20", "plain20", 64_000)
    assert longest_reference_run("resnet20", tmp_path) == tmp_path / "full_schedule" / "resnet20"
    with pytest.raises(FileNotFoundError, match="resnet56"):
        longest_reference_run("resnet56", tmp_path)


def test_the_package_ships_its_full_schedule_resnet20():
    assert longest_reference_run("resnet20").parent.name == "full_schedule"


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
