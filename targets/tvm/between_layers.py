"""The work between layers: what a lowered module spends beyond its layers' latency-table entries.

The latency table (``latency.py``) times each layer's kernel alone. A lowered module also runs the work between
them: the input's quantisation, pools and moves on 8-bit codes, the global pool, the VM's argument checks,
allocations and calls. On a fast kernel ISA that work is a tenth of the whole (ResNet-18 on AMX: ~0.3 of ~3.4 ms),
so a budget of the layers alone under-predicts by as much. It does not depend on the layers' bit-widths (pools and
moves run on 8-bit codes, the VM's work is per call), so it is measured once per model and host:

>>> between_layers_ms(program, [x], layers, isa="auto", tuning_db="tuning")   # doctest: +SKIP
0.31

the program lowered (the latency budget hands it the model at its quantizers' starting bits), its ``main`` timed
side by side with its layers' table entries at its bits in ``rounds`` passes, and the work between them kept as
the table's milliseconds for those layers times the median pass's excess ratio, ``module / sum(layers) - 1``
(never below zero). A ratio of two timings made a second apart, not a difference of timings made minutes apart:
on a VM whose cores run up to 1.8x slower for seconds at a time (a neighbour's load; seen on the AMX Xeon), a
slow phase slows the module and its kernels alike and cancels in their ratio. The value is kept in the latency
table's file beside the layers' entries (``between | <structure hash>``: the hash of the program's ops and their
inputs, the input shapes and the layers' geometries), so a second compile of the same model measures nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from mpqc.layers import LayerInfo
from mpqc.targets.tvm.latency import (LayerGeometry, _read, _write, block_timers, distinct, latency_table,
                                      measuring_target, table_path)

log = logging.getLogger(__name__)


def structure_key(program, input_shapes: Sequence[Sequence[int]], layers: Sequence[LayerInfo]) -> str:
    """``between | <hash>`` of what the work between layers depends on: the program's ops and their inputs, the
    input shapes and the layers' geometries (not the bits, scales or weights)."""
    facts = {"nodes": [[node.op, list(node.inputs)] for node in program.nodes],
             "inputs": [list(map(int, shape)) for shape in input_shapes],
             "layers": [LayerGeometry.of(layer).key for layer in layers]}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"between | {digest}"


def between_layers_ms(program, inputs: Sequence[torch.Tensor], layers: Sequence[LayerInfo], *,
                      isa: str = "auto", tuning_db: str | Path | None = None, repeat: int = 20,
                      rounds: int = 7) -> float:
    """Milliseconds ``program``'s lowered ``main`` (batch 1: the first sample of each of ``inputs``) runs beyond its
    ``layers``' latency-table entries at its bits, measured once per host and structure (module docstring)."""
    from mpqc.targets.tvm.build import lower

    samples = [x[:1].detach().cpu().numpy() for x in inputs]
    shapes = [tuple(sample.shape) for sample in samples]
    table = latency_table(layers, isa=isa, tuning_db=tuning_db, repeat=repeat)
    path = table_path(tuning_db)
    key = structure_key(program, shapes, layers)
    stored = _read(path)
    if key in stored.get(table.host, {}):
        return stored[table.host][key]
    lowered = lower(program, input_shape=shapes if len(shapes) > 1 else shapes[0], isa=isa, tuning_db=tuning_db)
    module = lowered.timer(*samples, repeat=repeat)
    bits = program.layer_bits()
    kernels = table.at_each([bits[layer.name] for layer in layers])
    unique, position = distinct([(LayerGeometry.of(layer), block) for layer, (block, _) in zip(layers, kernels)])
    timers = block_timers(unique, measuring_target("llvm", isa)[0], repeat,
                          None if tuning_db is None else Path(tuning_db))
    ratios = []
    for _ in range(rounds):  # side by side: the module, then its layers' entries, in every pass
        whole = module()
        timings = [timer() for timer in timers]
        ratios.append(whole / sum(timings[i] for i in position))
    ratio = statistics.median(ratios)
    layers_ms = sum(ms for _, ms in kernels)
    between = max(0.0, (ratio - 1.0) * layers_ms)
    log.info("the work between the layers: %.3f ms (the lowered module %.3fx its %d layers' kernels, the median of "
             "%d passes, times their %.3f ms in the table)", between, ratio, len(layers), rounds, layers_ms)
    stored = _read(path)  # again: the table's own entries may have been written meanwhile
    stored.setdefault(table.host, {})[key] = between
    _write(path, stored)
    return between
