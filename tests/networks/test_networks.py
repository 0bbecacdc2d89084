"""The shared UNet: shapes in 2D/3D, skip modes, learned variance, timestep use, TorchScript export."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks.activation import Swish

from medad.networks import AnomalyUNet, timestep_embedding
from tests.helpers import random_unet


def small(**kw):
    defaults = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16, 32), num_res_blocks=1,
                    attention_levels=(False, True, True), num_head_channels=8)
    defaults.update(kw)
    return AnomalyUNet(**defaults)


@pytest.mark.parametrize("skip_mode", ["concat", "add"])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_shapes_2d(skip_mode, norm):
    net = small(skip_mode=skip_mode, norm=norm).eval()
    out = net(torch.rand(2, 3, 16, 24), torch.tensor([3, 500]))
    assert out.shape == (2, 3, 16, 24)


def test_shapes_3d_and_per_level_blocks():
    net = AnomalyUNet(3, 1, 2, channels=(4, 8), num_res_blocks=(1, 2), attention_levels=(False, True), num_head_channels=4)
    assert net(torch.rand(1, 1, 8, 8, 8), torch.tensor([1])).shape == (1, 2, 8, 8, 8)


def test_learned_variance_doubles_output():
    assert small(learned_variance=True)(torch.rand(1, 3, 16, 16), torch.tensor([1])).shape == (1, 6, 16, 16)


def test_timestep_changes_output_only_when_conditioned():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    conditioned = small().eval()
    # the output conv is not zero-initialised, so a different timestep must change the prediction
    assert not torch.allclose(conditioned(x, torch.tensor([1])), conditioned(x, torch.tensor([900])))
    plain = small(with_timestep=False).eval()
    assert torch.equal(plain(x, torch.tensor([1])), plain(x, torch.tensor([900])))
    assert torch.equal(plain(x), plain(x, None))


def test_sigmoid_output_in_unit_range():
    out = small(with_timestep=False, output_activation="sigmoid")(torch.randn(1, 3, 16, 16) * 10)
    assert out.min() >= 0 and out.max() <= 1


def test_indivisible_size_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        small()(torch.rand(1, 3, 18, 16))


def test_torchscript_matches_eager():
    net = small(learned_variance=True).eval()
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([0, 999])
    scripted = torch.jit.script(net)
    assert torch.allclose(scripted(x, t), net(x, t), atol=1e-6)
    # exported too, so ddpm_kl's feature term works on a TorchScript model
    for a, b in zip(scripted.encoder_features(x, t), net.encoder_features(x, t)):
        assert torch.allclose(a, b, atol=1e-6)


def test_encoder_features_one_per_level():
    features = small().encoder_features(torch.rand(1, 3, 16, 16))
    assert [tuple(f.shape[1:]) for f in features] == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 5]), 4, max_period=10000)
    # frequencies exp(-log(1e4) * [0, 1] / 2) = [1, 0.01]
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [torch.cos(torch.tensor(5.0)), torch.cos(torch.tensor(0.05)),
                                                  torch.sin(torch.tensor(5.0)), torch.sin(torch.tensor(0.05))]])
    assert torch.allclose(emb, expected, atol=1e-6)


def test_residual_output_starts_as_identity_and_learns_a_change():
    torch.manual_seed(0)
    net = small(output_activation="residual")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(net(x, torch.tensor([1, 2])), x)  # untrained: exactly "do nothing"
    target = x.clone()
    target[:, :, 4:8, 4:8] = 0.0
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    start = torch.nn.functional.mse_loss(net(x, torch.tensor([1, 2])), target).item()
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(net(x, torch.tensor([1, 2])), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * start  # the zero-initialised head still receives gradients
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        small(out_channels=1, output_activation="residual")
    torch.jit.script(net)



def test_swish_runs_as_one_silu_kernel_with_the_same_values():
    net = random_unet()
    assert any(isinstance(m, torch.nn.SiLU) for m in net.modules())
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        fused = net(x)
        for module in list(net.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.SiLU):
                    setattr(module, name, Swish())
        torch.testing.assert_close(net(x), fused, atol=1e-6, rtol=1e-5)
