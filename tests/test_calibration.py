"""Where quantizer ranges start (mpqc.quantizers.calibration): MSE-searched per-channel weight clipping for every
method's weight quantizer, percentile activation ranges that ignore outliers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqc import pipeline
from mpqc.config import QuantizerConfig
from mpqc.errors import ConfigError
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.quantizers import METHODS, BitRange, FixedQuantizer
from mpqc.quantizers.calibration import mse_channel_clip, percentile_range, weight_clip
from mpqc.quantizers.base import channel_max


def _weights(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(16, 8, 3, 3, generator=gen)
    # Heavy-tailed: Student-t with 2 degrees of freedom (a few weights far out in every channel).
    normal = torch.randn(16, 8, 3, 3, generator=gen)
    chi2 = torch.randn(2, 16, 8, 3, 3, generator=gen).pow(2).sum(0)
    return normal / (chi2 / 2).sqrt()


def _error(quantizer, weight: torch.Tensor) -> float:
    quantizer.eval()
    with torch.no_grad():
        out = quantizer(weight) if quantizer.__class__.__name__ != "CSQWeightQuantizer" else \
            quantizer.encoded_weight(weight)
    return float(((out - weight) ** 2).sum())


@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_clip_error_is_at_most_the_max_abs_error_per_channel(kind, bits):
    w = _weights(kind)
    clip, top = mse_channel_clip(w, bits), channel_max(w)
    assert bool((clip <= top).all())

    def channel_errors(c: torch.Tensor) -> torch.Tensor:
        scale = (c / (2 ** (bits - 1) - 1)).reshape(-1, 1, 1, 1)
        q = torch.clamp(torch.round(w / scale), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * scale
        return ((q - w) ** 2).reshape(w.shape[0], -1).sum(1)

    assert bool((channel_errors(clip) <= channel_errors(top)).all())
    if bits <= 3:  # low bits: clipping the tails is a large win
        assert float((channel_errors(clip) / channel_errors(top)).mean()) < 0.8


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed"])
def test_every_methods_weight_quantizer_starts_no_worse_from_the_mse_clip(method, kind):
    w = _weights(kind)
    bits = 4 if method == "csq" else 2  # CSQ encodes at its largest precision: a 2..4 range starting at 4
    bit_range = BitRange(2, 4) if method == "csq" else BitRange(2, 8)
    make = lambda: METHODS[method].weight_quantizer(w, bits, bit_range)  # noqa: E731
    by_max, by_mse = make(), make()
    by_mse.init_weight_clip_(w, weight_clip(w, bits, "mse"))
    assert _error(by_mse, w) < (0.9 if bits == 2 else 1.0) * _error(by_max, w)
    fixed = FixedQuantizer(bits, True, channel_max(w) / (2 ** (bits - 1) - 1), per_channel=True)
    max_error = _error(fixed, w)
    fixed.init_weight_clip_(w, weight_clip(w, bits, "mse"))
    assert _error(fixed, w) < (0.9 if bits == 2 else 1.0) * max_error


def test_percentile_range_ignores_outliers():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    x[:3] = torch.tensor([1000.0, -2000.0, 500.0])
    assert percentile_range(x, 100.0, signed=True) == 2000.0
    assert 3.0 < percentile_range(x, 99.9, signed=True) < 4.5  # |N(0,1)| at 99.9 %: 3.29
    assert 2.5 < percentile_range(x, 99.9, signed=False) < 4.0  # max(N(0,1), 0) at 99.9 %: 3.09
    with pytest.raises(ConfigError, match="percentile"):
        percentile_range(x, 0.0, signed=True)
    with pytest.raises(ConfigError, match="weight init"):
        weight_clip(torch.ones(2, 2), 4, "minmax")


def test_insert_quantizers_starts_activations_at_the_percentile_and_weights_at_the_mse_clip():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    x[0, 0, 5, 5] = 500.0  # one outlier pixel in the calibration batch
    gm, _ = pipeline.trace(model, (x,))
    config = QuantizerConfig(weight_bits=BitRange(2, 2), activation_bits=BitRange(8, 8), activation_percentile=99.9)
    gm = pipeline.quantize(gm, METHODS["dq"], config, (x,))
    first, second = quantized_layers(gm)
    assert 2.5 < float(first.input_quantizer.log_range.detach().exp()) < 4.5  # not 500
    expected = mse_channel_clip(first.module.weight, 2)
    torch.testing.assert_close(first.weight_quantizer.log_gamma.exp(), expected)
    with pytest.raises(ConfigError, match="weight_init"):
        QuantizerConfig(weight_init="minmax")
    with pytest.raises(ConfigError, match="activation_percentile"):
        QuantizerConfig(activation_percentile=100.5)


@pytest.mark.parametrize("bits", [2, 8])
def test_mse_clip_does_not_depend_on_the_chunking(bits, monkeypatch):
    """The search runs whole channels a chunk at a time: any chunk size (here 1, 3 and all 16 channels) and the
    module's doctest example give the same levels."""
    from mpqc.quantizers import calibration

    w = _weights("heavy-tailed")
    results = []
    for elements in (1, 3 * 72, 16 * 72):
        monkeypatch.setattr(calibration, "MSE_CHUNK_ELEMENTS", elements)
        results.append(mse_channel_clip(w, bits))
    assert all(torch.equal(results[0], other) for other in results[1:])
    outlier = torch.tensor([[1.0, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3]])
    assert float(mse_channel_clip(outlier, 2)) < 1.0 and float(mse_channel_clip(outlier, 8)) == 1.0
