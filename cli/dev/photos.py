"""The 48 real photos this project can fetch by itself: Debian wallpaper packages (see DATA.md).

    python -m linearsr.dev.photos fetch DEST [--debs DIR]     # photos only, downscaled 2x, PNG
    python -m linearsr.dev.photos all [--photos DIR] [--shards DIR]   # `make data`: photos + shards

`apt-get download` fetches the .deb files (no install, no root unless the package lists need an
`apt-get update`); the photos are read straight out of each package's data.tar (Python's ar/tar,
or `dpkg-deb --fsys-tarfile` when present), downscaled 2x with Lanczos to hide JPEG artefacts and
written as PNG named after the photo (`ColdRipple.png`). Their tags are `data/photo_tags.json`.
Licences: GPL-2+, CC-BY-SA, CC-BY, CC0, LGPL (see each package's copyright file).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

log = logging.getLogger(__name__)

TAGS_FILE = Path(__file__).with_name("photo_tags.json")
_PLASMA = ("ColdRipple", "FallenLeaf", "Path", "Kite", "ColorfulCups", "Grey", "OneStandsOut", "EveningGlow",
           "summer_1am", "BytheWater", "DarkestHour")
_MATE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
         "TwoWings", "Wood", "YellowFlower")
_LOMIRI16 = ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
             "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
             "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
             "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")
_LXQT = ("Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png", "beam.png",
         "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg")

# package -> {path inside the package: output name}
PHOTOS: dict[str, dict[str, str]] = {
    "plasma-workspace-wallpapers": {f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg": n for n in _PLASMA},
    "mate-backgrounds": {f"usr/share/backgrounds/mate/nature/{n}.jpg": n for n in _MATE},
    "lomiri-wallpapers-16.04": {f"usr/share/backgrounds/{n}.jpg": n for n in _LOMIRI16},
    "lomiri-wallpapers-20.04": {"usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg": "Kleiber_by_Lukas_Baubkus"},
    "lxqt-themes": {f"usr/share/lxqt/wallpapers/{f}": f.rsplit(".", 1)[0] for f in _LXQT},
}
NUM_PHOTOS = sum(map(len, PHOTOS.values()))  # 48


def _apt_download(packages: list[str], folder: Path) -> None:
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(
            f"apt-get is not available: the photos come from the Debian packages {', '.join(packages)}; "
            f"download their .deb files by hand into {folder} and run again")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", *packages]
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if r.returncode != 0 and ("Unable to locate" in r.stderr or "no installation candidate" in r.stderr):
        log.info("apt package lists are missing or stale: running apt-get update")
        update = ["apt-get", "update"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get", "update"]
        u = subprocess.run(update, capture_output=True, text=True)
        if u.returncode != 0:
            raise PermissionError(f"`{' '.join(update)}` failed ({u.stderr.strip().splitlines()[-1:]}); "
                                  "run `sudo apt-get update` once and retry")
        r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConnectionError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}")


def _find_deb(folder: Path, package: str) -> Path | None:
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _data_tar(deb: Path) -> tarfile.TarFile:
    """The package's file-system tarball, as a streaming TarFile."""
    if shutil.which("dpkg-deb"):
        out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(out), mode="r|")
    with open(deb, "rb") as f:  # an ar archive: 8-byte magic, then 60-byte headers + data (2-aligned)
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header); delete it and fetch again")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise ValueError(f"{deb} is zstd-compressed: install dpkg (dpkg-deb) to unpack it")
                return tarfile.open(fileobj=io.BytesIO(f.read(size)), mode="r|*")
            f.seek(size + size % 2, 1)
    raise ValueError(f"{deb} has no data.tar member; delete it and fetch again")


def _downscale_2x(data: bytes) -> Image.Image:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)


def fetch(dest: str | Path, debs: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Fetch the packages (cached in `debs`), write the 48 photos downscaled 2x as PNG into dest."""
    dest = Path(dest)
    debs = Path(debs) if debs else dest.parent / "debs"
    missing = [p for p in PHOTOS if _find_deb(debs, p) is None]
    if missing:
        log.info("downloading %s into %s", " ".join(missing), debs)
        _apt_download(missing, debs)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=NUM_PHOTOS, desc="photos", unit="img", disable=not progress)
    for package, wanted in PHOTOS.items():
        deb = _find_deb(debs, package)
        if deb is None:
            raise FileNotFoundError(f"no {package}_*.deb in {debs} after apt-get download")
        seen = set()
        with _data_tar(deb) as tar:
            for member in tar:
                path = member.name.lstrip("./")
                if path not in wanted or not member.isreg():
                    continue
                out = dest / f"{wanted[path]}.png"
                tmp = out.with_suffix(".tmp.png")
                _downscale_2x(tar.extractfile(member).read()).save(tmp, format="PNG")
                os.replace(tmp, out)
                written.append(out)
                seen.add(path)
                bar.update()
        for path in sorted(set(wanted) - seen):
            log.warning("%s: %s is not in %s (another package version?); skipped", package, path, deb.name)
    bar.close()
    if not written:
        raise FileNotFoundError(f"none of the {NUM_PHOTOS} photos were found in the packages in {debs}")
    log.info("wrote %d photos to %s", len(written), dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearsr.dev.photos", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="fetch the photos, downscaled 2x, as PNG into DEST")
    f.add_argument("dest")
    f.add_argument("--debs", default=None, help="where the .deb files are cached (default DEST/../debs)")
    a = sub.add_parser("all", help="fetch the photos and build shards with the shipped tags (make data)")
    a.add_argument("--photos", default="runs/data/photos")
    a.add_argument("--shards", default="runs/data/shards")
    a.add_argument("--debs", default=None)
    a.add_argument("--samples-per-shard", type=int, default=4)
    a.add_argument("--val-fraction", type=float, default=0.125, help="0.125 puts 6 of the 48 photos in val")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "fetch":
            fetch(args.dest, args.debs)
            return 0
        from linearsr.data.shards import build_shards

        photos = Path(args.photos)
        if len(list(photos.glob("*.png"))) < NUM_PHOTOS:
            fetch(photos, args.debs)
        m = build_shards(str(photos), args.shards, samples_per_shard=args.samples_per_shard,
                         val_fraction=args.val_fraction, tags=str(TAGS_FILE), overwrite=True)
        print(f"shards: {m['splits']['train']['samples']} train + {m['splits']['val']['samples']} val photos "
              f"in {args.shards} ({len(m['tags'])} distinct tags)")
        return 0
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        print(f"photos: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
