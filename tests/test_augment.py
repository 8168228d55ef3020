import torch

from sre2l_ray.config import AugmentConfig
from sre2l_ray.data.augment import crop_boxes, hashed_uniform, paste_boxes, plan_views, resized_crop


def test_hashed_uniform_is_a_pure_function_of_the_index() -> None:
    a = hashed_uniform(3, 1, torch.arange(100), 6)
    b = hashed_uniform(3, 1, torch.tensor([57, 2, 99]), 6)
    assert torch.equal(a[[57, 2, 99]], b)
    assert 0 <= float(a.min()) and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.05
    assert not torch.equal(a, hashed_uniform(3, 2, torch.arange(100), 6))
    assert not torch.equal(a, hashed_uniform(4, 1, torch.arange(100), 6))


def test_crop_boxes_stay_inside_and_respect_scale() -> None:
    u = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0))
    b = crop_boxes(u, (0.08, 1.0), (3 / 4, 4 / 3))
    assert bool(((b[:, 0] - b[:, 2] / 2) >= -1e-6).all() and ((b[:, 0] + b[:, 2] / 2) <= 1 + 1e-6).all())
    area = b[:, 2] * b[:, 3]
    assert float(area.min()) >= 0.08 * 0.7 and float(area.max()) <= 1.0 + 1e-6


def test_full_box_is_identity_and_flip_mirrors() -> None:
    x = torch.randn(2, 3, 8, 8)
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)
    assert torch.allclose(resized_crop(x, full, None, 8), x, atol=1e-5)
    flipped = resized_crop(x, full, torch.tensor([True, False]), 8)
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[1], x[1], atol=1e-5)


def test_view_plan_replays_and_cutmix_pastes_a_box() -> None:
    aug = AugmentConfig()
    p1 = plan_views(0, 5, torch.arange(10), aug, 16, 10, cutmix=1.0)
    p2 = plan_views(0, 5, torch.arange(10), aug, 16, 10, cutmix=1.0)
    assert torch.equal(p1.boxes, p2.boxes) and torch.equal(p1.mix_box, p2.mix_box)
    x, other = torch.zeros(10, 1, 16, 16), torch.ones(10, 1, 16, 16)
    mixed = paste_boxes(x, other, p1.mix_box, p1.mix_on)
    frac = mixed.mean(dim=(1, 2, 3))
    assert torch.allclose(frac, p1.mix_fraction(16), atol=1e-6)
