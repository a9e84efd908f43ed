"""The paper's recipe (Sec. 4.2) as code, and training runs that stop, resume and fail cleanly.
Every run here is tiny (a ResNet-8 at width 4 on 200 random images, CPU)."""

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.data.core import DataLoaders
from fastai.learner import AvgSmoothLoss, Learner
from fastai.optimizer import OptimWrapper
from torch import nn

from annotated_resnet.training.batches import DATA_SEED, DeviceBatches
from annotated_resnet.training.checkpoints import load_checkpoint, model_from_checkpoint
from annotated_resnet.data import CIFAR10, CLASSES, normalize, pixel_mean, to_tensor, train_val_split
from annotated_resnet.training.evaluation import evaluate
from annotated_resnet.model import cifar_resnet
from annotated_resnet.training.recipe import Recipe, paper_recipe, sgd
from annotated_resnet.training.progress import DeviceSmoothLoss
from annotated_resnet.training.step import StepCallback, TrainingStep, check_graph_callbacks
from annotated_resnet.training.train import NonFiniteLossError, PaperSchedule, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cifar():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    # images that carry a little class signal, so that training can lower the loss
    images = rng.integers(0, 128, (200, 32, 32, 3)).astype(np.uint8) + (labels * 12)[:, None, None, None].astype(np.uint8)
    return CIFAR10(images, labels, images[:50].copy(), labels[:50].copy(), CLASSES, "random test images")


def tiny_recipe(**changes):
    recipe = paper_recipe("resnet20").scaled(iterations=30, batch_size=16)
    return Recipe(**{**recipe.__dict__, **changes})


def tiny_model():
    torch.manual_seed(0)
    return cifar_resnet(8, base_width=4)


