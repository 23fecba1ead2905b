"""The built-in models: shapes, gradients, causality, parameter and FLOP counts."""

from __future__ import annotations

import pytest
import torch

from launcher.models.gpt import GPT, GPTConfig
from launcher.models.resnet import BasicBlock, resnet18, resnet_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(**kw) -> GPT:
    cfg = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_gpt_forward_backward_shapes():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(idx[:, :5]).shape == (3, 5, 256)  # shorter than block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


def test_gpt_embeddings_tied_and_param_count():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    assert not any("lm_head" in k for k in model.state_dict())  # tied: one tensor, no alias in checkpoints
    idx = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        model.wte.weight[7].zero_()
        assert torch.all(model(idx)[..., 7] == 0)  # the logit of byte 7 is <h, wte[7]>
    d, layers, block = 32, 2, 16
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * (2 * d)
    expected = 256 * d + layers * per_layer + 2 * d  # wte (= lm_head) + blocks + ln_f; no wpe
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + block * d
    assert model.flops_per_token() == 6 * expected + 12 * layers * d * block


def test_gpt_dropout_only_in_training():
    torch.manual_seed(0)
    model = tiny_gpt(dropout=0.5)
    idx = torch.randint(0, 256, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_resnet18_is_the_cifar_variant():
    model = resnet18()
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256, 512]
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_resnet_tiny_forward_backward_and_channels_last():
    torch.manual_seed(0)
    model = resnet_tiny()
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        assert torch.allclose(model_cl(x.to(memory_format=torch.channels_last)), ref, atol=1e-4)
