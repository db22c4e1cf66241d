"""passes/decompose_einsum.py: a batched-matmul einsum becomes permutes around one matmul with the same values;
other einsums are left alone."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from mpqc.passes.decompose_einsum import decompose_einsum

MATMULS = {"BGHID,BGHJD->BGHIJ": ((2, 3, 4, 5, 6), (2, 3, 4, 7, 6)),      # MaxViT's q k^T
           "B G H I J, B G H J D -> B G H I D": ((2, 3, 4, 5, 7), (2, 3, 4, 7, 6)),  # its p v (spaces as written)
           "bkn,bmk->bnm": ((2, 6, 5), (2, 7, 6)),                       # every operand and the output permuted
           "ij,jk->ki": ((5, 6), (6, 7))}
LEFT = {"ii->i": ((4, 4),), "bij,bjk": ((2, 3, 4), (2, 4, 5)), "...ij,...jk->...ik": ((2, 3, 4), (2, 4, 5)),
        "bij,bjk,bkl->bil": ((2, 3, 4), (2, 4, 5), (2, 5, 6)), "ij,kl->ijkl": ((2, 3), (4, 5))}


class Einsum(nn.Module):
    def __init__(self, equation: str, operands: int) -> None:
        super().__init__()
        self.equation, self.operands = equation, operands

    def forward(self, a, b, c):  # (fx cannot trace *args: the unused ones are passed and ignored)
        return torch.einsum(self.equation, *(a, b, c)[:self.operands]) + 1


def _inputs(shapes):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    return xs + [torch.zeros(1)] * (3 - len(xs))


@pytest.mark.parametrize("equation", sorted(MATMULS))
def test_batched_matmul_einsums_become_one_matmul(equation):
    model, xs = Einsum(equation, 2), _inputs(MATMULS[equation])
    gm = decompose_einsum(fx.symbolic_trace(model))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.einsum not in targets and targets.count(torch.matmul) == 1
    torch.testing.assert_close(gm(*xs), model(*xs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("equation", sorted(LEFT))
def test_other_einsums_are_left_alone(equation):
    gm = decompose_einsum(fx.symbolic_trace(Einsum(equation, len(LEFT[equation]))))
    assert torch.einsum in [n.target for n in gm.graph.nodes]
