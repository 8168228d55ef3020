import torch
import torch.nn.functional as F

from sre2l_ray.config import RecoverConfig
from sre2l_ray.models import create_model
from sre2l_ray.stages.recover import BNStatHooks, plan_shards, prepare_teacher, recover_shard


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("convnet", 4, 1, 16, depth=2, width=8)
    model.train()
    with torch.no_grad():  # give the running statistics something non-trivial to match
        for _ in range(5):
            model(torch.rand(32, 1, 16, 16) * 2)
    return prepare_teacher(model, RecoverConfig())


BOUNDS = (torch.full((1, 1, 1, 1), -1.0), torch.full((1, 1, 1, 1), 2.0))


def test_hook_statistics_equal_batch_norm_on_the_same_input() -> None:
    teacher = _teacher()
    x = torch.randn(6, 1, 16, 16)
    with BNStatHooks(teacher) as hooks:
        teacher(x)
        first = hooks.layers[0]
        feat = teacher.features[0](x)
        mean, var = hooks.stats[0]
        # F.batch_norm in training mode normalises with the biased variance: our statistics must reproduce it.
        ref = F.batch_norm(feat, None, None, training=True, eps=first.eps)
        ours = (feat - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + first.eps)
        assert torch.allclose(ref, ours, atol=1e-5)
        expected = torch.linalg.vector_norm(mean - first.running_mean) + torch.linalg.vector_norm(var - first.running_var)
        assert torch.allclose(hooks.terms[0], expected)
        assert torch.allclose(hooks.loss(10.0), 10 * hooks.terms[0] + hooks.terms[1])


def test_recover_loss_decreases_and_stays_in_pixel_range() -> None:
    teacher = _teacher()
    cfg = RecoverConfig(ipc=2, iterations=60, r_bn=1.0, jitter=2)
    shard = plan_shards(4, cfg)[0]
    with BNStatHooks(teacher) as hooks:
        x, log = recover_shard(teacher, hooks, shard, cfg, seed=0, bounds=BOUNDS, image_shape=(1, 16, 16), log_every=10)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert x.shape == (4, 1, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 2.0


def test_a_shard_is_bit_identical_when_recomputed() -> None:
    teacher = _teacher()
    cfg = RecoverConfig(ipc=2, iterations=5)
    shard = plan_shards(4, cfg)[1]
    with BNStatHooks(teacher) as hooks:
        a, _ = recover_shard(teacher, hooks, shard, cfg, seed=7, bounds=BOUNDS, image_shape=(1, 16, 16))
        b, _ = recover_shard(teacher, hooks, shard, cfg, seed=7, bounds=BOUNDS, image_shape=(1, 16, 16))
        c, _ = recover_shard(teacher, hooks, shard, cfg, seed=8, bounds=BOUNDS, image_shape=(1, 16, 16))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shards_cover_every_class_and_ipc_once() -> None:
    cfg = RecoverConfig(ipc=5, classes_per_batch=3, ipc_per_batch=2)
    shards = plan_shards(7, cfg)
    pairs = [t for s in shards for t in s.targets()]
    assert sorted(pairs) == [(c, k) for c in range(7) for k in range(5)]
    assert len({s.id for s in shards}) == len(shards)
    assert max(len(s.targets()) for s in shards) == 6
