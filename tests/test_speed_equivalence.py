"""The recover speed-ups give the straightforward computation's results up to float noise."""

import shutil

import pytest
import torch

from sre2l_ray.config import RecoverConfig
from sre2l_ray.models import create_model
from sre2l_ray.stages.recover import BNStatHooks, bn_eval_with_stats, channel_mean_var, plan_shards, prepare_teacher, recover_shard


class VarMeanHooks(BNStatHooks):
    """The textbook BN-matching term: the layer's own forward, a forward hook taking torch.var_mean over (N, H, W)
    of its input, autograd's own backward."""

    def _attach(self, i: int, module):
        def hook(module, inputs, _out) -> None:
            var, mean = torch.var_mean(inputs[0].float(), dim=[0, 2, 3], unbiased=False)
            self.record(i, module, mean, var)

        return module.register_forward_hook(hook).remove


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_bn_with_stats_equals_bn_then_var_mean(channels_last: bool) -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = torch.randn(5, 6, 4, 3, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, mean, var = bn_eval_with_stats(bn, x)
    ref_var, ref_mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    assert torch.allclose(y, bn(x)) and torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    assert torch.autograd.gradcheck(lambda t: bn_eval_with_stats(bn, t), (x,))
    with BNStatHooks(bn) as hooks:
        assert torch.allclose(bn(x), y) and torch.allclose(hooks.stats[0][1], ref_var)
    assert "forward" not in bn.__dict__, "remove() restores the layer's own forward"


def _teacher(compile: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("convnet", 4, 3, 16, depth=2, width=8)
    model.train()
    with torch.no_grad():  # non-trivial running statistics to match
        for _ in range(5):
            model(torch.rand(32, 3, 16, 16) * 2)
    return prepare_teacher(model, RecoverConfig(compile=compile))


BOUNDS = (torch.full((1, 3, 1, 1), -1.0), torch.full((1, 3, 1, 1), 2.0))
CFG = RecoverConfig(ipc=1, iterations=20, r_bn=1.0, jitter=2)


def _recover(teacher: torch.nn.Module, hooks_cls=BNStatHooks, channels_last: bool = True, cfg: RecoverConfig = CFG) -> torch.Tensor:
    shard = plan_shards(4, cfg)[0]
    with hooks_cls(teacher) as hooks:
        x, _ = recover_shard(teacher, hooks, shard, cfg, seed=3, bounds=BOUNDS, image_shape=(3, 16, 16), channels_last=channels_last)
    return x


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_mean_var_matches_var_mean_values_and_gradients(channels_last: bool) -> None:
    x = (torch.randn(5, 6, 4, 3, dtype=torch.float64) * 3 + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mean, var = channel_mean_var(x)
    ref_var, ref_mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    w = torch.randn(6, dtype=torch.float64)
    g = torch.autograd.grad((mean * w).sum() + (var * w.flip(0)).sum(), x)[0]
    g_ref = torch.autograd.grad((ref_mean * w).sum() + (ref_var * w.flip(0)).sum(), x)[0]
    assert torch.allclose(g, g_ref)
    assert torch.autograd.gradcheck(lambda t: channel_mean_var(t), (x,))


def test_fused_hooks_recover_the_same_images_as_var_mean_hooks() -> None:
    teacher = _teacher()
    fast = _recover(teacher)
    plain = _recover(teacher, VarMeanHooks)
    assert torch.allclose(fast, plain, atol=1e-4), float((fast - plain).abs().max())


def test_channels_last_and_contiguous_recover_the_same_images() -> None:
    teacher = _teacher()
    a = _recover(teacher, channels_last=True)
    b = _recover(teacher.to(memory_format=torch.contiguous_format), channels_last=False)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_teacher_recovers_the_same_images_as_eager() -> None:
    cfg = CFG.model_copy(update={"iterations": 5})
    eager = _recover(_teacher(), cfg=cfg)
    compiled = _recover(_teacher(compile=True), cfg=cfg.model_copy(update={"compile": True}))
    assert torch.allclose(eager, compiled, atol=1e-4), float((eager - compiled).abs().max())


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_relabel_trains_the_same_student_as_eager(tmp_path) -> None:
    from sre2l_ray.config import build_config
    from sre2l_ray.data.datasets import ImageSet
    from sre2l_ray.stages.relabel import train_student

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(8) % 4,
                    ["a", "b", "c", "d"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    students = []
    for compile in (False, True):
        cfg = build_config({"relabel": {"model": {"name": "convnet", "depth": 2, "width": 8}, "epochs": 2, "batch_size": 4, "compile": compile}})
        students.append(train_student(cfg, data, _teacher(), torch.device("cpu"), tmp_path / str(compile)).state_dict())
    eager, compiled = students
    assert eager.keys() == compiled.keys(), "in-place compile keeps the checkpoint keys"
    assert all(torch.allclose(eager[k].float(), compiled[k].float(), atol=1e-4) for k in eager)
