"""A copy of a CIFAR-10 image-folder archive with every image changed a little, to run the
notebooks on pixels other than the ones their committed outputs come from.

The course is tested on a JPEG copy of CIFAR-10; in Colab it reads the original images, which
differ from that copy in every pixel. An assert that holds only on the exact test pixels would
stop a learner's notebook there. This tool writes two stand-ins for "other pixels", one on
each side of the copy: the images re-encoded as JPEG at quality 50 (blockier, less detail) or
sharpened with an unsharp mask (more high-frequency detail, as the original has). It prints
how far the new pixels are from the old ones. ``make test-other-images`` runs every notebook
on both, asserts only (``--nbval-lax``).

    python tools/other_images.py jpeg50 ../shared/data/cifar10-jpeg.tar.gz data/cifar10-jpeg50.tar.gz
"""

from __future__ import annotations

import argparse
import io
import math
import os
import tarfile

import numpy as np
from PIL import Image, ImageFilter


def jpeg50(image: Image.Image) -> bytes:
    """The image as a quality-50 JPEG (Pillow's default 4:2:0 chroma subsampling)."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=50)
    return out.getvalue()


def sharpened(image: Image.Image) -> bytes:
    """The image through an unsharp mask (radius 1 pixel, 80%), stored as a near-lossless JPEG."""
    out = io.BytesIO()
    image.filter(ImageFilter.UnsharpMask(radius=1, percent=80, threshold=0)).save(out, "JPEG", quality=100,
                                                                                  subsampling=0)
    return out.getvalue()


CHANGES = {"jpeg50": jpeg50, "sharpened": sharpened}


def rewrite(source: str, target: str, change) -> tuple[int, float]:
    """Copy the archive ``source`` to ``target`` with ``change`` applied to every image; return
    the number of images and the root-mean-square change of their pixels (0-255 scale)."""
    if not (os.path.isfile(source) and tarfile.is_tarfile(source)):
        raise SystemExit(f"{source} is not a tar archive: expected an archive of an image-folder tree of CIFAR-10, "
                         "such as the JPEG copy cifar10-jpeg.tar.gz")
    squares, count = 0.0, 0
    partial = f"{target}.partial"
    with tarfile.open(source) as archive, tarfile.open(partial, "w:gz") as copy:
        for member in archive:
            if member.isdir():
                copy.addfile(member)
            if not member.isfile():
                continue
            image = Image.open(archive.extractfile(member)).convert("RGB")
            changed = change(image)
            after = np.asarray(Image.open(io.BytesIO(changed)).convert("RGB"), dtype=np.float64)
            squares += ((after - np.asarray(image, dtype=np.float64)) ** 2).mean()
            count += 1
            info = tarfile.TarInfo(member.name)
            info.size = len(changed)
            copy.addfile(info, io.BytesIO(changed))
    if count == 0:
        os.remove(partial)
        raise SystemExit(f"{source} holds no image files: expected an archive of an image-folder tree of "
                         "CIFAR-10 (cifar10/train/<class>/*.jpg, cifar10/test/<class>/*.jpg)")
    os.replace(partial, target)     # a target that exists is always complete
    return count, math.sqrt(squares / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("change", choices=sorted(CHANGES))
    parser.add_argument("source", help="a CIFAR-10 image-folder archive, e.g. the JPEG copy")
    parser.add_argument("target", help="where the changed copy goes (.tar.gz)")
    args = parser.parse_args()
    count, rms = rewrite(args.source, args.target, CHANGES[args.change])
    print(f"{args.target}: {count:,} images {args.change}, pixels changed by {rms:.1f} (root mean square, 0-255)")


if __name__ == "__main__":
    main()
