"""Building WebDataset shards from an image folder, and the shard manifest.

Layout under the shard root (a local folder or any fsspec URL, e.g. s3://bucket/prefix):

    manifest.json             written LAST: shards, sample counts, bytes, sha256, tag counts
    train/shard-000000.tar    samples KEY.jpg|KEY.png (the HR bytes) + KEY.json (source, size, tags)
                              [+ KEY.lr.png: a real LR capture of the same scene, from --lr]
    val/shard-000000.tar

The manifest is the only entry point readers trust: it lets the loader notice a shard that
ended early. Rebuilding into a root that holds shards needs `overwrite=True`; the old manifest
is removed first, so during a rebuild (or after an interrupted one) nothing is readable, and
shards the new manifest does not list are deleted once it is in place.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile

from PIL import Image, ImageOps
from tqdm import tqdm

from linearsr.core.storage import filesystem, is_local, join, with_retries
from linearsr.core.util import IMAGE_EXTENSIONS, normalize_tags, stable_hash
from linearsr.data import pairs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "linearsr-shards/1"
SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")


def describe(e: BaseException) -> str:
    """'Type: message' of an exception, without Pillow's '<_io.BytesIO object at 0x...>' noise."""
    message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return f"{type(e).__name__}: {message}"


def read_shard_manifest(root: str, endpoint: str | None = None) -> dict:
    """The manifest of a shard root, checked. Missing: FileNotFoundError saying how to make one."""
    fs, path = filesystem(join(root, MANIFEST), endpoint)
    try:
        text = with_retries(lambda: fs.cat_file(path), f"read {join(root, MANIFEST)}", endpoint)
    except FileNotFoundError as e:
        why = f" ({e})" if "bucket" in str(e).lower() else ""
        raise FileNotFoundError(
            f"no {MANIFEST} under shard root {root}{why}: build shards there with `linearsr shards build SRC {root}` "
            "(an interrupted build leaves no manifest)") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{join(root, MANIFEST)} is not valid JSON ({e}); rebuild the shards") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{join(root, MANIFEST)} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the shards")
    return manifest


def shard_list(root: str, manifest: dict, split: str) -> list[tuple[str, int]]:
    """[(url, samples)] of one split, in manifest order."""
    return [(join(root, s["path"]), int(s["samples"])) for s in manifest["splits"][split]["shards"]]


# --------------------------------------------------------------------------- sources


def _sanitize(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"


def list_sources(src: str) -> list[tuple[str, str]]:
    """[(url, relative path)] of the images under src (recursive, sorted, hidden files skipped)."""
    fs, base = filesystem(src)
    if not fs.exists(base):
        raise FileNotFoundError(f"source {src} does not exist; give a folder of images or an fsspec URL")
    paths = [base] if fs.isfile(base) else fs.find(base)
    out = []
    for p in sorted(paths):
        rel = posixpath.relpath(p, base) if p != base else posixpath.basename(p)
        if any(part.startswith(".") for part in rel.split("/")) or not rel.lower().endswith(IMAGE_EXTENSIONS):
            continue
        out.append((p if is_local(src) else fs.unstrip_protocol(p), rel))
    return out


def normalize_tag_map(raw: dict, where: str = "tags") -> dict[str, list[str]]:
    """{name: [tags] or "a, b"} -> {name: [lower-case stripped tags]}; bad entries raise ValueError."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object {{image name: [tags]}}")
    out = {}
    for name, tags in raw.items():
        if isinstance(tags, str):
            tags = tags.split(",")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: entry {name!r} must be a list of strings or 'a, b'")
        out[name] = normalize_tags(tags)
    return out


def load_tags(path: str | None) -> dict[str, list[str]]:
    """A tags file: JSON object {name: [tags] or "a, b"}; name = relative path, file name or stem."""
    if not path:
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tags file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"tags file {path} is not valid JSON ({e})") from None
    return normalize_tag_map(raw, f"tags file {path}")


def _tags_for(rel: str, tags: dict[str, list[str]], used: set[str]) -> list[str]:
    name = posixpath.basename(rel)
    for candidate in (rel, name, name.rsplit(".", 1)[0]):
        if candidate in tags:
            used.add(candidate)
            return tags[candidate]
    return []


def prepare_image(data: bytes, max_side: int | None) -> tuple[bytes, str, tuple[int, int]]:
    """Check that an image decodes; keep JPEG/PNG bytes as they are unless it must be resized
    (longest side > max_side) or rotated (EXIF orientation), then re-encode as PNG.
    Returns (bytes, "jpg"|"png", (width, height))."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()  # raises on truncated / corrupt data
    orientation = img.getexif().get(0x0112, 1)
    too_big = max_side is not None and max(img.size) > max_side
    if fmt in ("JPEG", "PNG") and not too_big and orientation == 1:
        return data, "jpg" if fmt == "JPEG" else "png", img.size
    img = ImageOps.exif_transpose(img).convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png", img.size


# --------------------------------------------------------------------------- writing


class _Destination:
    """Files under the shard root: local writes are temp + rename, remote ones single PUTs."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = filesystem(root)
        self.local = is_local(root)
        self.fs.makedirs(self.base, exist_ok=True)

    def path(self, rel: str) -> str:
        return posixpath.join(self.base, rel) if not self.local else os.path.join(self.base, rel)

    def put_file(self, tmp: str, rel: str) -> None:
        if self.local:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            umask = os.umask(0)  # mkstemp made it 0600: give it a plain file's permissions
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, self.path(rel))
        else:
            with_retries(lambda: self.fs.put_file(tmp, self.path(rel)), f"upload {join(self.root, rel)}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.base if self.local else None)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if not self.local:
            try:
                self.put_file(tmp, rel)
            finally:
                os.unlink(tmp)
        else:
            self.put_file(tmp, rel)

    def shard_files(self) -> list[str]:
        out = []
        for split in SPLITS:
            d = self.path(split)
            if self.fs.isdir(d):
                out += [f"{split}/{posixpath.basename(p)}" for p in self.fs.ls(d, detail=False)
                        if SHARD_RE.match(posixpath.basename(p))]
        return sorted(out)

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel))


class _ShardWriter:
    """Writes one split's shards: `samples_per_shard` samples per tar, then hands it to the destination."""

    def __init__(self, dest: _Destination, split: str, samples_per_shard: int, workdir: str):
        self.dest, self.split, self.per_shard, self.workdir = dest, split, samples_per_shard, workdir
        self.shards: list[dict] = []
        self.tar = None
        self.count = self.paired = 0

    def _open(self) -> None:
        rel = f"{self.split}/shard-{len(self.shards):06d}.tar"
        folder = os.path.dirname(self.dest.path(rel)) if self.dest.local else self.workdir
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.rel, self.count, self.paired = rel, 0, 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, ext: str, image: bytes, meta: dict, lr_png: bytes | None = None) -> None:
        if self.tar is None:
            self._open()
        self._add(f"{key}.{ext}", image)
        if lr_png is not None:
            self._add(f"{key}.lr.png", lr_png)
            self.paired += 1
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.count += 1
        if self.count >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        sha, size = hashlib.sha256(), 0
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
                size += len(block)
        self.dest.put_file(self.tmp, self.rel)
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.shards.append({"path": self.rel, "samples": self.count, "paired": self.paired, "bytes": size,
                            "sha256": sha.hexdigest()})
        self.tar = None


