"""Fit the frozen weights to their integer grids: per-channel scales, then (GPTQ) the rounding itself.

Matches:    every quantized layer whose weight quantizer is a per-channel ``FixedQuantizer`` (after ``freeze``).
Rewrites to: nothing structural; per ``how`` (:data:`WEIGHT_ROUNDINGS`):

            * ``"nearest"``: nothing. Each weight keeps the range the search left (``freeze`` kept it, with the
              step of the integer bit-width) and rounds to the nearest level.
            * ``"mse"`` (``RoundingConfig``'s default): each channel's scale re-fitted to its frozen bit-width by the MSE search that sets the
              starting ranges (:func:`mpqc.quantizers.calibration.mse_channel_clip`): the range the search left
              was fitted to more bits than the frozen ones where the search did not move it far (MiniLM frozen at
              3-bit table and 5-bit layers, A8, before training: cosine to fp32 0.886 -> 0.935).
            * ``"gptq"``: the ``"mse"`` scales, then GPTQ (Frantar et al., ICLR 2023: Optimal Brain Quantization one
              column at a time) on the convs and linears, in graph order: each layer's input is recorded on the
              calibration batches (through the layers already rounded, activation quantizers on), ``H = X^T X``
              is its output error's Hessian, and as each input column is rounded its error is spread over the
              columns not yet rounded (``H^-1``, damped by ``damping`` times its mean diagonal; columns in
              decreasing ``H`` diagonal, "act order"). The weight written back lies on its quantizer's grid, so
              the fake-quant forward returns it unchanged. Embedding rows are read one at a time (``H`` is the
              identity there): the ``"mse"`` scales are already their best rounding. A layer module called at
              two places in the graph is fitted to the inputs of its first call; a conv padded other than by
              explicit zeros (``padding="same"``, reflect) keeps the ``"mse"`` rounding, with a warning naming it.
Requires:   ``freeze`` has run (every weight quantizer fixed).
Ensures:    the graph's structure, bit-widths and budget cost are unchanged; with ``"gptq"`` every rounded weight
            equals its fake-quantized value (tested), and each layer's output error on the calibration inputs is
            what GPTQ minimises (greedily: on correlated inputs under half of round-to-nearest's, tested).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule
from tqdm import tqdm

from mpqc.config import WEIGHT_ROUNDINGS
from mpqc.errors import ConfigError
from mpqc.passes.insert_quantizers import QuantizedLayer, quantized_layers
from mpqc.quantizers import FixedQuantizer
from mpqc.quantizers.calibration import mse_channel_clip

#: Columns GPTQ rounds between two updates of the columns after them (the reference implementation's block).
GPTQ_BLOCK = 128


@torch.no_grad()
def round_weights(gm: GraphModule, calibration: Sequence[tuple[Tensor, ...]], how: str = "gptq",
                  damping: float = 0.01, progress: bool = False) -> GraphModule:
    """Fit every frozen weight quantizer's scales (``"mse"``) and its weight's rounding (``"gptq"``, on the
    positional ``calibration`` inputs: one tuple per batch); ``"nearest"`` leaves the graph as it is.
    ``progress`` shows a bar over GPTQ's layers (one partial forward pass per layer and batch)."""
    if how not in WEIGHT_ROUNDINGS:
        raise ConfigError(f"weight rounding must be one of {WEIGHT_ROUNDINGS}, got {how!r}")
    if how == "nearest":
        return gm
    layers = [layer for layer in quantized_layers(gm) if _fitted(layer)]
    for layer in layers:
        quantizer = layer.weight_quantizer
        quantizer.init_weight_clip_(layer.module.weight, mse_channel_clip(layer.module.weight, quantizer.fixed_bits))
    if how == "gptq":
        if not calibration:
            raise ConfigError("GPTQ weight rounding needs calibration batches; none were given")
        training = gm.training
        gm.eval()  # no dropout, no statistics updated while the inputs are recorded
        rounded = [layer for layer in layers if isinstance(layer.module, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        for layer in [layer for layer in rounded if not _unfoldable(layer.module)]:
            warnings.warn(f"layer {layer.name!r}: GPTQ cannot unfold a {type(layer.module).__name__} padded "
                          f"{layer.module.padding!r} ({layer.module.padding_mode}); its weight is rounded to nearest "
                          "on its MSE ranges", stacklevel=2)
            rounded.remove(layer)
        try:
            for layer in tqdm(rounded, desc="GPTQ rounding", disable=not progress, leave=False, dynamic_ncols=True):
                _gptq_layer(gm, layer, calibration, damping)
        finally:
            gm.train(training)
    return gm


def _fitted(layer: QuantizedLayer) -> bool:
    quantizer = layer.weight_quantizer
    if not isinstance(quantizer, FixedQuantizer):
        raise ConfigError(f"layer {layer.name!r}: round_weights runs after freeze, but its weight quantizer is "
                          f"{type(quantizer).__name__}")
    return quantizer.per_channel and quantizer.signed


def _unfoldable(module: nn.Module) -> bool:
    """Whether ``F.unfold`` gives the layer's input patches: a linear, or a conv zero-padded by explicit amounts."""
    return isinstance(module, nn.Linear) or (not isinstance(module.padding, str) and module.padding_mode == "zeros")


class _Recorded(Exception):
    """Raised by the input hook once the layer's input is recorded: the rest of the forward pass is not needed."""


def _gptq_layer(gm: GraphModule, layer: QuantizedLayer, calibration: Sequence[tuple[Tensor, ...]],
                damping: float) -> None:
    """Round ``layer``'s weight by GPTQ on its inputs over the ``calibration`` batches (read through ``gm``)."""
    module = layer.module
    groups = getattr(module, "groups", 1)
    hessian: Tensor | None = None  # [groups, span, span]: a grouped conv's groups read separate inputs

    def record(_module: nn.Module, args: tuple) -> None:
        nonlocal hessian
        columns = _input_columns(module, args[0]).double()
        columns = columns.reshape(columns.shape[0], groups, -1).transpose(0, 1)  # [groups, rows, span]
        product = columns.transpose(1, 2) @ columns
        hessian = product if hessian is None else hessian + product
        raise _Recorded

    handle = module.register_forward_pre_hook(record)
    try:
        for inputs in calibration:
            try:
                gm(*inputs)
            except _Recorded:
                pass
    finally:
        handle.remove()
    if hessian is None:
        raise ConfigError(f"layer {layer.name!r} did not run on the calibration batches: it cannot be GPTQ-rounded")
    quantizer = layer.weight_quantizer
    scale = quantizer.scale.detach().double().reshape(-1, 1)
    weight = module.weight.detach()
    rows_per_group = weight.shape[0] // groups
    flat = weight.reshape(weight.shape[0], -1).double()
    rounded = torch.empty_like(flat)
    for group in range(groups):
        rows = slice(group * rows_per_group, (group + 1) * rows_per_group)
        rounded[rows] = gptq(flat[rows], hessian[group], scale[rows], quantizer.qmin, quantizer.qmax, damping)
    module.weight.copy_(rounded.reshape(weight.shape).to(weight.dtype))


def _input_columns(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as the rows its weight (flattened to ``[out, in * kernel]``) multiplies: tokens for a
    linear, im2col patches for a conv (``[rows, channels * kernel]``, a grouped conv's groups side by side)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x, kernel = x.unsqueeze(-2), (1, *module.kernel_size)
        padding, stride, dilation = (0, *module.padding), (1, *module.stride), (1, *module.dilation)
    else:
        kernel, padding, stride, dilation = module.kernel_size, module.padding, module.stride, module.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C * k, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def gptq(weight: Tensor, hessian: Tensor, scale: Tensor, qmin: int, qmax: int, damping: float = 0.01) -> Tensor:
    """GPTQ's rounding of ``weight`` ``[rows, columns]`` to the grid ``scale * [qmin, qmax]`` (``scale`` ``[rows,
    1]``) minimising ``tr((W - Q) H (W - Q)^T)``, the output error on inputs whose Gram matrix is ``hessian``.

    Columns go in decreasing ``diag(H)``; a column no input reaches (``H_ii = 0``) is rounded to nearest."""
    weight, hessian = weight.double().clone(), hessian.double().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    order = torch.argsort(hessian.diagonal(), descending=True)
    weight, hessian = weight[:, order], hessian[order][:, order]
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    rounded = torch.empty_like(weight)
    columns = weight.shape[1]
    for start in range(0, columns, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, columns)
        errors = torch.empty_like(weight[:, start:stop])
        for i in range(start, stop):
            column = weight[:, i:i + 1]
            code = (column / scale).round().clamp(qmin, qmax) * scale
            rounded[:, i:i + 1] = code
            error = (column - code) / inverse[i, i]
            weight[:, i:stop] -= error @ inverse[i:i + 1, i:stop]
            errors[:, i - start:i - start + 1] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    restored = torch.empty_like(rounded)
    restored[:, order] = rounded
    return restored
