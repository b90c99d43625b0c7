"""Real LR/HR pairs: matching two folders by name and checking the scale between them.

A pair is an HR image and an LR image with the same relative path up to the extension
(`a/b.png` in the HR folder, `a/b.jpg` in the LR folder). A bad pair -- an HR without an LR, an LR
without an HR, sizes that are not an integer multiple, or another scale than the others -- is one
sentence naming the file; the callers count and report it, never drop it silently."""

from __future__ import annotations

import posixpath


def stem(rel: str) -> str:
    """A relative path without its extension: the name two partners share."""
    head, tail = posixpath.split(rel)
    return posixpath.join(head, tail.rsplit(".", 1)[0]) if "." in tail else rel


def match(hr: list[tuple[str, str]], lr: list[tuple[str, str]], lr_dir: str,
          allow_unpaired: bool = False) -> tuple[dict[str, str], list[dict]]:
    """({HR relative path: LR url}, bad pairs [{"source", "error"}]) of two listings [(url, rel)].
    With allow_unpaired an HR without an LR is kept as an HR-only sample (not a bad pair)."""
    lr_by_stem: dict[str, list[tuple[str, str]]] = {}
    for url, rel in lr:
        lr_by_stem.setdefault(stem(rel), []).append((url, rel))
    hr_stems = {stem(rel) for _, rel in hr}
    pairs, bad = {}, []
    for _, rel in hr:
        found = lr_by_stem.get(stem(rel), [])
        if len(found) == 1:
            pairs[rel] = found[0][0]
        elif len(found) > 1:
            bad.append({"source": rel, "error": f"{len(found)} LR images under {lr_dir} match it "
                        f"({', '.join(r for _, r in found)}); keep one"})
        elif not allow_unpaired:
            bad.append({"source": rel, "error": f"no LR image named {stem(rel)}.* under {lr_dir} (missing partner)"})
    for url, rel in lr:
        if stem(rel) not in hr_stems:
            bad.append({"source": f"{lr_dir}/{rel}", "error": f"LR image without an HR image named {stem(rel)}.* (missing partner)"})
    return pairs, bad


def scale_of(hr_size: tuple[int, int], lr_size: tuple[int, int], want: int | None) -> int:
    """The integer scale from LR (w, h) to HR (w, h); ValueError (the caller names the file) when
    there is none or it is not `want`."""
    (hw, hh), (lw, lh) = hr_size, lr_size
    if lw < 1 or lh < 1 or hw % lw or hh % lh or hw // lw != hh // lh:
        raise ValueError(f"HR {hw}x{hh} is not an integer multiple of LR {lw}x{lh} (non-integer scale)")
    s = hw // lw
    if want is not None and s != want:
        raise ValueError(f"HR {hw}x{hh} / LR {lw}x{lh} is x{s}, the other pairs are x{want}")
    return s