def _lr_png(lr_fs, url: str, hr_size: tuple[int, int], scale: int | None) -> tuple[bytes, int]:
    """(PNG bytes, scale) of the LR partner of HR `rel`; ValueError naming the file for a bad pair."""
    raw = with_retries(lambda: lr_fs.cat_file(url), f"read {url}")
    data, ext, size = prepare_image(raw, None)
    s = pairs.scale_of(hr_size, size, scale)
    if ext != "png":
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    return data, s


def build_shards(src: str, dest: str, samples_per_shard: int = 64, val_fraction: float = 0.1,
                 max_side: int | None = None, tags: str | dict | None = None, seed: int = 0,
                 overwrite: bool = False, progress: bool = True, lr: str | None = None, scale: int | None = None,
                 allow_unpaired: bool = False) -> dict:
    """Build train/val shards of the images under `src` into `dest`; returns the manifest.

    The val split is chosen by a hash of each sample's key (the same image is always in the same
    split); `seed` only orders samples inside the splits. Unreadable images are skipped and listed
    in the manifest under "skipped". With `lr`, each HR image is stored with its real LR partner
    (same name up to the extension, `pairs.match`) as KEY.lr.png; every pair must have the same
    integer scale (`scale`, else the first pair's); bad pairs are skipped, warned and listed under
    "skipped", and with `allow_unpaired` an HR without a partner is kept as an HR-only sample."""
    if lr is not None and max_side is not None:
        raise ValueError("--max-side cannot be combined with --lr: resizing the HR images would break their pairs")
    if scale is not None and scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_side is not None and max_side < 8:
        raise ValueError(f"--max-side must be >= 8 pixels, got {max_side}")
    tag_map = normalize_tag_map(tags) if isinstance(tags, dict) else load_tags(tags)
    sources = list_sources(src)
    if not sources:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {src}")

    keys, plan = set(), []
    for url, rel in sources:
        key, n = _sanitize(rel), 2
        while key in keys:
            key, n = f"{_sanitize(rel)}_{n}", n + 1
        keys.add(key)
        is_val = stable_hash("val", key) < val_fraction * 2**64
        plan.append((url, rel, key, is_val))
    if val_fraction > 0 and len(plan) > 1 and not any(p[3] for p in plan):
        first = min(range(len(plan)), key=lambda i: stable_hash("val", plan[i][2]))
        plan[first] = plan[first][:3] + (True,)  # a val set of at least one image
    plan.sort(key=lambda p: stable_hash(seed, p[2]))
    partners, skipped = pairs.match(sources, list_sources(lr), lr, allow_unpaired) if lr else ({}, [])
    for bad in skipped:
        log.warning("skipping %s: %s", bad["source"], bad["error"])
    bad_hr = {b["source"] for b in skipped}
    plan = [p for p in plan if p[1] not in bad_hr]

    out = _Destination(dest)
    existing = out.shard_files()
    if out.fs.exists(out.path(MANIFEST)) or existing:
        if not overwrite:
            raise ValueError(f"{dest} already holds shards; pass --overwrite to replace them (or choose a new DEST)")
        out.remove(MANIFEST)  # from here until the new manifest exists, nothing under dest is readable

    used: set[str] = set()
    tag_counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="linearsr-shards-") as workdir:
        writers = {s: _ShardWriter(out, s, samples_per_shard, workdir) for s in SPLITS}
        src_fs, _ = filesystem(src)
        lr_fs = filesystem(lr)[0] if lr else None
        for url, rel, key, is_val in tqdm(plan, desc="shards", unit="img", disable=not progress):
            try:
                raw = with_retries(lambda: src_fs.cat_file(url), f"read {url}")
                image, ext, (w, h) = prepare_image(raw, max_side)
                lr_png = None
                if rel in partners:
                    lr_png, scale = _lr_png(lr_fs, partners[rel], (w, h), scale)
            except Exception as e:  # any undecodable / unreadable source or bad pair is listed, not fatal
                log.warning("skipping %s: %s", rel, describe(e))
                skipped.append({"source": rel, "error": describe(e)})
                continue
            sample_tags = _tags_for(rel, tag_map, used)
            for t in sample_tags:
                tag_counts[t] = tag_counts.get(t, 0) + 1
            meta = {"source": rel, "width": w, "height": h, "tags": sample_tags}
            writers["val" if is_val else "train"].add(key, ext, image, meta, lr_png)
        for w in writers.values():
            w.close()

    unused = sorted(set(tag_map) - used)
    if unused:
        log.warning("%d entries of the tags file matched no image, e.g. %s", len(unused), ", ".join(unused[:5]))
    splits = {s: {"samples": sum(x["samples"] for x in w.shards), "paired": sum(x["paired"] for x in w.shards),
                  "bytes": sum(x["bytes"] for x in w.shards), "shards": w.shards} for s, w in writers.items()}
    if splits["train"]["samples"] == 0:
        raise ValueError(f"no readable images under {src} went to the train split ({len(skipped)} skipped)")
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": src,
        "settings": {"samples_per_shard": samples_per_shard, "val_fraction": val_fraction, "max_side": max_side, "seed": seed,
                     "lr": lr, "lr_scale": scale if lr else None},
        "splits": splits,
        "tags": dict(sorted(tag_counts.items())),
        "skipped": skipped,
    }
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    listed = {s["path"] for w in writers.values() for s in w.shards}
    for rel in existing:
        if rel not in listed:
            out.remove(rel)
    log.info("wrote %d train + %d val samples (%d with a real LR) in %d shards to %s (%d skipped)",
             splits["train"]["samples"], splits["val"]["samples"], splits["train"]["paired"] + splits["val"]["paired"],
             len(listed), dest, len(skipped))
    return manifest


