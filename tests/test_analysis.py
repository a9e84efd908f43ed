"""Fig. 7's measurement: the std of each 3x3 layer's response after BN, before ReLU/addition."""

import pytest
import torch

from annotated_resnet import cifar_resnet, create_model
from annotated_resnet.course.analysis import layer_response_std, three_by_three_responses


@pytest.mark.parametrize("depth", [20, 56])
def test_one_response_per_3x3_layer_in_forward_order(depth):
    names = [name for name, _ in three_by_three_responses(create_model(f"resnet{depth}"))]
    assert len(names) == depth - 1                       # 6n+1 3x3 layers, the fc is not one
    assert names[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert names[-1] == f"layer3.{(depth - 2) // 6 - 1}.bn2"


def test_bottleneck_nets_count_only_their_3x3_layers():
    assert len(three_by_three_responses(create_model("resnet50"))) == 16   # 7x7 stem, 1x1 convs excluded


def test_std_equals_a_direct_computation_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = cifar_resnet(8).train()
    images = torch.randn(40, 3, 32, 32)
    stds = layer_response_std(model, images, batch_size=16)
    assert model.training and all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model.eval()
        stem = model.bn1(model.conv1(images))
        first_block = model.layer1[0].bn1(model.layer1[0].conv1(torch.relu(stem)))
    assert stds[0] == pytest.approx(stem.std(unbiased=False).item(), rel=1e-5)
    assert stds[1] == pytest.approx(first_block.std(unbiased=False).item(), rel=1e-5)


def test_a_residual_function_at_zero_has_zero_response():
    model = create_model("resnet20", zero_init_residual=True)    # every block's last BN scale is 0
    stds = dict(zip([n for n, _ in three_by_three_responses(model)],
                    layer_response_std(model, torch.randn(8, 3, 32, 32))))
    assert all(std == 0 for name, std in stds.items() if name.endswith("bn2"))
    assert all(std > 0 for name, std in stds.items() if not name.endswith("bn2"))


def test_rejects_unnormalized_images_and_other_models():
    with pytest.raises(ValueError, match="normalize"):
        layer_response_std(create_model("resnet20"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="annotated_resnet.ResNet"):
        three_by_three_responses(torch.nn.Linear(2, 2))


# --- Reference runs ---

import json

from annotated_resnet.reference_runs import longest_runs, runs_at_one_schedule, shipped_runs
from annotated_resnet.data import pixel_mean, train_val_split
from annotated_resnet.training.results import device_name


def make_run(root, folder, name, iterations, held_out, status="finished", command="annotated-resnet reproduce fig6",
             device="a test GPU"):
    """A run folder in the reference-run format, for a tiny 8-layer net."""
    run = root / folder
    run.mkdir(parents=True)
    depth = 8
    shortcut = "none" if name.startswith("plain") else "A"
    torch.manual_seed(iterations)
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in cifar_resnet(depth, shortcut=shortcut).state_dict().items()}
    torch.save(state, run / "weights-fp16.pt")
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "iteration": iterations, "train_error": 0.5,
                                               "test_error": 0.6}) + "\n")
    provenance = {
        "run": name, "status": status, "iterations_done": iterations, "device": device, "seed": 0,
        "data": {"source": "archive of an image-folder tree of JPEGs (lossy ...): /x.tar.gz",
                 "train_images": 50_000 - held_out, "test_images": 10_000, "validation_images": held_out,
                 "data_seed": 0},
        "recipe": {"iterations": iterations, "batch_size": 128, "paper_iterations": 64_000},
        "model": {"depth": depth, "shortcut": shortcut, "base_width": 16}, "command": command,
    }
    (run / "provenance.json").write_text(json.dumps(provenance))


def test_a_run_says_whether_a_gpu_trained_it(tmp_path):
    make_run(tmp_path, "gpu/resnet20", "resnet20", 64_000, 5_000, device="NVIDIA H100 80GB HBM3")
    make_run(tmp_path, "cpu/resnet20", "resnet20", 64_000, 0, device=device_name("cpu"))
    on_gpu = {run.folder.parent.name: run.on_gpu for run in shipped_runs(tmp_path)}
    assert on_gpu == {"gpu": True, "cpu": False}


def test_shipped_runs_are_found_anywhere_and_say_what_they_trained_on(tmp_path):
    make_run(tmp_path, "short/resnet20", "resnet20", 3_000, 5_000)
    make_run(tmp_path, "full/resnet20", "resnet20", 64_000, 0)
    make_run(tmp_path, "short/plain20", "plain20", 3_000, 5_000)
    make_run(tmp_path, "unfinished/plain20", "plain20", 64_000, 0, status="stopped at iteration 10")
    runs = shipped_runs(tmp_path)
    assert [(r.name, r.iterations) for r in runs] == [("plain20", 3_000), ("resnet20", 3_000), ("resnet20", 64_000)]
    short, full = runs[1], runs[2]
    assert "45,000 training images (5,000 held out: the 45k/5k split)" in short.describe()
    assert "0.0469x the paper's 64,000" in short.schedule() and not short.full_schedule
    assert "50,000 training images (no split" in full.training_set() and "the paper's full schedule" in full.schedule()
    assert full.data() == "the JPEG copy of CIFAR-10 (lossy)" and full.final["test_error"] == 0.6
    assert longest_runs(runs)["resnet20"] is full and longest_runs(runs)["plain20"].iterations == 3_000
    pair = runs_at_one_schedule(runs, ["plain20", "resnet20"])
    assert {name: run.iterations for name, run in pair.items()} == {"plain20": 3_000, "resnet20": 3_000}
    assert runs_at_one_schedule(runs, ["resnet20"])["resnet20"] is full
    assert runs_at_one_schedule(runs, ["plain56", "resnet20"]) == {}


