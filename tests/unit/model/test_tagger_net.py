"""The TAG tagger network: windows and pooling, per-tag thresholds, save/load."""

import math

import pytest
import torch

from linearsr.model.tagger import DEGRADATION, OBJECT, Tagger, lse_pool, windows


def fixed(vocab, bias, thresholds, kinds=None) -> Tagger:
    """A tagger whose logits are `bias` for any input."""
    tagger = Tagger(vocab, kinds, thresholds, crop=16, upsample=2)
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.copy_(torch.tensor(bias))
    return tagger.eval()


def test_windows_cover_the_image_and_pad_a_small_one():
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).view(3, 20, 30)
    w = windows(img, 8)
    assert w.shape == (3 * 4, 3, 8, 8)  # rows at 0, 8, 12; columns at 0, 8, 16, 22
    torch.testing.assert_close(w[-1], img[:, 12:20, 22:30])  # the last one ends at the corner
    assert windows(torch.rand(3, 5, 6), 8).shape == (1, 3, 8, 8)


def test_lse_pool_is_a_smooth_max():
    logits = torch.tensor([[-4.0, 1.0], [2.0, 1.0], [0.0, 1.0]])
    pooled = lse_pool(logits, 4.0)
    assert (pooled[0] > logits[:, 0].mean()) and (pooled[0] < logits[:, 0].max())
    torch.testing.assert_close(pooled[1], torch.tensor(1.0))  # equal windows pool to their value
    torch.testing.assert_close(lse_pool(logits[:1], 4.0), logits[0])  # one window pools to itself


def test_object_tags_pool_by_smooth_max_degradation_tags_by_mean():
    tagger = fixed(["sky", "strong blur"], [0.0, 0.0], [0.0, 0.0], kinds=[OBJECT, DEGRADATION])
    logits = torch.tensor([[3.0, 3.0], [-3.0, -3.0], [-3.0, -3.0]])
    pooled = tagger.pool(logits)
    assert pooled[0] > 0 > pooled[1]  # sky in one window of three is sky in the image; blur is not
    torch.testing.assert_close(pooled[1], torch.tensor(-1.0))


def test_each_tag_is_emitted_from_its_own_threshold():
    tagger = fixed(["Sky", "grass", "cat"], [2.0, 0.5, 3.0], [1.0, 1.0, math.inf])
    assert tagger.vocab == ["sky", "grass", "cat"] and tagger.emitted == ["sky", "grass"]
    crops = torch.rand(2, 3, 16, 16)
    assert tagger.tag_crops(crops) == [["sky"], ["sky"]]  # grass below its threshold, cat switched off
    assert tagger.predict(torch.rand(1, 3, 20, 13)) == [["sky"]]
    # one probability for every tag, most confident first, capped
    assert tagger.predict(torch.rand(1, 3, 20, 13), threshold=0.5) == [["cat", "sky", "grass"]]
    assert tagger.predict(torch.rand(1, 3, 20, 13), max_tags=1, threshold=0.5) == [["cat"]]


def test_save_load_round_trip(tmp_path):
    tagger = fixed(["sky", "heavy noise"], [2.0, -1.0], [1.5, math.inf], kinds=[OBJECT, DEGRADATION])
    tagger.meta = {"precision_target": 0.8}
    with torch.no_grad():
        tagger.feat_mean.fill_(0.25)
    path = tagger.save(tmp_path / "tagger")
    loaded = Tagger.load(path)
    assert (loaded.vocab, loaded.kinds, loaded.crop, loaded.upsample) == (tagger.vocab, tagger.kinds, 16, 2)
    assert loaded.thresholds.tolist() == [1.5, math.inf] and loaded.meta == {"precision_target": 0.8}
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), tagger(x))


def test_bad_tagger_files_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="non-empty tag vocabulary"):
        Tagger([])
    with pytest.raises(ValueError, match="kinds must name"):
        Tagger(["sky"], kinds=["colour"])
    with pytest.raises(ValueError, match="crop x upsample must be >= 32"):
        Tagger(["sky"], crop=8, upsample=2)
    with pytest.raises(FileNotFoundError, match="tagger metadata"):
        Tagger.load(tmp_path / "none.safetensors")
    (tmp_path / "old.json").write_text('{"kind": "tagger", "vocab": ["sky"], "width": 32}')
    with pytest.raises(ValueError, match="not a linearsr-tagger/2 file.*linearsr tagger train"):
        Tagger.load(tmp_path / "old.safetensors")
