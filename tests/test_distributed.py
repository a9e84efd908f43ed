"""Data-parallel training (Sec. 4.2: "a mini-batch size of 128 on two GPUs") proven on the CPU:
two processes joined by gloo, as ``torchrun`` would start them.

The two processes are forked from the test process (its torch and fastai are imported once,
which keeps these tests fast) and given the environment ``torchrun`` gives its workers (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so they run the command line's own path:
``annotated_resnet.cli.main`` joins the process group and trains. Every run here is a
ResNet-20 at width 4 on 100 tiny images, a global batch of 20 (10 per process), 20 iterations
(5 per epoch) with the learning rate divided by 10 at iterations 10 and 15.
"""

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback

import pytest
import torch
import torch._dynamo  # noqa: F401 - DDP imports it when first built: once here, not in every forked process
import torch.distributed as dist
from fastai.callback.core import Callback
from torch import nn

from annotated_resnet import cli
from annotated_resnet.training.batches import DeviceBatches, check_batch_size
from annotated_resnet.training.batchnorm_groups import group_batchnorm
from annotated_resnet.training.distributed import ProcessGroup
from annotated_resnet.training.checkpoints import check_same_processes, load_checkpoint, model_from_checkpoint
from annotated_resnet.training.evaluation import evaluate
from annotated_resnet.data import augment, load_cifar10, normalize, pixel_mean, to_tensor
from annotated_resnet.model import create_model
from annotated_resnet.training.recipe import sgd
from annotated_resnet.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def work_in_tmp(tmp_path, monkeypatch):
    """Runs write their data cache to ./data: keep it out of the project folder."""
    monkeypatch.chdir(tmp_path)

ITERATIONS = 20
#: Seconds within which the surviving process must exit after the other one died.
EXIT_BOUND = 15


def tiny_argv(tree, out, *extra):
    return ["train", "resnet20", "--data", str(tree), "--out", str(out), "--batch-size", "20", "--base-width", "4",
            "--device", "cpu", "--no-progress", "--scale-to", str(ITERATIONS), *extra]