def test_paper_recipe_has_section_4_2_numbers():
    recipe = paper_recipe("resnet56")
    assert (recipe.iterations, recipe.batch_size, recipe.lr, recipe.milestones) == (64_000, 128, 0.1, (32_000, 48_000))
    assert (recipe.momentum, recipe.weight_decay, recipe.validation, recipe.warmup_lr) == (0.9, 1e-4, 0, None)
    assert [recipe.lr_at(i) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    deep = paper_recipe("resnet110")
    assert deep.warmup_lr == 0.01 and deep.lr_at(0, warmed_up=False) == 0.01 and deep.lr_at(0) == 0.1
    with pytest.raises(ValueError, match="valid names: resnet20"):
        paper_recipe("resnet50")


def test_the_paper_trains_on_all_50k_and_chose_the_schedule_on_a_45k_5k_split():
    """Sec. 4.2: the reported models train on the whole training set; the 45k/5k split is an option."""
    reported, chosen = paper_recipe("resnet20"), paper_recipe("resnet20", split=True)
    assert reported.validation == 0 and "all training images (no validation split)" in reported.describe()
    assert chosen.validation == 5_000 and "5,000 training images held out for validation" in chosen.describe()
    assert chosen == paper_recipe("resnet20").scaled(validation=5_000)


def test_scaled_recipe_keeps_the_milestones_in_proportion():
    small = paper_recipe("resnet20").scaled(iterations=300, batch_size=32)
    assert small.milestones == (150, 225) and small.batch_size == 32 and small.validation == 0
    assert small.paper_iterations == 64_000 and "0.00469x" in small.describe()
    assert "the paper's full schedule" in paper_recipe("resnet20").describe()


@pytest.mark.parametrize("change, message", [
    ({"lr": float("nan")}, r"lr must be a finite number above 0 \(the paper: 0.1\); got nan"),
    ({"lr": float("inf")}, "lr must be a finite number above 0"),
    ({"lr": 0.0}, "lr must be a finite number above 0"),
    ({"warmup_lr": float("nan")}, "warmup_lr must be a finite number above 0"),
    ({"momentum": -0.5}, "momentum must be a finite number at least 0"),
    ({"momentum": 1.5}, r"momentum must be below 1 \(the paper: 0.9\); got 1.5"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number at least 0"),
    ({"iterations": 0}, "iterations must be a whole number of at least 1"),
    ({"batch_size": 12.5}, "batch_size must be a whole number"),
    ({"validation": -1}, "validation must be a whole number of at least 0"),
])
def test_a_recipe_with_impossible_numbers_is_explained(change, message):
    with pytest.raises(ValueError, match=message):
        Recipe(model="resnet20", **change)


def test_the_logged_training_loss_and_error_are_the_means_over_the_epochs_batches(tiny_cifar):
    """Hand computation: with a learning rate too small to move any weight, the logged training
    loss and error are the plain means over the epoch's augmented batches of the initial net."""
    recipe = tiny_recipe(iterations=12, lr=1e-30)
    model = tiny_model()
    initial = copy.deepcopy(model)
    result = train(model, tiny_cifar, recipe, progress=False, seed=3)
    mean = pixel_mean(tiny_cifar.train_images)
    batches = DeviceBatches(tiny_cifar.train_images, tiny_cifar.train_labels, recipe.batch_size, mean, train=True, seed=3)
    loss_sum = wrong = seen = 0
    with torch.no_grad():
        for x, y in batches:  # the same order and augmentation as the run's (same seed)
            logits = initial(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            wrong += (logits.argmax(1) != y).sum().item()
            seen += len(y)
    record = result.history[-1]
    assert seen == 12 * 16 and 0.5 < wrong / seen < 1  # an untrained net gets most of them wrong
    assert record["train_error"] == round(wrong / seen, 6)
    assert record["train_loss"] == pytest.approx(loss_sum / seen, abs=2e-6)


def test_evaluation_batches_are_the_unaugmented_images(tiny_cifar):
    mean = pixel_mean(tiny_cifar.train_images)
    batches = DeviceBatches(tiny_cifar.test_images, tiny_cifar.test_labels, 20, mean, train=False)
    images = torch.cat([x for x, _ in batches])
    assert len(batches) == 3 and torch.equal(images, normalize(to_tensor(tiny_cifar.test_images), mean))
    training = DeviceBatches(tiny_cifar.train_images, tiny_cifar.train_labels, 16, mean, train=True)
    x, y = next(iter(training))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(training) == 200 // 16  # full batches only


def test_training_logs_every_epoch_and_lowers_the_loss(tiny_cifar, tmp_path):
    recipe = tiny_recipe(iterations=36, lr=0.05)
    result = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path)
    assert [r["iteration"] for r in result.history] == [12, 24, 36] and result.stopped is None
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert set(lines[0]) == {"epoch", "iteration", "train_loss", "train_error", "val_error", "test_error", "lr", "seconds"}
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[0]["lr"] == 0.05 and lines[-1]["lr"] == pytest.approx(0.0005)
    assert all(line["val_error"] is None for line in lines)  # no split: no validation column
    error = evaluate(result.model, tiny_cifar.test_images, tiny_cifar.test_labels, mean=result.mean)
    assert error == pytest.approx(lines[-1]["test_error"], abs=1e-6)


def test_validation_split_holds_out_images_for_the_val_error(tiny_cifar):
    recipe = tiny_recipe(iterations=10, validation=50)
    result = train(tiny_model(), tiny_cifar, recipe, progress=False)
    train_images, _, val_images, val_labels = train_val_split(tiny_cifar.train_images, tiny_cifar.train_labels,
                                                              50, DATA_SEED)
    assert len(val_labels) == 50 and len(train_images) == len(tiny_cifar.train_labels) - 50
    assert torch.equal(result.mean, pixel_mean(train_images))  # the mean of the training part only
    last = result.history[-1]
    assert last["iteration"] == 10
    assert last["val_error"] == pytest.approx(evaluate(result.model, val_images, val_labels, mean=result.mean),
                                              abs=1e-6)
    assert last["test_error"] == pytest.approx(
        evaluate(result.model, tiny_cifar.test_images, tiny_cifar.test_labels, mean=result.mean), abs=1e-6)


class StopAfterEpoch(Callback):
    order = 90  # after the checkpoint is written

    def after_epoch(self):
        raise CancelFitException()


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_cifar, tmp_path):
    recipe = tiny_recipe()
    whole = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "whole")
    first = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "parts", cbs=[StopAfterEpoch()])
    assert first.history[-1]["iteration"] == 12
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "parts")
    resumed = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "parts", resume=True)
    assert resumed.history[-1]["iteration"] == 30 == whole.history[-1]["iteration"]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip(resumed.history) == strip(whole.history)
    checkpoint = load_checkpoint(tmp_path / "parts")  # weights_only=True
    assert checkpoint["run"]["iteration"] == 30
    assert torch.equal(model_from_checkpoint(checkpoint).state_dict()["fc.weight"], whole.model.state_dict()["fc.weight"])
    with pytest.raises(ValueError, match="another run .*recipe"):
        train(tiny_model(), tiny_cifar, tiny_recipe(lr=0.2), progress=False, out=tmp_path / "parts", resume=True)


