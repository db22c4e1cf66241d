"""What a graph node computes, for both kinds of graph ``capture`` returns (torch-level fx, ATen-level export).

One table per op family, so passes and the integer reference classify nodes the same way.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

aten = torch.ops.aten

RELU_FUNCTIONS = {F.relu, torch.relu, aten.relu.default}
ADD_FUNCTIONS = {operator.add, torch.add, aten.add.Tensor}
HARDTANH_FUNCTIONS = {F.hardtanh, aten.hardtanh.default}
RELU6_FUNCTIONS = {F.relu6}
FLATTEN_FUNCTIONS = {torch.flatten, aten.flatten.using_ints}
GLOBAL_AVG_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default}
MAX_POOL_FUNCTIONS = {F.max_pool2d, aten.max_pool2d.default}
AVG_POOL_FUNCTIONS = {F.avg_pool2d, aten.avg_pool2d.default, aten.mean.dim}
CAT_FUNCTIONS = {torch.cat, aten.cat.default}
VIEW_FUNCTIONS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SHAPE_FUNCTIONS = {aten.sym_size.int, getattr}  # values used only as shapes, never tensors
SIGMOID_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, aten.sigmoid.default, aten.hardsigmoid.default}

NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
SIGN_PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Identity,
)
NONNEGATIVE_FUNCTIONS = RELU_FUNCTIONS | RELU6_FUNCTIONS | SIGMOID_FUNCTIONS | {F.softmax}
SIGN_PRESERVING_FUNCTIONS = (
    FLATTEN_FUNCTIONS | GLOBAL_AVG_POOL_FUNCTIONS | MAX_POOL_FUNCTIONS | CAT_FUNCTIONS | VIEW_FUNCTIONS
    | {F.avg_pool2d, F.adaptive_max_pool2d, F.dropout, operator.getitem, aten.mean.dim, aten.avg_pool2d.default,
       aten.dropout.default, aten.clone.default}
)
SIGN_PRESERVING_METHODS = {"view", "reshape", "flatten", "contiguous", "mean", "permute", "transpose"}
ELEMENTWISE_CLAMP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
ELEMENTWISE_CLAMP_FUNCTIONS = RELU_FUNCTIONS | RELU6_FUNCTIONS | HARDTANH_FUNCTIONS


def is_call(node: Node, functions: set) -> bool:
    return node.op == "call_function" and node.target in functions


def is_tensor_add(node: Node) -> bool:
    """``a + b`` of two graph tensors (no scalar, no alpha)."""
    return (
        is_call(node, ADD_FUNCTIONS)
        and len(node.args) == 2
        and all(isinstance(a, Node) for a in node.args)
        and not node.kwargs
    )
