"""Train vizdeconv's shipped deconvolutional network (``vizdeconv sparse``'s embedded model), reproducibly.

    python scripts/train_sparse.py            # train on Fashion-MNIST training images, write vizdeconv/data/

It writes a seeded sample of Debian's ``dataset-fashion-mnist`` training images as PNG files (into a fixed
folder under the temporary directory) and runs the same job as ``vizdeconv sparse train`` on them, so an
interrupted run, started again, goes on from its last epoch like any other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train_embedded import DATA_DIR, read_idx
from vizdeconv.jobs.sparse import SparseTrainJob, TrainProgress
from vizdeconv.sparse_files import EMBEDDED_FILE

OUT_FILE = Path(__file__).resolve().parent.parent / "vizdeconv" / "data" / EMBEDDED_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--images", type=int, default=1000, help="training images drawn (seeded)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=OUT_FILE)
    args = parser.parse_args()
    pixels = read_idx(args.data / "train-images-idx3-ubyte.gz")
    chosen = np.random.default_rng(0).choice(len(pixels), args.images, replace=False)
    started = time.time()
    folder = Path(tempfile.gettempdir()) / f"vizdeconv-fashion-train-{args.images}"
    folder.mkdir(exist_ok=True)
    for index in chosen:
        Image.fromarray(pixels[index]).save(folder / f"train{index:05d}.png")
    job = SparseTrainJob(args.out, maps=(16, 48), kernel=7, lams=(args.lam, args.lam), epochs=args.epochs,
                         steps=50, batch_size=32, seed=0, device="cpu")

    def show(step: TrainProgress) -> None:
        if step.cost and step.batch == step.batches:
            print(f"layer {step.layer} epoch {step.epoch}/{step.epochs}: last batch cost {step.cost.cost:.2f} "
                  f"= fit {step.cost.fit:.2f} + |z| {step.cost.penalty:.2f} ({time.time() - started:.0f} s)",
                  flush=True)

    report = job.run([folder], progress=show)
    for layer, cost in enumerate(report.costs):
        print(f"layer {layer + 1}: mean cost {cost['cost']:.3f} = fit {cost['fit']:.3f} + |z| {cost['penalty']:.3f}")
    print(f"{report.model}: {report.images} images, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