class SetScaleAtIteration(Callback):
    """Moves fp16's loss scale as an overflow would, so that the scale is part of what a resume restores."""

    def after_batch(self):
        if self.training and self.learn.run_recorder.run.iteration == 3:
            self.learn.run_recorder.trainer.scaler.update(512.0)


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tiny_cifar, tmp_path):
    recipe = tiny_recipe(iterations=10)
    fp16 = {"progress": False, "precision": "fp16", "train_per_class": 8}  # 5 iterations an epoch
    whole = train(tiny_model(), tiny_cifar, recipe, out=tmp_path / "whole", cbs=[SetScaleAtIteration()], **fp16)
    train(tiny_model(), tiny_cifar, recipe, out=tmp_path / "parts", cbs=[SetScaleAtIteration(), StopAfterEpoch()],
          **fp16)
    resumed = train(tiny_model(), tiny_cifar, recipe, out=tmp_path / "parts", resume=True, **fp16)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    ends = [load_checkpoint(tmp_path / folder) for folder in ("whole", "parts")]
    assert ends[0]["scaler_state"] == ends[1]["scaler_state"] and ends[0]["scaler_state"]["scale"] == 512.0
    assert ends[0]["precision"] == ends[1]["precision"] == "fp16"
    assert whole.history[-1]["train_loss"] < whole.history[0]["train_loss"]


def test_a_resumed_run_computes_as_it_started_and_refuses_another_way(tiny_cifar, tmp_path):
    recipe = tiny_recipe(iterations=24)
    bf16 = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "whole", precision="bf16",
                 channels_last=True)
    train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "run", precision="bf16", channels_last=True,
          cbs=[StopAfterEpoch()])
    checkpoint = load_checkpoint(tmp_path / "run")
    assert (checkpoint["precision"], checkpoint["compile"], checkpoint["channels_last"]) == ("bf16", False, True)
    for asked, message in (({"precision": "fp32"}, "trained with precision bf16, not fp32"),
                           ({"channels_last": False}, "trained with channels_last True, not False")):
        with pytest.raises(ValueError, match=f"{message}; resume it without the .* option"):
            train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "run", resume=True, **asked)
    # resumed with the defaults (precision auto, which would be fp32 on the CPU): bf16 and channels_last go on
    resumed = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path / "run", resume=True)
    assert resumed.history == [{**r, "seconds": resumed.history[i]["seconds"]} for i, r in enumerate(bf16.history)]


def test_older_checkpoints_resume_in_their_last_precision(tiny_cifar, tmp_path):
    from annotated_resnet.training.checkpoints import settings_to_resume
    older = {"precision": "fp32, then bf16"}  # as checkpoints of runs that moved between GPUs recorded it
    assert settings_to_resume(older, tmp_path, precision="auto", compile=None, channels_last=None) == \
        {"precision": "bf16", "compile": None, "channels_last": None}
    assert settings_to_resume(None, tmp_path, precision="fp16", compile=True, channels_last=None) == \
        {"precision": "fp16", "compile": True, "channels_last": None}


