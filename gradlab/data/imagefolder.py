"""A user's own images: a folder of class subfolders, ``ROOT/CLASS/*.png|jpg|jpeg``.

The root is ``--data-dir`` (else ``$GRADLAB_DATA/imagefolder``). Two layouts:

* ``ROOT/train/CLASS/*`` with ``ROOT/test/CLASS/*`` (or ``ROOT/val/CLASS/*``): that split;
  the classes are the training subfolders, and a test class absent from training is an error;
* ``ROOT/CLASS/*``: a stratified split seeded by the run's seed (``test_fraction``).

Classes are the subfolder names in sorted order (label 0 = the first), files in sorted order
within each. Images are read with PIL, converted to RGB (``channels=rgb``, 3 channels) or
grayscale (``gray``, 1), and resized to ``image_size`` x ``image_size`` (bilinear) when it is
set; with ``image_size=0`` every image must have the first one's size (checked from the file
headers when loading). Inputs are ``(C, H, W)`` float32 pixel values / 255. ``stream=true``
reads each image when a batch needs it (:mod:`gradlab.data.stream`); the statistics then take one
pass over the training images when loading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.data.common import make_bundle, stratified_split
from gradlab.data.files import data_root
from gradlab.data.options import MAX_TRAIN, STREAM, TEST_FRACTION, WORKERS
from gradlab.data.registry import DATASETS

EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_NAMES = ("test", "val")

OPTIONS = Options(
    Option("image_size", int, 0, "resize every image to this many pixels square (0: keep the size; all must match)",
           low=0, high=4096),
    Option("channels", str, "rgb", "colour mode the images are converted to", choices=("rgb", "gray")),
    TEST_FRACTION,
    MAX_TRAIN,
    STREAM,
    WORKERS,
)


def _images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_files(folder: Path) -> dict:
    """``{class name: [image paths]}`` of the subfolders of ``folder`` that hold images."""
    found = {d.name: _images(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    return {k: v for k, v in found.items() if v}


def index_folder(root: Path, test_fraction: float, seed: int):
    """``(classes, train [(path, label)], test [(path, label)], note)`` for either layout."""
    if not root.is_dir():
        raise GradlabError(f"imagefolder: no folder {root} (pass --data-dir ROOT with ROOT/CLASS/*.png|jpg)")
    test_dir = next((root / t for t in TEST_NAMES if (root / t).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = _class_files(root / "train"), _class_files(test_dir)
        if not train:
            raise GradlabError(f"imagefolder: no images in {root / 'train'} (expected train/CLASS/*.png|jpg)")
        classes = sorted(train)
        extra = sorted(set(test) - set(classes))
        if extra:
            raise GradlabError(f"imagefolder: class {extra[0]!r} of {test_dir} has no folder in {root / 'train'}")
        label = {c: i for i, c in enumerate(classes)}
        pairs = lambda d: [(p, label[c]) for c in sorted(d) for p in d[c]]  # noqa: E731
        return classes, pairs(train), pairs(test), None
    files = _class_files(root)
    if not files:
        raise GradlabError(f"imagefolder: no images in {root} (expected {root}/CLASS/*.png|jpg, or train/ and test/ "
                           f"subfolders of classes)")
    classes = sorted(files)
    items = [(p, i) for i, c in enumerate(classes) for p in files[c]]
    y = np.array([label for _, label in items])
    tr, te = stratified_split(y, test_fraction, seed)
    note = f"{root} has no train/ and test/ subfolders: split its {len(items)} images {len(tr)}/{len(te)} by seed {seed}"
    return classes, [items[i] for i in tr], [items[i] for i in te], note


def read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """``(C, H, W)`` float32 in [0, 1]; GradlabError naming a file PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size:
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise GradlabError(f"imagefolder: cannot read image {path}: {exc}") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr.astype(np.float32) * np.float32(1 / 255)


def _check_sizes(paths: list) -> tuple:
    """The common ``(width, height)`` of the images (headers only); GradlabError at the first other."""
    from PIL import Image

    first = None
    for p in paths:
        try:
            with Image.open(p) as img:
                size = img.size
        except OSError as exc:
            raise GradlabError(f"imagefolder: cannot read image {p}: {exc}") from None
        if first is None:
            first = (p, size)
        elif size != first[1]:
            raise GradlabError(f"imagefolder: {p} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}: "
                               f"pass --image-size N to resize them all")
    return first[1]


class ImageFiles(torch.utils.data.Dataset):
    """``(path, label)`` pairs read one image at a time."""

    def __init__(self, items: list, mode: str, size: int):
        self.items, self.mode, self.size = list(items), mode, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return torch.from_numpy(read_image(path, self.mode, self.size)), int(label)


def load_imagefolder(seed, data_dir, opts):
    root = Path(data_dir).expanduser() if data_dir else data_root(None) / "imagefolder"
    classes, train, test, note = index_folder(root, opts["test_fraction"], seed)
    mode, size = ("RGB" if opts["channels"] == "rgb" else "L"), opts["image_size"]
    if not size:
        w, h = _check_sizes([p for p, _ in train + test])
    else:
        w = h = size
    shape = (3 if mode == "RGB" else 1, h, w)
    notes = [note] if note else []
    if opts["stream"]:
        from gradlab.data.stream import StreamingData, stream_stats

        tr, te = ImageFiles(train, mode, size), ImageFiles(test, mode, size)
        mean, std = stream_stats(tr, opts["workers"])
        return StreamingData("imagefolder", tr, te, shape, len(classes), mean, std, notes, workers=opts["workers"])

    def read(items):
        x = np.stack([read_image(p, mode, size) for p, _ in items]) if items else np.zeros((0, *shape), np.float32)
        return x, np.array([label for _, label in items], dtype=np.int64)

    (xtr, ytr), (xte, yte) = read(train), read(test)
    return make_bundle("imagefolder", xtr, ytr, xte, yte, len(classes), notes)


DATASETS.add(
    "imagefolder",
    load_imagefolder,
    "your own images: --data-dir ROOT with ROOT/CLASS/*.png|jpg (or train/ and test/ of classes)",
    options=OPTIONS,
)