@pytest.fixture(scope="module")
def tree(make_image_tree):
    """10 train and 3 test PNGs per class (30 test images: 15 for each process)."""
    return make_image_tree(10, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work, folder, processes: int = 2) -> list:
    """Fork ``processes`` workers that run ``work(rank)`` with torchrun's environment; each
    writes its output to ``folder/rank<r>.out`` / ``.err`` and exits with ``work``'s status."""
    port, workers = free_port(), []
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(processes):
        def child(rank=rank):
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                              LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            for stream, name in ((sys.stdout, "out"), (sys.stderr, "err")):
                stream.flush()
                os.dup2(os.open(folder / f"rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), stream.fileno())
            try:
                status = work(rank)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(status)
        worker = multiprocessing.get_context("fork").Process(target=child)
        worker.start()
        workers.append(worker)
    return workers


def wait(workers, timeout=60):
    for worker in workers:
        worker.join(timeout)
    return [worker.exitcode for worker in workers]


def output(folder, rank, name="err"):
    return (folder / f"rank{rank}.{name}").read_text()


class AtIteration(Callback):
    """Runs ``action`` in the process of ``rank`` after its training batch ``iteration``."""

    order = 50  # before the run's recorder counts the batch and checks for a stop

    def __init__(self, rank, iteration, action):
        self.rank, self.iteration, self.action = rank, iteration, action

    def after_batch(self):
        if self.training and dist.get_rank() == self.rank and self.learn.run_recorder.run.iteration + 1 == self.iteration:
            self.action()


class CheckEvery(Callback):
    """Checks the loss, and shares stop requests, every ``n`` iterations, as on a GPU (the CPU checks
    after every iteration)."""

    def __init__(self, n):
        self.n = n

    def before_fit(self):
        self.learn.run_recorder.check_every = self.n


def cli_with(*cbs):
    """``cli.main``, with callbacks added to the run it trains (in the forked worker only)."""
    def run(argv):
        plain = cli.train
        cli.train = lambda *args, **kwargs: plain(*args, **{**kwargs, "cbs": [*(kwargs["cbs"] or []), *cbs]})
        return cli.main(argv)
    return run


class WeightsAgree(Callback):
    """After every training step, compares this process's weights with the other's (and after
    every validation pass, the running statistics it evaluated with); writes the steps, the
    largest difference seen and, at the end, the run's own test error into ``folder/agree<rank>.json``."""

    order = 60

    def __init__(self, folder):
        self.folder, self.steps, self.largest = folder, 0, 0.0

    def after_batch(self):
        if self.training:
            self.steps += 1
            self.largest = max(self.largest, self.difference(self.learn.model.parameters()))

    def after_validate(self):
        self.largest = max(self.largest, self.difference(self.learn.model.buffers()))

    @staticmethod
    def difference(tensors) -> float:
        mine = torch.cat([t.detach().float().flatten() for t in tensors])
        both = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(both, mine)
        return (both[0] - both[1]).abs().max().item()

    def after_fit(self):
        result = [self.steps, self.largest, self.learn.run_recorder.trainer.test_error()]
        (self.folder / f"agree{dist.get_rank()}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def uninterrupted(tree, tmp_path_factory):
    """An uninterrupted two-process run of the tiny recipe, checking after every step that both
    processes hold the same weights. Returns its folder."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "run"
    workers = launch(lambda rank: cli_with(WeightsAgree(folder))(tiny_argv(tree, out)), folder)
    codes = wait(workers)
    assert codes == [0, 0], output(folder, 0) + output(folder, 1)
    return folder


def test_both_processes_hold_the_same_weights_after_every_step(uninterrupted):
    """... and the same running statistics in every validation pass; the first process speaks
    for the run, and its log and checkpoint say that two processes trained it."""
    for rank in (0, 1):
        steps, largest, _ = json.loads((uninterrupted / f"agree{rank}.json").read_text())
        assert steps == ITERATIONS and largest == 0.0
    assert "processes: 2" in output(uninterrupted, 0, "out")
    assert output(uninterrupted, 1, "out") == ""  # the second process trains silently
    checkpoint = load_checkpoint(uninterrupted / "run")
    assert checkpoint["processes"] == 2 and checkpoint["batch_norm"] == "per process"
    assert len(checkpoint["process_states"]) == 2
    log = [json.loads(line) for line in (uninterrupted / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["processes"] for record in log] == [2] * 4


def test_the_logged_test_error_is_the_checkpoints_on_every_test_image(tree, uninterrupted):
    """The log's test error (fastai's validation pass, without a validation split) and the run's
    own count in the first process are the error of the checkpoint on all 30 test images."""
    checkpoint, cifar = load_checkpoint(uninterrupted / "run"), load_cifar10(tree)
    expected = evaluate(model_from_checkpoint(checkpoint), cifar.test_images, cifar.test_labels,
                        mean=checkpoint["pixel_mean"])
    assert checkpoint["run"]["history"][-1]["test_error"] == round(expected, 6)
    _, _, first_process_count = json.loads((uninterrupted / "agree0.json").read_text())
    assert first_process_count == pytest.approx(expected)


def one_process_computation(tree, seed=0, groups=None, iterations=ITERATIONS):
    """The two-process run, computed in one process from the recipe's definition.

    Each iteration draws the epoch's order from the order generator (seeded ``seed``, the same
    in both processes), takes the global batch of 20 and splits it into two halves of 10, the
    first for process 0 and the second for process 1. Each half is augmented with its own
    process's generator (``seed + 1`` and ``seed + 1001``), mean-subtracted and passed through
    the net on its own, so batch norm uses each half's own statistics; the update's gradient is
    the mean of the two halves' mean losses (what DDP's averaging of the two processes'
    gradients computes), with SGD at the schedule's rate, momentum 0.9 and weight decay 1e-4.
    The running statistics are those of process 0's halves: the net forwards process 1's half
    on copies of its buffers. The weights and running statistics after the 20 iterations
    must equal the run's checkpoint up to float rounding (the two processes add their
    gradients in another order). With ``groups=2`` the halves go through the net in one forward
    pass, normalised apart by :class:`~annotated_resnet.training.batchnorm_groups.GroupedBatchNorm2d`.
    """
    args = cli.build_parser().parse_args(tiny_argv(tree, "unused"))
    recipe = cli.recipe_from_args(args).scaled(iterations=iterations)
    cifar = load_cifar10(tree)
    torch.manual_seed(seed)
    model = create_model("resnet20", base_width=4)
    if groups:
        group_batchnorm(model, groups)
    optimizer = sgd(model.parameters(), recipe, fused=False)
    images, labels = to_tensor(cifar.train_images), torch.as_tensor(cifar.train_labels)
    mean = pixel_mean(cifar.train_images)
    order_generator = torch.Generator().manual_seed(seed)
    augment_generators = [torch.Generator().manual_seed(seed + 1 + 1000 * rank) for rank in (0, 1)]
    iteration, per_epoch, half = 0, len(labels) // recipe.batch_size, recipe.batch_size // 2
    while iteration < recipe.iterations:
        order = torch.randperm(len(labels), generator=order_generator)
        for b in range(per_epoch):
            batch = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            losses = []
            if groups:
                x = torch.cat([normalize(augment(images[index], generator=augment_generators[rank]), mean)
                               for rank, index in enumerate((batch[:half], batch[half:]))])
                losses = [nn.functional.cross_entropy(model(x), labels[batch])] * 2
            for rank, index in enumerate(() if groups else (batch[:half], batch[half:])):
                x = normalize(augment(images[index], generator=augment_generators[rank]), mean)
                if rank == 0:
                    pred = model(x)
                else:  # process 1's running statistics are not kept: it updates copies of them
                    copies = {name: buffer.clone() for name, buffer in model.named_buffers()}
                    pred = torch.func.functional_call(model, copies, (x,))
                losses.append(nn.functional.cross_entropy(pred, labels[index]))
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(iteration)
            optimizer.zero_grad()
            ((losses[0] + losses[1]) / 2).backward()
            optimizer.step()
            iteration += 1
            if iteration == recipe.iterations:
                break
    return model.state_dict()


def test_two_processes_compute_what_one_process_computes_from_the_two_halves(tree, uninterrupted):
    expected = one_process_computation(tree)
    trained = load_checkpoint(uninterrupted / "run")["model_state"]
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_killed_process_stops_the_other_and_a_resume_reaches_the_uninterrupted_weights(tree, uninterrupted,
                                                                                        tmp_path):
    out = tmp_path / "run"
    # process 1 dies (SIGKILL) after iteration 13; the last checkpoint is that of iteration 10
    killed = launch(lambda rank: cli_with(AtIteration(1, 13, lambda: os.kill(os.getpid(), signal.SIGKILL)))(
        tiny_argv(tree, out)), tmp_path / "killed")
    killed[1].join(60)
    died = time.monotonic()
    killed[0].join(EXIT_BOUND)
    assert killed[1].exitcode == -signal.SIGKILL
    assert killed[0].exitcode == 1, "the surviving process did not exit in time"
    assert time.monotonic() - died < EXIT_BOUND
    assert "Connection" in output(tmp_path / "killed", 0)  # gloo's own words
    assert load_checkpoint(out)["run"]["iteration"] == 10

    # resumed, checking every 3 iterations (at 13, 15 = the epoch's end, 18): SIGTERM to process 1
    # alone after iteration 17 stops both at the next check, 18, with one checkpoint
    stopped = launch(lambda rank: cli_with(AtIteration(1, 17, lambda: os.kill(os.getpid(), signal.SIGTERM)),
                                           CheckEvery(3))(tiny_argv(tree, out, "--resume")), tmp_path / "stopped")
    assert wait(stopped) == [128 + signal.SIGTERM] * 2, output(tmp_path / "stopped", 0)
    assert "stopped by SIGTERM at iteration 18" in output(tmp_path / "stopped", 0, "out")
    assert load_checkpoint(out)["run"]["iteration"] == 18
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary file left behind

    # resumed to the end: the weights of the run that was never stopped
    finished = launch(lambda rank: cli.main(tiny_argv(tree, out, "--resume")), tmp_path / "finished")
    assert wait(finished) == [0, 0], output(tmp_path / "finished", 0)
    whole, resumed = load_checkpoint(uninterrupted / "run"), load_checkpoint(out)
    for name, value in whole["model_state"].items():
        assert torch.equal(resumed["model_state"][name], value), name
    for mine, theirs in zip(resumed["process_states"], whole["process_states"]):
        assert torch.equal(mine["loader"]["augment_state"], theirs["loader"]["augment_state"])
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert strip(resumed["run"]["history"]) == strip(whole["run"]["history"])


def test_two_batch_norm_groups_in_one_process_compute_what_two_processes_compute(tree):
    """The paper's two-GPU batch norm on one device (``--bn-groups 2``): one net whose batch
    norm normalises the two halves of each batch apart, in one forward pass, computes what the
    two processes compute (:func:`one_process_computation`, checked against them above). Over
    the first 6 iterations: at lr 0.1 this tiny net amplifies the last-bit differences between
    a convolution over 20 images and two over 10 until, by iteration 20, they are far apart."""
    apart = one_process_computation(tree, iterations=6)
    grouped = one_process_computation(tree, groups=2, iterations=6)
    for name, value in apart.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_run_with_batch_norm_groups_trains_with_them_and_resumes_only_with_them(tree, tmp_path):
    class GroupsSeen(Callback):
        def before_batch(self):
            self.groups = {getattr(m, "groups", 1) for m in self.learn.model.modules() if isinstance(m, nn.BatchNorm2d)}

    seen = GroupsSeen()
    recipe = cli.recipe_from_args(cli.build_parser().parse_args(tiny_argv(tree, "unused")))
    train(create_model("resnet20", base_width=4), load_cifar10(tree), recipe, progress=False, out=tmp_path / "run",
          batchnorm_groups=2, cbs=[seen])
    assert seen.groups == {2}
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["batch_norm"] == "per group of 10 images"
    create_model("resnet20", base_width=4).load_state_dict(checkpoint["model_state"])  # nn.BatchNorm2d's own names
    with pytest.raises(ValueError, match="batch norm per group of 10 images; it resumes exactly only as it ran"):
        train(create_model("resnet20", base_width=4), load_cifar10(tree), recipe, progress=False, out=tmp_path / "run",
              resume=True)


def test_batch_norm_groups_are_refused_where_the_batch_does_not_split(tree, capsys):
    assert cli.main(tiny_argv(tree, "run", "--bn-groups", "3")) == 1
    assert "a batch of 20 does not split into 3 equal batch-norm groups" in capsys.readouterr().err


# --- The pieces, without processes ---


def test_the_processes_slices_make_up_each_global_batch_and_the_epoch():
    """Labels 0..39 name the images: the two processes' slices of each global batch are the
    one-process batch, split in two, so an epoch sees every image once."""
    images, labels = torch.zeros(40, 32, 32, 3, dtype=torch.uint8).numpy(), torch.arange(40).numpy()
    mean = torch.zeros(3, 32, 32)
    whole = DeviceBatches(images, labels, 8, mean, train=True, seed=3)
    halves = [DeviceBatches(images, labels, 8, mean, train=True, seed=3, rank=r, processes=2) for r in (0, 1)]
    for (_, batch), (_, first), (_, second) in zip(whole, *halves):
        assert first.tolist() == batch[:4].tolist() and second.tolist() == batch[4:].tolist()
    seen = sorted(y for _, first, _, second in [(*a, *b) for a, b in zip(*halves)] for y in [*first, *second])
    assert [int(y) for y in seen] == list(range(40))


def test_the_processes_augment_with_streams_of_their_own():
    images = torch.randint(0, 255, (16, 32, 32, 3), dtype=torch.uint8).numpy()
    labels, mean = torch.zeros(16, dtype=torch.int64).numpy(), torch.zeros(3, 32, 32)
    first, second = (DeviceBatches(images, labels, 16, mean, train=True, rank=r, processes=2) for r in (0, 1))
    assert not torch.equal(first.augment_generator.get_state(), second.augment_generator.get_state())


def test_bad_set_ups_are_explained():
    with pytest.raises(ValueError, match="global batch of 30 does not divide among 4 processes"):
        check_batch_size(30, 4)
    with pytest.raises(ValueError, match="each process needs a GPU of its own: give --device cuda"):
        ProcessGroup.start("cuda:1")
    with pytest.raises(ValueError, match="SyncBatchNorm works on GPUs only"):
        ProcessGroup.start("cpu", sync_batchnorm=True)
    with pytest.raises(ValueError, match="trained by 2 process.*--nproc-per-node 2"):
        check_same_processes({"processes": 2, "batch_norm": "per process"}, 1, "per process", "runs/x")


def test_cli_errors_for_set_ups_that_cannot_run(tree, tmp_path, capsys):
    assert cli.main(tiny_argv(tree, tmp_path, "--sync-batchnorm")) == 1
    assert "--sync-batchnorm is for several processes: start them with torchrun" in capsys.readouterr().err