@pytest.mark.parametrize("change, named", [
    ({"seed": 1}, "seed: 0 then, 1 now"),
    ({"train_per_class": 5}, "data: .*'train_per_class': None.*'train_per_class': 5"),
])
def test_resume_refuses_a_run_with_other_settings(tiny_cifar, tmp_path, change, named):
    train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, cbs=[StopAfterEpoch()])
    with pytest.raises(ValueError, match=named):
        train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, resume=True, **change)


@pytest.mark.parametrize("recorded", ["cuda", None])
def test_a_checkpoint_of_another_kind_of_device_is_refused_with_what_to_do(tiny_cifar, tmp_path, recorded):
    train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, cbs=[StopAfterEpoch()])
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["device"] == "cpu"
    # as a GPU run would have written it: its device, or (older checkpoints) a CUDA generator's 16-byte state
    if recorded:
        checkpoint["device"] = recorded
    else:
        del checkpoint["device"]
        checkpoint["loader"]["augment_state"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="trained on CUDA and resumes exactly only there.*--device cuda"):
        train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, resume=True)


@pytest.mark.parametrize("state", ["order_state", "augment_state"])
def test_a_checkpoint_whose_generators_were_of_another_kind_is_refused_with_what_to_do(tiny_cifar, tmp_path, state):
    """As GPU checkpoints of earlier versions, which kept a generator on the GPU (its state: 16
    bytes, where the CPU generator that draws today's batch order keeps 5,056)."""
    train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, cbs=[StopAfterEpoch()])
    checkpoint = load_checkpoint(tmp_path)
    checkpoint["loader"][state] = torch.zeros(16, dtype=torch.uint8)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="random state for another kind of generator \\(16 bytes, not 5056 for a "
                                         "cpu generator\\): an earlier version.*Start the run again in a new folder"):
        train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, resume=True, device="cpu")


def test_resume_needs_a_checkpoint(tiny_cifar, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_model(), tiny_cifar, tiny_recipe(), progress=False, out=tmp_path, resume=True)


@pytest.mark.parametrize("content, message", [
    (b"\x00 not a pickle", "cannot be read as a checkpoint"),
    ({"fc.weight": torch.zeros(1)}, "is not a checkpoint of this package"),
])
def test_a_file_that_is_not_a_checkpoint_is_explained(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


class ExplodeInSecondEpoch(Callback):
    order = 6  # after PaperSchedule has set the recipe's rate

    def before_batch(self):
        if self.training and self.epoch >= 1:
            self.opt.set_hypers(lr=1e10)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"iteration 1[3-9] .*checkpoint.pt \(iteration 12\), is kept"):
        train(tiny_model(), tiny_cifar, tiny_recipe(iterations=24), progress=False, out=tmp_path,
              cbs=[ExplodeInSecondEpoch()])
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["run"]["iteration"] == 12 and len(checkpoint["run"]["history"]) == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model_state"].values() if t.is_floating_point())


class ExplodeAtOnce(Callback):
    order = 6

    def before_batch(self):
        if self.training:
            self.opt.set_hypers(lr=1e10)


