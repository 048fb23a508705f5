"""Train (or evaluate) vizdeconv's embedded Fashion-MNIST model, reproducibly.

    python scripts/train_embedded.py              # train, evaluate, write vizdeconv/data/
    python scripts/train_embedded.py --evaluate   # test accuracy of the shipped weights

Training also keeps the weights after epochs 1, 2, 5, 10 and 25 (and the last) in fp16
(``vizdeconv/data/zfmnist-epochs/``): the checkpoints that ``vizdeconv evolution`` shows by default.

Data: Debian's package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
the IDX files under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vizdeconv.embedded import CARD_FILE, EPOCHS_FOLDER, WEIGHTS_FILE, ZFMnist, load_embedded
from vizdeconv.outputs import save_json, save_safetensors

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
KEPT_EPOCHS = (1, 2, 5, 10, 25)
OUT_DIR = Path(__file__).resolve().parent.parent / "vizdeconv" / "data"
CATEGORIES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a 4-byte magic, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()).float().div(255).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 2-pixel translations (zero padding)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 28, dx:dx + 28]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        logits = model((images[start:start + 1000] - mean) / std)
        correct += (logits.argmax(1) == labels[start:start + 1000]).sum().item()
    return correct / len(images)


def keep_checkpoint(model: torch.nn.Module, epoch: int, out_dir: Path) -> None:
    """Half precision halves the package's size; the visualisations do not change visibly."""
    save_safetensors(out_dir / EPOCHS_FOLDER / f"epoch{epoch}.safetensors",
                     {k: v.half() for k, v in model.state_dict().items()})


def train(data_dir: Path, epochs: int, seed: int, out_dir: Path) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "t10k")
    mean, std = train_x.mean().item(), train_x.std().item()
    model = ZFMnist(num_classes=len(CATEGORIES))
    batch = 128
    steps = epochs * (len(train_x) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps, pct_start=0.2)
    for stale in (out_dir / EPOCHS_FOLDER).glob("epoch*.safetensors"):
        stale.unlink()  # from a run with other epochs
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(len(train_x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            x = (augment(train_x[idx], generator) - mean) / std
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        acc = accuracy(model, test_x, test_y, mean, std)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.4f}, {time.time() - start:.0f} s",
              flush=True)
        if epoch + 1 in KEPT_EPOCHS or epoch + 1 == epochs:
            keep_checkpoint(model, epoch + 1, out_dir)
    card = {
        "name": "zfmnist",
        "description": "ZFNet-shaped convnet (5 conv layers, overlapping 3/2 max-pooling) trained on Fashion-MNIST",
        "categories": CATEGORIES,
        "input_size": [1, 28, 28],
        "mean": [mean],
        "std": [std],
        "test_accuracy": acc,
        "trained_with": f"python scripts/train_embedded.py --epochs {epochs} --seed {seed}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / WEIGHTS_FILE, model.state_dict())
    save_json(out_dir / CARD_FILE, card)
    print(f"wrote {out_dir / WEIGHTS_FILE} (test accuracy {acc:.4f})")


def evaluate(data_dir: Path) -> None:
    from vizdeconv.embedded import load_card

    card = load_card()
    test_x, test_y = load_split(data_dir, "t10k")
    acc = accuracy(load_embedded(), test_x, test_y, card["mean"][0], card["std"][0])
    print(f"Fashion-MNIST test accuracy of the shipped weights: {acc:.4f} ({len(test_x)} images)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where to write the weights and model card")
    parser.add_argument("--evaluate", action="store_true", help="only measure the shipped weights")
    args = parser.parse_args()
    if not (args.data / "t10k-images-idx3-ubyte.gz").exists():
        parser.error(f"no Fashion-MNIST files in {args.data}: apt-get install dataset-fashion-mnist, or pass --data")
    if args.evaluate:
        evaluate(args.data)
    else:
        train(args.data, args.epochs, args.seed, args.out)


if __name__ == "__main__":
    main()
