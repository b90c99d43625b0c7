"""The development evaluation set: six photos bundled with scikit-image and scikit-learn (offline).

    python -m linearsr.dev.devset [DEST]     # `make devset` -> runs/data/devset/

Writes NAME.png for astronaut, coffee, chelsea, rocket (scikit-image; public domain / CC0) and
china, flower (scikit-learn; CC-BY-2.0), plus tags.json ({name: [tags]}, written by looking at
them). Sizes are kept as they are (451x300 to 640x427): crop to a multiple of the scale before
degrading (`linearsr.data.degrade.modcrop`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TAGS = {
    "astronaut": ["person", "astronaut", "spacesuit", "helmet", "flag"],
    "coffee": ["coffee cup", "saucer", "spoon", "wooden table"],
    "chelsea": ["cat", "eyes", "whiskers", "fur"],
    "rocket": ["rocket", "launch tower", "sky", "lights"],
    "china": ["pagoda", "building", "trees", "lake", "sky"],
    "flower": ["flower", "dahlia", "petals", "leaves"],
}


def images() -> dict[str, np.ndarray]:
    """name -> [H, W, 3] uint8 RGB, from the installed scikit-image / scikit-learn packages."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        out[Path(fname).stem] = img
    return {name: np.ascontiguousarray(out[name][..., :3]) for name in TAGS}


def write(dest: str | Path) -> list[Path]:
    """Write the six PNGs and tags.json into dest (atomically, file by file)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in images().items():
        path, tmp = dest / f"{name}.png", dest / f".{name}.tmp.png"
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
        paths.append(path)
    tmp = dest / ".tags.json.tmp"
    tmp.write_text(json.dumps(TAGS, indent=1) + "\n")
    os.replace(tmp, dest / "tags.json")
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dest = argv[0] if argv else "runs/data/devset"
    paths = write(dest)
    print(f"devset: {len(paths)} images + tags.json in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
