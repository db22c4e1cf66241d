"""Graph inputs, shape bookkeeping, and ``quantize``: the requantisation node of the integer program.

``quantize`` (an activation quantizer: ``bits``, ``signed``, scale ``s_out``) computes
``q = clamp(round_half_even(y), qmin, qmax)`` where ``y`` is its *requantisation region* evaluated in units of
``s_out`` in fp32. The region (``attrs["region"]``, built by ``passes/to_integer_program.py``) is the fused float
sub-expression feeding it: ``steps`` (program nodes of ops with ``fuses_into_requantize``: add, relu, clamp,
max pools, data movement, on float values, in order) over ``leaves``. A leaf holding an integer value ``(q_in, s_in)``
enters as ``fp32(q_in) * M`` with ``M = fp32(float64(s_in) / float64(s_out))`` per channel, a float leaf ``x`` as
``x * fp32(1 / s_out)``; each step applies its ``requantize_step``. The reference and TVM both execute this node
from that list; neither re-derives the region.
"""
from __future__ import annotations


import torch
from torch import Tensor

from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, op_named, register_op
from mpqc.quantizers.base import FixedQuantizer, Quantizer, integer_range

aten = torch.ops.aten


@register_op
class Input(OpDef):
    """A graph input (fp32)."""

    names = ("input",)
    placeholder = True
    numerics_tests = ("tests/test_reference.py::test_integer_reference_agrees_with_fake_quant_at_mixed_bits",)

    def describe(self, gm, node, frozen):
        return IntNode(node.name, "input", [])

    def evaluate(self, program, node, env):  # the reference binds inputs itself (IntegerProgram.run_all)
        return env[node.name]

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Float

        return _Float(lowering.input_vars[node.name])

    def onnx(self, builder, node):  # targets/onnx.py declares graph inputs itself (it needs their shapes)
        raise Unsupported("inputs are declared by build_onnx")


@register_op
class ShapeQuery(OpDef):
    """``x.size(0)``, ``x.shape[0]``, ATen ``sym_size``: values used only as shapes, never tensors."""

    functions = (aten.sym_size.int, getattr)
    methods = ("size",)
    bookkeeping = True


def _frozen_scale(quantizer: FixedQuantizer) -> float:
    return float(quantizer.frozen().scale.reshape(-1)[0])


@register_op
class Quantize(OpDef):
    """An activation quantizer: the requantisation node (see the module docstring)."""

    names = ("quantize",)
    modules = (Quantizer,)
    keeps_integers = True
    keeps_zero = True  # symmetric quantizers, zero point 0
    elementwise = True
    keeps_shape = True
    numerics_tests = ("tests/test_tvm.py::test_resnet20_is_bit_exact_with_the_reference",
                      "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits",
                      "tests/test_to_integer_program.py::test_residual_relu_region")

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return not gm.get_submodule(node.target).signed

    def describe(self, gm, node, frozen):
        module = gm.get_submodule(node.target)
        inputs = [arg.name for arg in node.all_input_nodes]
        if not frozen:
            return IntNode(node.name, "quantize", inputs)
        if not isinstance(module, FixedQuantizer):
            raise Unsupported("quantizer is not frozen: freeze the graph before building the integer program")
        frozen_quant = module.frozen()
        return IntNode(node.name, "quantize", inputs, {
            "bits": frozen_quant.bits, "signed": frozen_quant.signed, "scale": _frozen_scale(module),
            "module": node.target,
        })

    # ----------------------------------------------------------------------------- reference
    def evaluate(self, program, node, env):
        s_out = float(node.attrs["scale"])
        y = self.region_value(program, node, env, s_out)
        qmin, qmax = integer_range(node.attrs["bits"], node.attrs["signed"])
        q = torch.clamp(torch.round(y), qmin, qmax).to(torch.int64)
        return IntValue(q, torch.tensor(s_out, dtype=torch.float64))

    @staticmethod
    def region_value(program, node: IntNode, env: dict, s_out: float) -> Tensor:
        """The region's value in units of ``s_out`` (fp32)."""
        region = node.attrs["region"]
        units: dict[str, Tensor] = {}
        for leaf in region["leaves"]:
            value = env[leaf]
            if isinstance(value, IntValue):
                units[leaf] = value.q.to(torch.float32) * (value.scale / s_out).to(torch.float32)
            else:
                units[leaf] = value * torch.tensor(1.0 / s_out, dtype=torch.float32)
        for name in region["steps"]:
            step = program.node(name)
            units[name] = op_named(step.op).requantize_step(step, [units[i] for i in step.inputs], s_out)
        return units[node.inputs[0]]

    # ----------------------------------------------------------------------------- TVM
    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Int

        s_out = float(node.attrs["scale"])
        qmin, qmax = integer_range(node.attrs["bits"], node.attrs["signed"])
        width = 8 if node.attrs["bits"] <= 8 else 16  # 16: a normalization's input (OpDef.operand_bits)
        storage = f"{'' if node.attrs['signed'] else 'u'}int{width}"
        scale = torch.tensor(s_out, dtype=torch.float64)
        selections = lowering.selections_to_round_before(node)
        if selections:  # e.g. a max pool of accumulators: round its input, then pool the codes
            y = lowering.scaled(selections[0].inputs[0], s_out)
            codes = _Int(lowering.round_to_codes(y.expr, qmin, qmax, storage), scale, y.layout)
            for selection in selections:
                codes = op_named(selection.op).relax_requantize_step(lowering, selection, [codes], s_out)
            return codes
        y = lowering.requantize_region(node, s_out)
        return _Int(lowering.round_to_codes(y.expr, qmin, qmax, storage), scale, y.layout)

    def relax_check(self, node):
        if node.attrs["bits"] > 16:
            return f"{node.attrs['bits']}-bit activations (the TVM target stores activations in 8 or 16 bits)"
        return None

    # ----------------------------------------------------------------------------- ONNX
    def onnx(self, builder, node):
        from mpqc.targets.onnx import _convert_quantize

        _convert_quantize(builder, node)


