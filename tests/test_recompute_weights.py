"""``QuantizerConfig.recompute_weights``: weight quantizers recomputed in the backward pass (``torch.utils.checkpoint``)
give every method the same outputs and gradients while keeping far less for the backward pass; on by default from
``RECOMPUTE_AUTO_PARAMS`` quantized weights; not part of a run's identity (a run resumes either way)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqc import pipeline
from mpqc.config import CompileConfig, QuantizerConfig
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.quantizers import METHODS, get_method


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def _quantized(method: str, recompute: bool | None):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm, _ = pipeline.trace(Net(), (x,))
    config = QuantizerConfig(recompute_weights=recompute)
    return pipeline.quantize(gm, get_method(method), config, (x,)), x


def _step(gm, x) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, gradients and the bytes the forward pass saved for the backward pass."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    gm.train()
    torch.manual_seed(3)  # SDQ draws bits at random: the same draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = gm(x)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in gm.named_parameters() if p.grad is not None}
    return out.detach(), grads, sum(saved)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_recomputed_weight_quantizers_give_the_same_outputs_and_gradients(method):
    kept, recomputed = _quantized(method, False), _quantized(method, True)
    out_kept, grads_kept, bytes_kept = _step(*kept)
    out_recomputed, grads_recomputed, bytes_recomputed = _step(*recomputed)
    assert torch.equal(out_kept, out_recomputed)
    assert grads_kept.keys() == grads_recomputed.keys() and len(grads_kept) > 6
    for name, grad in grads_kept.items():
        torch.testing.assert_close(grads_recomputed[name], grad, rtol=1e-6, atol=0, msg=name)
    weights = sum(layer.module.weight.numel() * 4 for layer in quantized_layers(kept[0]))
    # kept: several copies of each weight (a quantizer's intermediates); recomputed: the weights as the layers read
    # them, the quantizers' intermediates gone
    assert bytes_kept - bytes_recomputed > weights, (bytes_kept, bytes_recomputed, weights)


def test_recompute_is_on_by_default_from_the_threshold_and_off_below(monkeypatch):
    import mpqc.passes.insert_quantizers as insert

    gm, _ = _quantized("dq", None)
    assert not any(layer.module.recompute_weight for layer in quantized_layers(gm))
    weights = sum(layer.module.weight.numel() for layer in quantized_layers(gm))
    monkeypatch.setattr(insert, "RECOMPUTE_AUTO_PARAMS", weights)
    gm, _ = _quantized("dq", None)
    assert all(layer.module.recompute_weight for layer in quantized_layers(gm))
    gm, _ = _quantized("dq", False)
    assert not any(layer.module.recompute_weight for layer in quantized_layers(gm))


def test_recompute_is_not_part_of_a_runs_identity():
    on = CompileConfig(quantizers=QuantizerConfig(recompute_weights=True))
    assert on.identity() == CompileConfig().identity()
    assert CompileConfig(seed=1).identity() != CompileConfig().identity()


@pytest.mark.parametrize("flag, expected", [([], None), (["--recompute-weights"], True),
                                            (["--no-recompute-weights"], False)])
@pytest.mark.parametrize("command", ["compile", "sweep"])
def test_the_cli_takes_the_choice(command, flag, expected):
    from mpqc.cli import _parser

    args = _parser().parse_args([command, "--model", "m.py:f", "--data", "digits", "--budget", "avg-bits=4",
                                 "--out", "runs/x", *flag])
    assert args.recompute_weights is expected
