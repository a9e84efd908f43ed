"""Sec. 3.4's ImageNet recipe as data, its augmentation as transforms, and the fully
convolutional multi-scale test."""

import pytest
import torch
from torchvision.transforms import v2

from annotated_resnet import cifar_resnet
from annotated_resnet.course.imagenet_recipe import (PAPER, TORCHVISION_REFERENCE, PCALighting, compare,
                                              multiscale_scores, paper_training_transform,
                                              rgb_principal_components, score_map, ten_crops)


def test_the_paper_recipe_has_sec_3_4_numbers():
    assert (PAPER.batch_size, PAPER.lr, PAPER.momentum, PAPER.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert PAPER.iterations == 600_000 and round(PAPER.epochs) == 120 and PAPER.iterations_upper_bound
    assert round(TORCHVISION_REFERENCE.epochs) == 90
    assert "[256, 480]" in PAPER.training_crop and "640" in PAPER.testing
    text = PAPER.describe()
    assert text.splitlines()[0] == PAPER.name and "iterations           up to 600,000 (an upper bound: at most 120 epochs)" in text
    assert "= 120 epochs" not in text and "at most 120 epochs" in text        # "up to": an upper bound
    assert "450,410 iterations = 90 epochs" in TORCHVISION_REFERENCE.describe()


def test_compare_marks_what_torchvision_keeps_and_changes():
    lines = compare(PAPER, TORCHVISION_REFERENCE).splitlines()
    assert lines[:2] == [f"paper: {PAPER.name}", f"torchvision: {TORCHVISION_REFERENCE.name}"]
    kept = {"flip", "batch size", "lr", "weight decay", "momentum", "dropout", "batch norm", "initialization"}
    changed = {"training crop", "normalization", "colour augmentation", "lr schedule", "iterations",
               "bottleneck stride", "testing"}
    fields = {line.split("  ")[0]: i for i, line in enumerate(lines[3:], start=3) if not line.startswith(" ")}
    assert set(fields) == kept | changed
    for name in kept:
        assert lines[fields[name]].split()[len(name.split())] == "same"
    for name in changed:
        paper_line, torchvision_line = lines[fields[name]], lines[fields[name] + 1]
        assert " paper " in paper_line and torchvision_line.split()[0] == "torchvision"
    assert "RandomResizedCrop" in lines[fields["training crop"] + 1] and "[256, 480]" in lines[fields["training crop"]]


def test_principal_components_find_the_direction_colours_vary_along():
    generator = torch.Generator().manual_seed(0)
    brightness = torch.rand(20, 8, 8, 1, generator=generator) * 200
    noise = torch.randn(20, 8, 8, 3, generator=generator)
    images = (brightness * torch.tensor([1.0, 0.5, 0.25]) + 20 + noise).clamp(0, 255).round().to(torch.uint8)
    eigenvalues, eigenvectors = rgb_principal_components(images)
    assert eigenvalues[0] > 100 * eigenvalues[1] and (eigenvalues[:-1] >= eigenvalues[1:]).all()
    direction = torch.tensor([1.0, 0.5, 0.25]) / torch.tensor([1.0, 0.5, 0.25]).norm()
    assert abs(eigenvectors[:, 0] @ direction) == pytest.approx(1, abs=1e-3)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        rgb_principal_components(images.permute(0, 3, 1, 2))


def test_pca_lighting_adds_one_offset_along_the_components():
    eigenvalues, eigenvectors = torch.tensor([0.2, 0.02, 0.004]), torch.linalg.qr(torch.randn(3, 3))[0]
    image = torch.rand(3, 16, 16)
    lit = PCALighting(eigenvalues, eigenvectors, generator=torch.Generator().manual_seed(1))(image)
    offset = (lit - image).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)   # the same RGB shift everywhere
    alpha = torch.randn(3, generator=torch.Generator().manual_seed(1)) * 0.1
    torch.testing.assert_close(offset[:, 0], eigenvectors @ (alpha * eigenvalues))
    assert torch.equal(PCALighting(eigenvalues, eigenvectors, std=0.0)(image), image)
    with pytest.raises(ValueError, match="ToDtype"):
        PCALighting(eigenvalues, eigenvectors)(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_training_views_are_224_crops_at_a_random_scale():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    mean = torch.full((3, 224, 224), 0.5)
    transform = paper_training_transform(torch.ones(3) * 1e-3, torch.eye(3), mean_image=mean)
    views = torch.stack([transform(image) for _ in range(4)])
    assert views.shape == (4, 3, 224, 224) and views.dtype == torch.float32
    assert views.mean().abs() < 0.2                                   # the mean image was subtracted
    resize = transform.transforms[0]
    assert (min(resize.min_size), max(resize.min_size)) == (256, 480)


def test_ten_crops_are_corners_centre_and_their_mirrors():
    image = torch.rand(3, 256, 320)
    crops = ten_crops(image)
    assert len(crops) == 10 and all(c.shape == (3, 224, 224) for c in crops)
    torch.testing.assert_close(crops[9], crops[4].flip(-1))            # centre of the flip = flipped centre


def test_fully_convolutional_scores_average_to_the_network_output():
    torch.manual_seed(0)
    model = cifar_resnet(8).eval()
    with torch.no_grad():
        for size in ((32, 32), (40, 56)):
            image = torch.randn(2, 3, *size)
            scores = score_map(model, image)
            assert scores.shape[:2] == (2, 10)
            torch.testing.assert_close(scores.mean(dim=(2, 3)), model(image), rtol=1e-5, atol=1e-5)
        image = torch.randn(1, 3, 32, 48)
        torch.testing.assert_close(multiscale_scores(model, image, scales=(32,)),
                                   model(v2.Resize(32, antialias=True)(image)), rtol=1e-5, atol=1e-5)
        two = multiscale_scores(model, image, scales=(32, 64))
        one = [multiscale_scores(model, image, scales=(s,)) for s in (32, 64)]
        torch.testing.assert_close(two, (one[0] + one[1]) / 2)