# --------------------------------------------------------------------------- verifying


class _HashingReader:
    """Passes reads through, hashing and counting the bytes (one streaming pass per shard)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_shard(url: str, entry: dict, endpoint: str | None) -> str | None:
    """What is wrong with one shard, in a phrase, or None."""
    from linearsr.core.storage import open_read

    try:
        f = open_read(url, endpoint)
    except FileNotFoundError:
        return "missing"
    with f:
        r = _HashingReader(f)
        exts: dict[str, set[str]] = {}
        try:
            with tarfile.open(fileobj=r, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    exts.setdefault(key, set()).add(ext)
        except tarfile.TarError as e:
            r.drain()
            return f"not a readable tar ({e}); {r.size} bytes, the manifest says {entry['bytes']}"
        r.drain()
    if r.size != entry["bytes"]:
        return f"{r.size} bytes, the manifest says {entry['bytes']} (cut short or replaced)"
    if r.sha.hexdigest() != entry["sha256"]:
        return "its sha256 differs from the manifest's (the bytes changed after the build)"
    samples = sum(1 for e in exts.values() if "json" in e and e & {x.lstrip(".") for x in IMAGE_EXTENSIONS})
    if samples != entry["samples"]:
        return f"{samples} complete samples (image + json), the manifest says {entry['samples']}"
    return None


def verify_shards(root: str, endpoint: str | None = None, progress: bool = True) -> dict:
    """Read every shard the manifest lists, end to end, and check it against the manifest: there,
    the recorded size and sha256, and the recorded number of complete samples. Returns
    {"shards", "samples", "bytes", "problems": [{"path", "problem"}]}; storage errors that outlive
    their retries propagate (they say nothing about the shard)."""
    manifest = read_shard_manifest(root, endpoint)
    entries = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]
    problems = []
    for entry in tqdm(entries, desc="verify", unit="shard", disable=not progress):
        problem = _check_shard(join(root, entry["path"]), entry, endpoint)
        if problem:
            log.debug("%s: %s", entry["path"], problem)
            problems.append({"path": entry["path"], "problem": problem})
    return {"shards": len(entries), "samples": sum(s["samples"] for s in entries),
            "bytes": sum(s["bytes"] for s in entries), "problems": problems}
