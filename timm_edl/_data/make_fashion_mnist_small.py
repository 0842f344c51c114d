"""Build ``fashion_mnist_small.npz``, the Fashion-MNIST subset shipped in the package.

Selection: for each of the 10 classes, the first ``--train-per-class`` images of
that class in the order of the official training file, and the first
``--test-per-class`` of the official test file; the selected images keep their
original relative order (no shuffling). The source index of every image is
stored next to it, so the subset can be checked against the full files.

Source: Debian's ``dataset-fashion-mnist`` package (the unmodified Zalando idx
files), installed with ``apt-get install -y dataset-fashion-mnist``.

Usage (from the repository root)::

    python timm_edl/_data/make_fashion_mnist_small.py

The script is deliberately standalone (numpy only) so it can be rerun without
installing the package.
"""
import argparse
import gzip
import os
import struct
import sys

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx_ubyte(path: str) -> np.ndarray:
    """Read an idx file of unsigned bytes (magic 0x0000 08 NN) into an array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of every class, in file order."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(NUM_CLASSES)]
    if any(len(p) < per_class for p in picked):
        raise ValueError(f"fewer than {per_class} images in some class")
    return np.sort(np.concatenate(picked))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", default=DEBIAN_DIR)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_small.npz"),
    )
    args = parser.parse_args(argv)

    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        image_file, label_file = FILES[split]
        images = read_idx_ubyte(os.path.join(args.source_dir, image_file))
        labels = read_idx_ubyte(os.path.join(args.source_dir, label_file))
        indices = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = images[indices]
        arrays[f"{split}_labels"] = labels[indices]
        arrays[f"{split}_indices"] = indices.astype(np.int32)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    for split in FILES:
        print(f"  {split}: {arrays[f'{split}_images'].shape}, "
              f"per class {np.bincount(arrays[f'{split}_labels']).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
