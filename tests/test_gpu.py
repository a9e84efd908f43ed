"""The GPU paths, each at a tiny scale: the CUDA-graphed and the eager step in bf16 and in fp16
with gradient scaling, ResNet-110's warm-up in a graphed run stopped by SIGTERM and resumed,
and the launcher's runs side by side on one GPU (Fig. 6's nine, three processes at a time).

They need a CUDA GPU and are skipped without one. Their CPU counterparts, exact to the bit,
are in test_train and test_launcher. On a GPU two runs of the same recipe and
seed are close rather than bit-identical (some kernels add in a varying order), and training
magnifies the difference (on the CPU, a ResNet-110 on these images swung between losses of 2
and 100 once its learning rate was 0.1), so these tests compare runs in three ways:
- the first epoch's training loss, to 5%: ten steps leave the difference too little time to
  grow, and a step that computes the wrong thing shows at once;
- a resumed run's first epoch after the resume, or the end of a run trained beside others,
  against the same run again: cuDNN is kept to its deterministic kernels, and the run may
  differ from the uninterrupted one by three times what a plain rerun does, or 5% of the loss;
- the end of a run in another precision against fp32 runs of three seeds: between half and
  twice their mean (set from CPU replicas over ten seeds, recorded in the test).
"""

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from annotated_resnet.cli import main
from annotated_resnet.data import CIFAR10, CLASSES
from annotated_resnet.model import cifar_resnet
from annotated_resnet.reference_runs import load_reference_run
from annotated_resnet.training.checkpoints import load_checkpoint
from annotated_resnet.training.recipe import paper_recipe
from annotated_resnet.training.step import StepCallback, choose_precision
from annotated_resnet.training.train import train
from test_train import SignalAtIteration

GPU = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cifar():
    """500 training and 200 test images whose brightness carries the class: 10 iterations an
    epoch at batch 50, and a task a ResNet learns in a few epochs."""
    rng = np.random.default_rng(0)

    def images(count):
        labels = np.arange(count) % 10
        pixels = rng.integers(0, 100, (count, 32, 32, 3)) + 15 * labels[:, None, None, None]
        return pixels.astype(np.uint8), labels

    (train_images, train_labels), (test_images, test_labels) = images(500), images(200)
    return CIFAR10(train_images, train_labels, test_images, test_labels, CLASSES, "random images, class in brightness")


def recipe(model, iterations):
    return paper_recipe(model).scaled(iterations=iterations, batch_size=50)


def resnet(depth, seed=0):
    torch.manual_seed(seed)
    return cifar_resnet(depth)


def step_of(learn):
    """The run's CUDA-graphed step (``None`` on the eager path, where fastai runs the step)."""
    return next((cb.training_step for cb in learn.cbs if isinstance(cb, StepCallback)), None)


class RecordStep(Callback):
    """After every training step: the iteration, the rate the schedule set, and the rate the
    step's update read on the device; at the end, whether the step ran as a CUDA graph."""

    def __init__(self):
        self.rates, self.graphed = [], None

    def after_cancel_batch(self):
        """Called once our step has run (it ends fastai's batch), before the recorder counts the
        iteration (or stops the run there)."""
        step = step_of(self.learn)
        if self.training and step is not None:
            device_rate = step.rate.item() if step.rate is not None else None
            self.rates.append((self.learn.run_recorder.run.iteration + 1, self.opt.hypers[-1]["lr"], device_rate))

    def after_fit(self):
        step = step_of(self.learn)
        self.graphed = step is not None and step.captured is not None


def last_epochs(history, key, epochs=3):
    """The mean of ``key`` over the last epochs: less noisy than the last epoch alone."""
    return sum(record[key] for record in history[-epochs:]) / epochs


def assert_same_first_epoch(a, b, key="train_loss"):
    """Two runs of one recipe and seed: their first epochs agree to within a few percent."""
    assert a[0]["iteration"] == b[0]["iteration"]
    assert abs(a[0][key] - b[0][key]) < 0.05 * a[0][key], (a[0], b[0])