def test_of_two_runs_as_long_the_one_on_all_50k_images_is_chosen(tmp_path):
    make_run(tmp_path, "a/resnet20", "resnet20", 64_000, 0)
    make_run(tmp_path, "b/resnet20", "resnet20", 64_000, 5_000)
    make_run(tmp_path, "b/plain20", "plain20", 64_000, 5_000)
    runs = shipped_runs(tmp_path)
    assert [run.held_out for run in runs if run.name == "resnet20"] == [5_000, 0]
    assert longest_runs(runs)["resnet20"].held_out == 0
    assert runs_at_one_schedule(runs, ["plain20", "resnet20"])["resnet20"].held_out == 0


def test_a_run_rebuilds_its_network_and_its_training_mean(tmp_path):
    make_run(tmp_path, "resnet20", "resnet20", 3_000, 5_000)
    run = shipped_runs(tmp_path)[0]
    net = run.model()
    assert not net.training and net.layer1[0].downsample is None
    assert torch.equal(net.conv1.weight, run.state_dict["conv1.weight"].float())

    class Data:  # the two arrays of a CIFAR10 that training_mean reads
        train_images = torch.randint(0, 256, (60, 32, 32, 3), dtype=torch.uint8).numpy()
        train_labels = torch.arange(60).remainder(10).numpy()

    run.provenance["data"].update(validation_images=10, train_images=50)
    expected = pixel_mean(train_val_split(Data.train_images, Data.train_labels, 10, 0)[0])
    torch.testing.assert_close(run.training_mean(Data), expected)
    run.provenance["data"].update(validation_images=0, train_images=60)
    torch.testing.assert_close(run.training_mean(Data), pixel_mean(Data.train_images))
    run.provenance["data"]["train_images"] = 50_000
    with pytest.raises(ValueError, match="trained on 50,000 images, but this copy of CIFAR-10 gives 60"):
        run.training_mean(Data)
    run.provenance["data"]["train_images"] = 60

    # an fp16 overflow: an infinite running variance would silence its channel in eval mode
    run.state_dict["layer1.0.bn1.running_var"][3] = float("inf")
    with pytest.raises(ValueError, match="infinite BN running statistics"):
        run.model()
    repaired = run.model(Data, reestimate_images=20)
    assert all(torch.isfinite(b).all() for b in repaired.buffers()) and run.batchnorm_reestimated == 20
    assert torch.equal(repaired.layer1[0].bn1.weight, run.state_dict["layer1.0.bn1.weight"].float())


def test_the_package_ships_a_full_schedule_resnet20():
    runs = shipped_runs()
    full = longest_runs(runs)["resnet20"]
    assert full.full_schedule and full.final["iteration"] == 64_000
    assert all(run.held_out in (0, 5_000) for run in runs)


@pytest.mark.parametrize("recorded, held_out, today", [
    # made while the 45k/5k split was the default: the command does not say so; today it must
    ("/opt/venv/bin/annotated-resnet reproduce --runs resnet20 --budget-minutes 3.7 --out /tmp/job",
     5_000, "annotated-resnet reproduce --runs resnet20 --split"),
    # made on all 50k with the old flag, which today's default makes unnecessary
    ("annotated-resnet reproduce --runs plain20 --no-split --out=/scratch/a --iterations 3000",
     0, "annotated-resnet reproduce --runs plain20 --iterations 3000"),
    # made today, both ways
    ("/home/u/.venv/bin/annotated-resnet reproduce fig6 table6 --out runs/paper --split", 5_000,
     "annotated-resnet reproduce fig6 table6 --split"),
    ("annotated-resnet reproduce --runs 'resnet110@1' --budget-minutes=30 --data /d/cifar10.tar.gz", 0,
     "annotated-resnet reproduce --runs resnet110@1 --data /d/cifar10.tar.gz"),
    # one run of a launch, as the launcher starts it
    ("annotated-resnet train plain56 --out /work/runs/cpu/plain56 --seed 0 --no-progress --device cpu", 0,
     "annotated-resnet train plain56 --device cpu"),
    ("annotated-resnet train resnet110 --out r --seed 2 --no-progress --scale-to 3000 --split", 5_000,
     "annotated-resnet train resnet110 --seed 2 --scale-to 3000 --split"),
])
def test_command_today_repeats_the_run_with_todays_defaults(tmp_path, recorded, held_out, today):
    make_run(tmp_path, "run", "resnet20", 3_000, held_out, command=recorded)
    assert shipped_runs(tmp_path)[0].command_today() == today


def test_command_today_refuses_a_command_the_package_did_not_write(tmp_path):
    make_run(tmp_path, "run", "resnet20", 3_000, 0, command="python -m annotated_resnet.gpu_job --runs resnet20")
    with pytest.raises(ValueError, match="did not write"):
        shipped_runs(tmp_path)[0].command_today()


def test_every_shipped_run_prints_the_command_a_user_types_today():
    for run in shipped_runs():
        words = run.command_today().split()
        assert words[0] == "annotated-resnet" and words[1] in ("reproduce", "train")
        assert not {"--out", "--budget-minutes", "-m"} & set(words) and "gpu_job" not in run.command_today()
        assert ("--split" in words) == bool(run.held_out)
