"""Real-photo fetching (from local .deb files: tests never download), shipped tags, dev set."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from linearsr.dev import devset, photos


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_deb(path: Path, files: dict[str, bytes]) -> None:
    """A minimal Debian package: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    control = _tar_xz({"./control": b"Package: fake\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"})
    data = _tar_xz({f"./{k}": v for k, v in files.items()})
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.xz", control)
                     + _ar_member("data.tar.xz", data))


def _jpeg(w: int, h: int, color=(200, 80, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("dpkg", [True, False], ids=["dpkg-deb", "python-ar"])
def test_fetch_picks_the_listed_photos_and_halves_them(tmp_path, monkeypatch, dpkg):
    debs = tmp_path / "debs"
    debs.mkdir()
    for package, wanted in photos.PHOTOS.items():
        listed = sorted(wanted)
        files = {p: _jpeg(64, 40) for p in listed[:2]}  # two of the listed photos per package
        files["usr/share/doc/readme.jpg"] = _jpeg(8, 8)  # not listed: must be ignored
        _fake_deb(debs / f"{package}_1.0_all.deb", files)
    real_which = photos.shutil.which
    monkeypatch.setattr(photos.shutil, "which", lambda c: None if c == "dpkg-deb" and not dpkg else real_which(c))
    if dpkg and real_which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    written = photos.fetch(tmp_path / "photos", debs=debs, progress=False)
    expected = {wanted[p] for wanted in photos.PHOTOS.values() for p in sorted(wanted)[:2]}
    assert {p.stem for p in written} == expected and len(written) == len(expected) == 9
    with Image.open(written[0]) as img:
        assert img.format == "PNG" and img.size == (32, 20)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == sorted(f"{n}.png" for n in expected)


def test_fetch_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(photos.shutil, "which", lambda c: None)
    with pytest.raises(FileNotFoundError, match="apt-get is not available.*download their .deb files by hand"):
        photos.fetch(tmp_path / "photos", debs=tmp_path / "debs", progress=False)


def test_shipped_tags_cover_exactly_the_48_photos():
    tags = json.loads(photos.TAGS_FILE.read_text())
    names = {n for wanted in photos.PHOTOS.values() for n in wanted.values()}
    assert photos.NUM_PHOTOS == 48 and set(tags) == names
    assert all(3 <= len(t) <= 6 and all(x == x.strip().lower() and x for x in t) for t in tags.values())
    assert sum(len(t) for t in tags.values()) > len({x for t in tags.values() for x in t})  # tags recur: learnable


def test_devset_writes_six_tagged_pngs(tmp_path):
    paths = devset.write(tmp_path / "dev")
    tags = json.loads((tmp_path / "dev" / "tags.json").read_text())
    assert {p.stem for p in paths} == set(tags) == {"astronaut", "coffee", "chelsea", "rocket", "china", "flower"}
    for p in paths:
        with Image.open(p) as img:
            assert img.mode == "RGB" and 300 <= min(img.size) and max(img.size) <= 640