def assert_as_close_as_a_rerun(history, other, rerun, epoch=None):
    """``other`` ends (or, given ``epoch``, reaches that epoch's end) as close to ``history`` as a
    rerun of ``history``'s run does (to three times that distance, or 5% of the loss)."""
    at = (lambda h: h[epoch]["train_loss"]) if epoch is not None else (lambda h: last_epochs(h, "train_loss"))
    end, other_end, rerun_end = (at(h) for h in (history, other, rerun))
    assert abs(other_end - end) <= max(3 * abs(rerun_end - end), 0.05 * end), (end, other_end, rerun_end)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """cuDNN's deterministic kernels only, so that a rerun is as close as the GPU allows."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_graphed_and_the_eager_step_train_alike_and_fp16_keeps_its_scale(cifar, tmp_path, precision):
    if precision == "bf16" and choose_precision(GPU) != "bf16":
        pytest.skip("this GPU has no bf16 tensor cores")
    schedule = recipe("resnet20", 100)  # 10 epochs, milestones at 50 and 75
    runs = {"graph": {"precision": precision}, "eager": {"precision": precision, "cuda_graph": False},
            **{f"fp32, seed {seed}": {"precision": "fp32", "cuda_graph": False, "seed": seed} for seed in range(3)}}
    histories, graphed = {}, {}
    for name, options in runs.items():
        recorder = RecordStep()
        model = resnet(20, seed=options.get("seed", 0))
        histories[name] = train(model, cifar, schedule, progress=False, out=tmp_path / name, device=GPU,
                                cbs=[recorder], **options).history
        graphed[name] = recorder.graphed
    assert graphed == {name: name == "graph" for name in runs}
    assert_same_first_epoch(histories["graph"], histories["eager"])
    ends = {name: last_epochs(history, "train_loss") for name, history in histories.items()}
    seeds = sum(ends[f"fp32, seed {seed}"] for seed in range(3)) / 3
    # Thresholds from CPU replicas of the fp32 runs, seeds 0-9 (ResNet-20, these images and recipe,
    # 1 thread): first-epoch loss 2.01-2.83; mean of the last three epochs 0.376-0.627 (mean 0.49),
    # at most 0.27 of the first epoch's; every seed's end 0.62-1.60 times the mean of any three
    # seeds' ends; test error of the last three epochs 0.00-0.19. A step that computes the wrong
    # thing does not learn (its loss stays near ln 10 = 2.3, over 4 times that mean).
    for name, history in histories.items():  # every run learned
        assert ends[name] < history[0]["train_loss"] / 2, (name, ends[name], history[0]["train_loss"])
    for name in ("graph", "eager"):  # and the reduced precision trains like fp32 seeds
        assert 0.5 * seeds < ends[name] < 2.0 * seeds, (ends, seeds)
        assert last_epochs(histories[name], "test_error") < 0.3, histories[name][-3:]
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint["precision"] == precision
        if precision == "fp16":  # the scaler's state travels with the run, to resume it exactly
            assert 1.0 <= checkpoint["scaler_state"]["scale"] <= 2.0**16
        else:
            assert checkpoint["scaler_state"] is None


def test_the_fp16_loss_scale_halves_inside_the_graph_when_gradients_overflow(cifar, tmp_path, monkeypatch):
    """A loss scale of 2^30 makes every scaled gradient overflow fp16's 65,504: the graphed
    update must skip those steps and halve the scale on the device, step after step."""
    from annotated_resnet.training import train as train_module
    monkeypatch.setattr(train_module, "grad_scaler",
                        lambda device, precision: torch.amp.GradScaler("cuda", init_scale=2.0**30))
    recorder = RecordStep()
    train(resnet(20), cifar, recipe("resnet20", 30), progress=False, out=tmp_path, device=GPU, precision="fp16",
          cbs=[recorder])
    assert recorder.graphed
    scale = load_checkpoint(tmp_path)["scaler_state"]["scale"]
    # the 3 eager steps before the capture can halve it 3 times (to 2^27); below 2^25, the graph did it too
    assert scale <= 2.0**25, scale


def check_schedule(rates, schedule):
    """The rates of every iteration: the warm-up's 0.01 until it ends, before the first
    milestone, then 0.1, 0.01 and 0.001 from the milestones on; on the device as set."""
    assert [iteration for iteration, _, _ in rates] == list(range(1, schedule.iterations + 1))
    assert all(device_rate == pytest.approx(rate) for _, rate, device_rate in rates)
    warm = [iteration for iteration, rate, _ in rates if rate == schedule.warmup_lr]
    assert warm and warm == list(range(1, len(warm) + 1)), "the warm-up is not the run's first iterations"
    first, second = schedule.milestones
    expected = [schedule.warmup_lr if i <= len(warm) else 0.1 if i <= first else 0.01 if i <= second else 0.001
                for i in range(1, schedule.iterations + 1)]
    assert [rate for _, rate, _ in rates] == pytest.approx(expected)
    assert len(warm) < first - 10, "the warm-up did not end well before the first milestone"
    return len(warm)


def test_a_graphed_resnet110_warms_up_stops_at_sigterm_and_resumes_on_schedule(cifar, tmp_path,
                                                                               deterministic_cudnn):
    schedule = recipe("resnet110", 120)  # milestones at 60 and 90; the warm-up at lr 0.01 first
    assert schedule.warmup_lr == 0.01 and schedule.milestones == (60, 90)
    whole, rerun, before, after = RecordStep(), RecordStep(), RecordStep(), RecordStep()
    uninterrupted = train(resnet(110), cifar, schedule, progress=False, out=tmp_path / "whole", device=GPU,
                          cbs=[whole])
    again = train(resnet(110), cifar, schedule, progress=False, device=GPU, cbs=[rerun])
    stopped = train(resnet(110), cifar, schedule, progress=False, out=tmp_path / "parts", device=GPU,
                    cbs=[before, SignalAtIteration(75)])
    assert stopped.stopped == "SIGTERM at iteration 75"
    assert load_checkpoint(tmp_path / "parts")["run"]["warmed_up"]
    resumed = train(resnet(110), cifar, schedule, progress=False, out=tmp_path / "parts", device=GPU, resume=True,
                    cbs=[after])
    assert whole.graphed and rerun.graphed and before.graphed and after.graphed
    warm_whole = check_schedule(whole.rates, schedule)
    warm_parts = check_schedule(before.rates + after.rates, schedule)
    assert abs(warm_whole - warm_parts) <= 2  # both leave the warm-up at about the same iteration
    assert [r["iteration"] for r in resumed.history] == [r["iteration"] for r in uninterrupted.history]
    assert_same_first_epoch(uninterrupted.history, resumed.history)
    # the first epoch after the resume (iterations 71-80), before lr 0.1 has had time to swing the
    # runs apart: at the end, a ResNet-110 on these images can sit at a loss of 2 whatever happened
    resumed_epoch = [r["iteration"] for r in resumed.history].index(80)
    assert_as_close_as_a_rerun(uninterrupted.history, resumed.history, again.history, epoch=resumed_epoch)


@pytest.fixture(scope="module")
def image_tree(make_image_tree):
    return make_image_tree(50, 20)  # 10 iterations an epoch at batch 50


def reproduce(image_tree, out, *names):
    return main(["reproduce", *names, "--out", str(out), "--data", str(image_tree), "--iterations", "60",
                 "--batch-size", "50", "--jobs", "3", "--device", "cuda"])


def test_the_nine_runs_of_fig6_finish_three_at_a_time_and_resnet20_trains_there_as_alone(image_tree, tmp_path,
                                                                                      monkeypatch,
                                                                                      deterministic_cudnn):
    monkeypatch.chdir(tmp_path)  # the data cache goes to ./data
    assert reproduce(image_tree, tmp_path / "fig6", "fig6") == 0
    runs = {}
    for name in ("plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44", "resnet56",
                 "resnet110"):
        run = load_reference_run(tmp_path / "fig6" / name)
        history, provenance = run.history, run.provenance
        assert provenance["status"] == "finished" and "CUDA-graphed step" in provenance["precision"], name
        runs[name] = history
    assert reproduce(image_tree, tmp_path / "alone", "--runs", "resnet20") == 0
    assert reproduce(image_tree, tmp_path / "again", "--runs", "resnet20") == 0
    alone, again = (load_reference_run(tmp_path / folder / "resnet20").history for folder in ("alone", "again"))
    assert [r["iteration"] for r in alone] == [r["iteration"] for r in runs["resnet20"]] == list(range(10, 61, 10))
    assert_same_first_epoch(alone, runs["resnet20"])
    assert_as_close_as_a_rerun(alone, runs["resnet20"], again)
    # it learned: CPU replicas of this run (seeds 0-9) ended at 0.28-0.41 of their first epoch's loss
    # (mean of the last three epochs), where a step that does not learn stays near 1
    assert last_epochs(alone, "train_loss") < 0.6 * alone[0]["train_loss"]
