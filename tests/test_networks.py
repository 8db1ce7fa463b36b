"""Network construction, padding of odd sizes, and local weight files."""

import pytest
import torch
from torch import nn

from defectseg.models.networks import PadToMultiple, build_network, load_weights


class PixelNet(nn.Module):
    """A per-pixel network: its output at a pixel depends only on that pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
        return self.conv(x)


@pytest.mark.parametrize("size", [(200, 200), (37, 53), (32, 64), (1, 5)])
def test_padding_round_trips_odd_sizes(size):
    torch.manual_seed(0)
    net = PixelNet()
    x = torch.randn(2, 3, *size)
    out = PadToMultiple(net, 32)(x)
    assert out.shape == (2, 2, *size)
    torch.testing.assert_close(out, net.conv(x))


def test_smp_network_on_200x200_keeps_size():
    net = PadToMultiple(build_network("Unet", "resnet18", 3, 1, 3), 32).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 200, 200)).shape == (1, 3, 200, 200)


def test_unknown_architecture_and_encoder_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown architecture 'Unett'.*Unet"):
        build_network("Unett")
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet19'.*resnet18"):
        build_network("Unet", "resnet19")


def test_load_weights_full_encoder_and_errors(tmp_path):
    torch.manual_seed(0)
    source = build_network("Unet", "resnet18", 3, 3, 2)
    target = build_network("Unet", "resnet18", 3, 3, 2)
    full = tmp_path / "full.pt"
    torch.save(source.state_dict(), full)
    assert load_weights(target, full) == "network"
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key

    other = build_network("Unet", "resnet18", 3, 3, 2)
    enc = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), enc)
    assert load_weights(other, enc) == "encoder"
    assert torch.equal(other.encoder.conv1.weight, source.encoder.conv1.weight)
    assert not torch.equal(other.segmentation_head[0].weight, source.segmentation_head[0].weight)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(other, tmp_path / "missing.pt")
    wrong = build_network("Unet", "resnet18", 3, 3, 5)
    with pytest.raises(ValueError, match="shapes"):
        load_weights(wrong, full)
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="no tensor"):
        load_weights(other, junk)


@pytest.mark.parametrize("arch,depth", [("Unet", 3), ("PSPNet", 3), ("FPN", 5)])
def test_every_parameter_gets_a_gradient(arch, depth):
    """Unused encoder stages are pruned (DDP refuses parameters without gradients)."""
    net = build_network(arch, "resnet18", depth, 3, 3)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []
    if depth == 3:
        assert not any(name.startswith("encoder.layer4") for name, _ in net.named_parameters())
