"""The TAG tagger network: it learns tags from LR crops of real photos; save/load; predict."""

import pytest
import torch
import torch.nn.functional as F

from linearsr.model.tagger import Tagger, build_vocab

TAGS = {"astronaut": ["person", "flag"], "coffee": ["cup", "table"], "chelsea": ["cat", "fur"]}


def crops(img: torch.Tensor, n: int, x_lo: float, x_hi: float, gen) -> torch.Tensor:
    """n random 96x96 crops whose left edge lies in [x_lo, x_hi) of the width, as 24x24 LR."""
    _, h, w = img.shape
    out = []
    for _ in range(n):
        y = int(torch.randint(0, h - 96, (1,), generator=gen))
        x = int(x_lo * (w - 96) + torch.rand(1, generator=gen) * (x_hi - x_lo) * (w - 96))
        out.append(img[:, y : y + 96, x : x + 96])
    return F.interpolate(torch.stack(out), size=(24, 24), mode="bicubic", antialias=True).clamp(0, 1)


@pytest.fixture(scope="module")
def photos():
    skd = pytest.importorskip("skimage.data")
    return {k: torch.from_numpy(getattr(skd, k)().copy()).permute(2, 0, 1).float() / 255 for k in TAGS}


def test_tagger_learns_tags_of_held_out_crops(photos, one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab = build_vocab([t for t in TAGS.values()] * 2)
    tagger = Tagger(vocab, width=8, image_size=32)
    opt = torch.optim.Adam(tagger.parameters(), lr=3e-3)
    names = list(TAGS)
    for _ in range(60):
        lr = torch.cat([crops(photos[k], 4, 0.0, 0.6, gen) for k in names])  # left part of each photo
        tags = [TAGS[k] for k in names for _ in range(4)]
        opt.zero_grad()
        tagger.loss(lr, tags).backward()
        opt.step()
    test = torch.cat([crops(photos[k], 10, 0.7, 1.0, gen) for k in names])  # the unseen right part
    predicted = tagger.predict(test, max_tags=2, threshold=0.5)
    truth = [set(TAGS[k]) for k in names for _ in range(10)]
    accuracy = sum(set(p) == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy > 0.7  # chance of guessing both tags of one of three photos is 1/3 at best


def test_save_load_predict(tmp_path):
    tagger = Tagger(["Cat", "dog", "grass"], width=4, image_size=16)
    assert tagger.vocab == ["cat", "dog", "grass"]
    with torch.no_grad():
        tagger.head.bias.copy_(torch.tensor([3.0, 1.0, -3.0]))
        tagger.head.weight.zero_()
    lr = torch.rand(2, 3, 10, 13)
    assert tagger.predict(lr, max_tags=8, threshold=0.5) == [["cat", "dog"]] * 2
    assert tagger.predict(lr, max_tags=1, threshold=0.5) == [["cat"]] * 2
    assert tagger.predict(lr, max_tags=8, threshold=0.9) == [["cat"]] * 2
    path = tagger.save(tmp_path / "tagger")
    loaded = Tagger.load(path)
    assert loaded.vocab == tagger.vocab
    torch.testing.assert_close(loaded(lr), tagger.eval()(lr))
    assert tagger.targets([["dog", "unknown"]]).tolist() == [[0.0, 1.0, 0.0]]


def test_vocab_and_errors(tmp_path):
    assert build_vocab([["a", "b"], ["A", "c"], ["b"]], min_count=2) == ["a", "b"]
    with pytest.raises(ValueError, match="non-empty tag vocabulary"):
        Tagger([])
    with pytest.raises(FileNotFoundError, match="tagger metadata"):
        Tagger.load(tmp_path / "none.safetensors")
