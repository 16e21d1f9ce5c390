"""Model registry: shapes, backward, channel/head adaptation, checkpointing, initial weights."""
from __future__ import annotations

import pytest
import torch
import torchvision

from configs.schema import TORCHVISION_MODELS, ModelConfig
from ml.models import build_model


def test_every_registered_torchvision_name_exists():
    known = set(torchvision.models.list_models(module=torchvision.models))
    assert not set(TORCHVISION_MODELS) - known


@pytest.mark.parametrize("name, size", [("small_cnn", 16), ("mlp", 16), ("resnet18", 16),
                                        ("mobilenet_v3_small", 32), ("efficientnet_b0", 32)])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape_and_backward(name, size, channels):
    model = build_model(ModelConfig(name=name, dropout=0.1), num_classes=7, in_channels=channels)
    x = torch.randn(4, channels, size, size)
    out = model(x)
    assert out.shape == (4, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_channels_last_forward_matches():
    model = build_model(ModelConfig(name="small_cnn"), 10, 3).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_grad_checkpointing_gives_same_grads_and_bn_stats(name):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name=name), 10, 1)
    ckpt = build_model(ModelConfig(name=name), 10, 1, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 16, 16)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    # recomputation in backward must not update BatchNorm running stats a second time
    for (n, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n


def test_torchvision_dropout_keeps_plain_state_dict_keys():
    model = build_model(ModelConfig(name="resnet18", dropout=0.5), 10, 3)
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)                   # dropout active in train mode
    model.eval()
    assert torch.equal(model(x), model(x))


def test_initial_weights_from_local_file(tmp_path):
    src = build_model(ModelConfig(name="small_cnn"), 10, 1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    loaded = build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "w.pt")), 10, 1)
    for a, b in zip(src.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    # a different head is kept at its init; the backbone still loads
    other = build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "w.pt")), 5, 1)
    assert torch.equal(other.features[0][0][0].weight, src.features[0][0][0].weight)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "missing.pt")), 10, 1)


def test_unknown_model_and_bad_channels():
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="lenet"), 10, 1)
    with pytest.raises(ValueError, match="in_channels"):
        build_model(ModelConfig(name="mlp"), 10, 4)
