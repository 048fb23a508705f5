"""Write the first two Fashion-MNIST test images of each class into the package (vizdeconv/data/fashion-mnist/,
linked from sample_images/fashion-mnist): the default images of `vizdeconv project` on the embedded model."""

from pathlib import Path

from PIL import Image
from train_embedded import CATEGORIES, DATA_DIR, read_idx

OUT = Path(__file__).resolve().parent.parent / "vizdeconv" / "data" / "fashion-mnist"

images = read_idx(DATA_DIR / "t10k-images-idx3-ubyte.gz")
labels = read_idx(DATA_DIR / "t10k-labels-idx1-ubyte.gz")
OUT.mkdir(parents=True, exist_ok=True)
for label, name in enumerate(CATEGORIES):
    for index in [i for i, y in enumerate(labels) if y == label][:2]:
        slug = name.lower().replace("/", "-").replace(" ", "-")
        Image.fromarray(images[index]).save(OUT / f"test{index:05d}_{slug}.png")
