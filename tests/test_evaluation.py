"""The test error (Sec. 4.2: the original view of each test image) against a hand computation."""

import numpy as np
import pytest
import torch

from annotated_resnet.data import normalize, pixel_mean, to_tensor
from annotated_resnet.training.evaluation import evaluate
from annotated_resnet.model import cifar_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3)).astype(np.uint8)


def model_with_batch_norm_statistics():
    """A net whose BN running statistics are far from any batch's own, so that eval mode and
    training mode classify differently."""
    torch.manual_seed(0)
    model = cifar_resnet(8, base_width=4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.2, 3.0)
    return model


def predictions(model, images, mean, training):
    model.train(training)
    with torch.no_grad():
        return model(normalize(to_tensor(images), mean)).argmax(1)


def test_evaluate_counts_the_wrong_predictions_of_the_model_in_eval_mode(images):
    model, mean = model_with_batch_norm_statistics(), pixel_mean(images)
    labels = predictions(model, images, mean, training=False).numpy().copy()
    labels[:7] = (labels[:7] + 1) % 10  # exactly 7 of 50 wrong
    assert evaluate(model, images, labels, mean=mean, batch_size=20) == 7 / 50  # the short last batch counts
    model.train()  # as a freshly built net (`annotated-resnet evaluate`) or one left training is
    assert evaluate(model, images, labels, mean=mean, batch_size=20) == 7 / 50
    assert model.training  # and evaluate leaves it as it found it
    # the two modes do classify these images differently, so the lines above can tell them apart
    assert (predictions(model, images, mean, training=True) != predictions(model, images, mean, training=False)).any()


@pytest.mark.parametrize("labels, message", [
    (np.zeros(49, dtype=np.int64), "50 images but 49 labels"),
    (np.full(50, 10), r"labels must lie in 0\.\.9.*from 10 to 10"),
    (np.full(50, -1), r"labels must lie in 0\.\.9.*from -1 to -1"),
])
def test_labels_that_do_not_fit_the_images_or_the_classes_are_explained(images, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate(cifar_resnet(8, base_width=4), images, labels, mean=pixel_mean(images))
