"""The network's data path, shapes and conditioning, on the cpu_tiny preset."""

import pytest
import torch
import torch.nn.functional as F

from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR


def tiny(**kw) -> LinearSR:
    torch.manual_seed(0)
    return LinearSR(ModelConfig.preset("cpu_tiny", width=32, depth=2, heads=2, **kw))


def randomise(model: LinearSR) -> LinearSR:
    """Give the zero-initialised heads and gates non-zero weights, as after some training."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("patch", [1, 2])
def test_any_size_is_padded_and_cropped_back(patch):
    model = tiny(patch_size=patch)
    lr = torch.rand(2, 3, 13, 11)
    hr = torch.rand(2, 3, 52, 44)
    cond = model.encode_condition(lr)
    assert cond.shape[-2] * model.ae.factor % (4 * patch) == 0
    x0 = model.target(hr, lr)
    assert x0.shape == cond.shape
    torch.testing.assert_close(model.decode(x0, lr), hr, atol=1e-5, rtol=0)  # lossless round trip
    loss = model.loss(hr, lr, [["cat"], []], torch.tensor([0.3, 0.9]))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_fresh_model_one_step_estimate_is_bicubic():
    model = tiny().eval()
    lr = torch.rand(1, 3, 8, 8)
    cond = model.encode_condition(lr)
    x1 = torch.randn_like(cond)
    x0_hat = x1 - model.velocity(x1, 1.0, cond, [[]])
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(model.decode(x0_hat, lr), up, atol=1e-6, rtol=0)


def test_wrong_hr_size_and_unpadded_grid_are_errors():
    model = tiny(patch_size=2)
    with pytest.raises(ValueError, match="is not lr"):
        model.target(torch.rand(1, 3, 30, 32), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="patch_size=2"):
        model(torch.randn(1, 48, 3, 4), torch.tensor([0.5]), torch.randn(1, 48, 3, 4), [[]])


def test_every_parameter_learns_after_a_few_steps():
    model = tiny(tag_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # any non-zero gradient moves a weight
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(4):  # zero-initialised heads and gates open up one layer per step
        opt.zero_grad()
        model.loss(hr, lr, [["cat", "dog"], ["grass"]], torch.tensor([0.2, 0.7])).mean().backward()
        opt.step()
    frozen = [k for k, v in model.state_dict().items() if torch.equal(v, before[k]) and "tag_embed.embed" not in k]
    assert frozen == []


def test_tags_and_guidance_change_the_velocity():
    model = randomise(tiny()).eval()
    x, cond = torch.randn(1, 48, 6, 6), torch.randn(1, 48, 6, 6)
    v_none = model.velocity(x, 0.5, cond, [[]])
    v_cat = model.velocity(x, 0.5, cond, [["cat"]])
    v_guided = model.velocity(x, 0.5, cond, [["cat"]], guidance=3.0)
    assert not torch.allclose(v_none, v_cat)
    torch.testing.assert_close(v_guided, v_none + 3.0 * (v_cat - v_none), atol=1e-5, rtol=1e-5)
    # the same tag spelled differently is the same tag; empty tags ignore guidance
    torch.testing.assert_close(model.velocity(x, 0.5, cond, [[" Cat", "cat"]]), v_cat)
    torch.testing.assert_close(model.velocity(x, 0.5, cond, [[]], guidance=3.0), v_none)


def test_tag_dropout_only_in_train_mode():
    model = randomise(tiny(tag_dropout=1.0))
    hr, lr, t = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 4, 4), torch.tensor([0.5])
    noise = torch.randn(1, 48, 4, 4)
    dropped = model.train().loss(hr, lr, [["cat"]], t, noise)
    torch.testing.assert_close(dropped, model.eval().loss(hr, lr, [[]], t, noise))
    assert not torch.allclose(dropped, model.loss(hr, lr, [["cat"]], t, noise))


def test_batch_elements_are_independent():
    model = randomise(tiny()).eval()
    x, cond = torch.randn(3, 48, 5, 7), torch.randn(3, 48, 5, 7)
    t = torch.tensor([0.1, 0.5, 0.9])
    v = model(x, t, cond, [["a"], [], ["b"]])
    torch.testing.assert_close(v[1:2], model(x[1:2], t[1:2], cond[1:2], [[]]), atol=1e-5, rtol=1e-5)


def test_bf16_forward_is_finite():
    model = randomise(tiny()).to(torch.bfloat16).eval()
    x = torch.randn(1, 48, 16, 16, dtype=torch.bfloat16)
    v = model(x, torch.tensor([0.5]), x, [["cat"]])
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    # fp32 images and times drive the bf16 model as a trainer would feed it
    loss = model.train().loss(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8), [[], ["a"]], torch.tensor([0.2, 0.9]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
