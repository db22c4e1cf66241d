"""BatchNorm that could not be folded: a per-channel affine, fused into the requantisation that follows.

``batch_norm`` (an eval-mode ``nn.BatchNorm1d/2d`` that ``fold_batchnorm`` left in place: it follows no conv/linear,
    e.g. DenseNet's BN -> ReLU -> conv after a concatenation)
    Per channel ``a = gamma / sqrt(var + eps)`` and ``b = beta - mean * a`` (float64, stored as tensors ``multiplier``
    and ``shift``): ``x * fp32(a)[c] + fp32(b)[c]`` on the dequantized value; step ``y * fp32(a)[c] +
    fp32(b / s_out)[c]``: one product, rounded, then one sum, in this order in every backend.

TVM computes the product as an exact multiply (never contracted into an FMA with the sum); ONNX: fp32 ``Mul`` then
``Add`` with the same fp32 constants (within the contract's 1 LSB).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mpqc.ops.arith import TESTS
from mpqc.ops.registry import IntNode, OpDef, Unsupported, dequantize, register_op


@register_op
class BatchNorm(OpDef):
    """An eval-mode ``nn.BatchNorm1d/2d`` left by ``fold_batchnorm``: a per-channel affine (channels at dim 1)."""

    names = ("batch_norm",)
    modules = (nn.BatchNorm1d, nn.BatchNorm2d)
    fuses_into_requantize = True
    keeps_shape = True
    numerics_tests = TESTS + ("tests/test_ops_arith.py::test_unfoldable_batchnorm_stays_and_is_exact",)

    def describe(self, gm, node, frozen):
        bn = gm.get_submodule(node.target)
        if bn.training:
            raise Unsupported(f"BatchNorm {node.target!r} in training mode (put the model in eval mode)")
        if not bn.track_running_stats or bn.running_var is None:
            raise Unsupported(f"BatchNorm {node.target!r} without running statistics (it normalises each batch "
                              "with its own statistics)")
        inv_std = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        multiplier = inv_std * bn.weight.detach().double() if bn.affine else inv_std
        shift = -bn.running_mean.detach().double() * multiplier
        if bn.affine:
            shift = shift + bn.bias.detach().double()
        return IntNode(node.name, "batch_norm", [node.all_input_nodes[0].name], {"module": node.target},
                       {"multiplier": multiplier, "shift": shift})

    @staticmethod
    def _affine(node: IntNode, x: Tensor, shift: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        a = node.tensors["multiplier"].to(torch.float32).reshape(shape)
        return x * a + shift.to(torch.float32).reshape(shape)

    def evaluate(self, program, node, env):
        return self._affine(node, dequantize(env[node.inputs[0]]), node.tensors["shift"])

    def requantize_step(self, node, inputs, s_out):
        return self._affine(node, inputs[0], node.tensors["shift"] / s_out)

    @staticmethod
    def _relax(lowering, node: IntNode, x, layout: str, shift: Tensor):
        from tvm.relax import op as R

        from mpqc.targets.tvm import NHWC, _Float, _shape

        ndim = len(_shape(x))
        shape = [1, 1, 1, -1] if layout == NHWC and ndim == 4 else [1, -1] + [1] * (ndim - 2)
        product = lowering.mul(x, node.tensors["multiplier"].to(torch.float32).reshape(shape))
        return _Float(lowering.emit(R.add(product, lowering.const(shift.to(torch.float32).reshape(shape)))), layout)

    def relax(self, lowering, node):
        value = lowering.env[node.inputs[0]]
        return self._relax(lowering, node, lowering.dequantize(value), value.layout, node.tensors["shift"])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0].expr, inputs[0].layout, node.tensors["shift"] / s_out)

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _float_tensor

        x, label = node.inputs[0], builder.label(node)
        rank = builder.rank.get(x)
        if rank is None:
            raise Unsupported("BatchNorm on a tensor of unknown rank: pass input_shapes")
        shape = [-1] + [1] * (rank - 2)
        a = builder.initializer(_float_tensor(node.tensors["multiplier"].float().reshape(shape).numpy(),
                                              f"{label}.multiplier"))
        b = builder.initializer(_float_tensor(node.tensors["shift"].float().reshape(shape).numpy(),
                                              f"{label}.shift"))
        builder.add("Mul", [x, a], [f"{label}.scaled"], f"{label}/Mul")
        builder.add("Add", [f"{label}.scaled", b], [node.name], f"{label}/Add")
        builder.rank[node.name] = rank