def test_a_non_finite_loss_before_the_first_checkpoint_says_none_was_written(tiny_cifar, tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        train(tiny_model(), tiny_cifar, tiny_recipe(iterations=24), progress=False, out=tmp_path,
              cbs=[ExplodeAtOnce()])
    assert not (tmp_path / "checkpoint.pt").exists()


class CheckEveryFiveSteps(Callback):
    """Makes the run check the loss as rarely as it does on a GPU (there every CHECK_EVERY steps)."""

    def before_fit(self):
        self.learn.run_recorder.check_every = 5


def test_a_loss_checked_every_few_steps_names_the_iterations_since_the_last_check(tiny_cifar, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"one of iterations 13-17 .*checkpoint.pt \(iteration 12\), is kept"):
        train(tiny_model(), tiny_cifar, tiny_recipe(iterations=24), progress=False, out=tmp_path,
              cbs=[ExplodeInSecondEpoch(), CheckEveryFiveSteps()])
    assert load_checkpoint(tmp_path)["run"]["iteration"] == 12


class SignalAtIteration(Callback):
    """Sends this process a real SIGTERM in the middle of the second epoch."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_batch(self):
        if self.training and self.learn.run_recorder.run.iteration == self.iteration - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_saves_and_resume_is_exact(tiny_cifar, tmp_path):
    recipe = tiny_recipe(iterations=24)
    whole = train(tiny_model(), tiny_cifar, recipe, progress=False)
    stopped = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path, cbs=[SignalAtIteration(17)])
    assert stopped.stopped == "SIGTERM at iteration 17"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["run"]["iteration"] == 17 and checkpoint["loader"]["skip"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after training
    resumed = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path, resume=True)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]


class PowerCut(Callback):
    """Ends the process's training at an iteration without any chance to save (as a machine that
    shuts down, or SIGKILL, would)."""

    order = 60  # after the run's recorder

    def __init__(self, iteration):
        self.iteration = iteration

    def after_batch(self):
        if self.training and self.learn.run_recorder.run.iteration == self.iteration:
            raise SystemExit("power cut")


def test_a_run_saves_within_an_epoch_every_few_minutes_and_resumes_exactly_from_there(tiny_cifar, tmp_path,
                                                                                     monkeypatch):
    from annotated_resnet.training import recorder
    recipe = tiny_recipe(iterations=24)  # 12 iterations an epoch
    whole = train(tiny_model(), tiny_cifar, recipe, progress=False)
    monkeypatch.setattr(recorder, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every batch
    with pytest.raises(SystemExit, match="power cut"):
        train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path, cbs=[PowerCut(17)])
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["run"]["iteration"] == 17 and checkpoint["loader"]["skip"] == 5
    resumed = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path, resume=True)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]


def test_sigterm_on_the_last_iteration_lets_the_run_finish(tiny_cifar, tmp_path):
    recipe = tiny_recipe(iterations=24)
    result = train(tiny_model(), tiny_cifar, recipe, progress=False, out=tmp_path, cbs=[SignalAtIteration(24)])
    assert result.stopped is None and [r["iteration"] for r in result.history] == [12, 24]
    assert len(load_checkpoint(tmp_path)["run"]["history"]) == 2  # the last epoch's record is saved


def test_warm_up_runs_at_its_rate_until_the_training_error_is_low_enough(tiny_cifar):
    never = tiny_recipe(iterations=12, warmup_lr=0.01, warmup_until_error=0.0)
    assert train(tiny_model(), tiny_cifar, never, progress=False).history[-1]["lr"] == 0.01
    at_once = tiny_recipe(iterations=12, warmup_lr=0.01, warmup_until_error=1.0)
    assert train(tiny_model(), tiny_cifar, at_once, progress=False).history[-1]["lr"] == at_once.lr


class EagerStepCallback(StepCallback):
    """StepCallback with the TrainingStep's own eager code (the code of the steps before a CUDA
    graph's capture, and what the graph captures), which the CPU can run."""

    def before_fit(self):
        self.training_step = TrainingStep(self.model, self.loss_func, self.opt.opt, torch.device("cpu"), graph=False)


def test_the_graphed_steps_code_changes_the_weights_as_fastais_own_step(tiny_cifar):
    recipe = tiny_recipe(iterations=12)
    images, labels = tiny_cifar.train_images, tiny_cifar.train_labels
    mean = pixel_mean(images)
    weights = []
    for cbs in ([], [EagerStepCallback()]):
        batches = DeviceBatches(images, labels, recipe.batch_size, mean, train=True)
        valid = DeviceBatches(images[:32], labels[:32], 32, mean, train=False)
        learn = Learner(DataLoaders(batches, valid), tiny_model(), loss_func=nn.CrossEntropyLoss(),
                        opt_func=lambda params, lr: OptimWrapper(opt=sgd(params, recipe, lr)), lr=recipe.lr, cbs=cbs)
        learn.remove_cb(learn.progress)
        with learn.no_logging():
            learn.fit(1)
        weights.append(learn.model.state_dict())
    assert not torch.equal(weights[0]["fc.weight"], tiny_model().state_dict()["fc.weight"])  # it trained
    assert len(weights[0]) == len(weights[1]) > 0
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


