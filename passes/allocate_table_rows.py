"""Give each row of a frozen embedding table the bits its reads earn, at the table's frozen average.

Matches:    every quantized embedding table (``QuantEmbedding``) whose weight quantizer is a per-row
            ``FixedQuantizer`` (after ``freeze``), when ``QuantizerConfig.table_rows == "frequency"``.
Rewrites to: its weight quantizer as a :class:`~mpqc.quantizers.table_rows.RowBitsQuantizer`: one bit-width per
            row from how often the training batches read the row (:func:`~mpqc.quantizers.table_rows.rows_by_frequency`,
            within the weight bit range), each row's range re-fitted to its bits by the MSE search that sets the
            starting ranges (``mse_channel_clip``).
Requires:   ``freeze`` has run; batches of the training data and a ``forward`` running the graph on one.
Ensures:    each table's mean row bit-width is at most its frozen bit-width, so its weight memory and average bits,
            and every budget counting them, are no higher; nothing else in the graph changes. Its codes are
            clamped to each row's range in training and in the integer program (``FrozenQuant.row_bits``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.fx import GraphModule
from tqdm import tqdm

from mpqc.passes.insert_quantizers import QuantizedLayer, quantized_layers
from mpqc.quantizers import BitRange, FixedQuantizer
from mpqc.quantizers.table_rows import RowBitsQuantizer, mse_row_clip, rows_by_frequency


def frozen_tables(gm: GraphModule) -> list[QuantizedLayer]:
    """The embedding tables whose rows still share one frozen bit-width."""
    return [layer for layer in quantized_layers(gm) if layer.info.op == "embedding"
            and type(layer.weight_quantizer) is FixedQuantizer and layer.weight_quantizer.per_channel]


def count_reads(gm: GraphModule, batches: Iterable[Any], forward: Callable[[Any], Any],
                progress: bool = False) -> dict[str, torch.Tensor]:
    """How often ``forward`` (the graph in eval mode) reads each row of each frozen table over ``batches`` (by
    table name)."""
    tables = frozen_tables(gm)
    counts = {layer.name: torch.zeros(layer.module.num_embeddings, dtype=torch.float64) for layer in tables}

    def counter(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            ids = args[0].detach().reshape(-1).to(torch.int64).cpu()
            counts[name].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        return hook

    if not tables:
        return counts
    handles = [layer.module.register_forward_pre_hook(counter(layer.name)) for layer in tables]
    training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="table reads", disable=not progress, leave=False, dynamic_ncols=True):
                forward(batch)
    finally:
        gm.train(training)
        for handle in handles:
            handle.remove()
    return counts


def allocate_table_rows(gm: GraphModule, counts: dict[str, torch.Tensor], bit_range: BitRange) -> GraphModule:
    """Each table in ``counts`` with per-row bits from its read counts at its frozen mean (see the module
    docstring)."""
    for layer in frozen_tables(gm):
        if layer.name not in counts:
            continue
        frozen = layer.weight_quantizer
        allowed = BitRange(min(bit_range.min_bits, frozen.fixed_bits), max(bit_range.max_bits, frozen.fixed_bits))
        row_bits = rows_by_frequency(counts[layer.name], frozen.fixed_bits, allowed)
        weight = layer.module.weight.detach()
        quantizer = RowBitsQuantizer(row_bits, frozen.signed, frozen.scale.detach().cpu()).to(weight.device)
        quantizer.init_weight_clip_(weight, mse_row_clip(weight, row_bits))
        layer.module.weight_quantizer = quantizer
    gm.recompile()
    return gm
