"""Training batches built on the device: Sec. 4.2's augmentation reaches every crop and flip."""

import numpy as np
import pytest
import torch

from annotated_resnet.training.batches import DeviceBatches


def position_coded_images(count):
    """Images whose channel 0 holds the pixel's row + 1 and channel 1 its column + 1, so that a
    crop shows where it was taken (padding is 0)."""
    rows, cols = np.meshgrid(np.arange(32) + 1, np.arange(32) + 1, indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], count, axis=0)


def crop_offsets_and_flips(batch, padding=4):
    """For each augmented image: the crop's top and left in the padded image, and whether it is mirrored."""
    found = []
    for image in (batch * 255).round().long():
        row_code, col_code = image[0, :, 16], image[1, 16, :]  # a column and a row through the middle
        i = int(torch.nonzero(row_code)[0])
        top = int(row_code[i]) - 1 + padding - i
        j = int(torch.nonzero(col_code)[0])
        flipped = bool(j + 1 < 32 and col_code[j + 1] < col_code[j])
        left = int(col_code[j]) - 1 + padding - (31 - j if flipped else j)
        found.append((top, left, flipped))
    return found


def test_every_crop_offset_and_both_flips_occur():
    padding, count = 4, 400
    images = position_coded_images(count)
    batches = DeviceBatches(images, np.zeros(count, dtype=np.int64), count, torch.zeros(3, 32, 32), train=True)
    augmented, _ = next(iter(batches))
    found = crop_offsets_and_flips(augmented, padding)
    assert {top for top, _, _ in found} == set(range(2 * padding + 1))
    assert {left for _, left, _ in found} == set(range(2 * padding + 1))
    assert {flipped for _, _, flipped in found} == {True, False}


def test_a_different_number_of_labels_is_explained():
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        DeviceBatches(position_coded_images(4), np.zeros(3, dtype=np.int64), 2, torch.zeros(3, 32, 32), train=False)