class GradientNorms(Callback):
    """Records the gradients' total norm just before every update, and counts the updates."""

    order = GradientClip.order + 1

    def before_fit(self):
        self.norms, self.updates = [], 0

    def before_step(self):
        grads = [p.grad for p in self.learn.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def after_step(self):
        self.updates += 1


def test_fastais_callbacks_run_every_event_of_the_batch_on_the_eager_path(tiny_cifar):
    """A fastai user's first reflexes work: GradientClip clips every update's gradient,
    GradientAccumulation makes one update of several batches."""
    recipe = tiny_recipe(iterations=12)
    free, clipped = GradientNorms(), GradientNorms()
    train(tiny_model(), tiny_cifar, recipe, progress=False, cbs=[free])
    train(tiny_model(), tiny_cifar, recipe, progress=False, cbs=[GradientClip(max_norm=0.05), clipped])
    assert max(free.norms) > 0.1 and len(free.norms) == 12
    assert len(clipped.norms) == 12 and max(clipped.norms) <= 0.05 * 1.001
    accumulated = GradientNorms()
    train(tiny_model(), tiny_cifar, recipe, progress=False,
          cbs=[GradientAccumulation(n_acc=3 * recipe.batch_size), accumulated])
    assert accumulated.updates == 4  # 12 batches, one update every 3


def test_the_graphed_step_refuses_callbacks_whose_events_it_would_skip():
    class LateBatch(Callback):
        order = 20

        def before_batch(self):
            pass

    with pytest.raises(ValueError, match=r"GradientClip \(before_step\); MixedPrecision \(before_batch, after_pred, "
                                         r"after_loss, before_backward, before_step, after_step\); LateBatch "
                                         r"\(before_batch\)\. Train with cuda_graph=False"):
        check_graph_callbacks([StepCallback(), GradientClip(), MixedPrecision(), LateBatch()], StepCallback.order)
    early = PaperSchedule(tiny_recipe(), None)  # its before_batch sets the rate, before the step
    check_graph_callbacks([early, StepCallback(), GradientNorms.__base__()], StepCallback.order)


def test_bf16_trains_under_autocast_on_the_cpu_and_keeps_fp32_weights(tiny_cifar):
    class Dtypes(Callback):
        def before_fit(self):
            self.seen = set()

        def after_pred(self):
            self.seen.add((self.training, self.learn.pred.dtype))

    recipe = tiny_recipe(iterations=12)
    dtypes = Dtypes()
    result = train(tiny_model(), tiny_cifar, recipe, progress=False, precision="bf16", cbs=[dtypes])
    fp32 = train(tiny_model(), tiny_cifar, recipe, progress=False)
    assert (True, torch.bfloat16) in dtypes.seen and (False, torch.float32) in dtypes.seen  # validation in fp32
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.history[-1]["train_loss"] != fp32.history[-1]["train_loss"]
    assert result.history[-1]["train_loss"] == pytest.approx(fp32.history[-1]["train_loss"], rel=0.1)


def test_smoothed_loss_on_the_device_equals_fastais(tiny_cifar):
    ours, fastais = DeviceSmoothLoss(), AvgSmoothLoss()
    ours.reset(), fastais.reset()  # as the Learner does before every epoch

    class Losses:  # what the metrics read from a Learner
        loss = None

    for value in (2.3, 2.1, 1.7, 1.9):
        Losses.loss = torch.tensor(value)
        ours.accumulate(Losses)
        fastais.accumulate(Losses)
    assert ours.count == fastais.count == 4
    assert torch.allclose(ours.value, fastais.value)


def test_a_run_with_the_progress_bar_logs_the_same_epochs(tiny_cifar, capsys):
    recipe = tiny_recipe(iterations=24)
    quiet = train(tiny_model(), tiny_cifar, recipe, progress=False)
    shown = train(tiny_model(), tiny_cifar, recipe, progress=True)
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip(shown.history) == strip(quiet.history) and len(shown.history) == 2
    assert "train_loss" in capsys.readouterr().out  # fastai's per-epoch table
