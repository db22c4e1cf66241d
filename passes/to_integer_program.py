"""Build the integer program of a frozen graph: one program node per fx node, and each ``quantize`` node's
requantisation region.

*Matches*: every node of a frozen ``GraphModule`` (every quantizer a ``FixedQuantizer``), each through its op
family in the registry (``mpqc.ops.describe``); shape queries and unused modules are skipped
(``mpqc.ops.is_bookkeeping``).

*Rewrites to*: an :class:`~mpqc.reference.IntegerProgram`. Every ``quantize`` node gets
``attrs["region"] = {"steps": [...], "leaves": [...]}``: its *fused sub-expression*, the program nodes whose float
values it computes itself in units of its scale (``steps``: ops with ``fuses_into_requantize`` -- add, relu,
clamp, max pools, data movement -- whose value is a float, in program order), over ``leaves`` (integer values, or
float values of other ops). Whether a value is integer is known statically: ``quantize``, layers and ops whose output
is quantized (lookup tables) make integers, ops with ``keeps_integers`` keep them when every input is integer
(``OpDef.output_is_integer``: a cat of an integer and a float value is a float value), every other op makes floats
(``integer_values``).

*Ensures*: nodes the registry cannot express are listed all at once in one :class:`UnsupportedOpError`, each with
its fx node; every layer reads a ``quantize`` node; the reference (``mpqc/reference.py``) and the TVM target
execute each ``quantize`` node from its region (``tests/test_to_integer_program.py``: Before/Expected regions on
small graphs).
"""
from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from mpqc import ops
from mpqc.errors import UnsupportedOpError
from mpqc.ops import IntNode, Unsupported


def to_integer_program(gm: GraphModule):
    """The integer program of the frozen graph ``gm``."""
    from mpqc.reference import IntegerProgram

    nodes: list[IntNode] = []
    unsupported: list[str] = []
    outputs: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "output":  # a tensor, or a tuple/list/dict of them: the program's outputs in order
            outputs = [arg.name for arg in pytree.tree_leaves(node.args[0]) if isinstance(arg, Node)]
        elif not ops.is_bookkeeping(gm, node):
            try:
                nodes.append(ops.describe(gm, node, frozen=True))
            except Unsupported as reason:
                unsupported.append(_listed(node, reason))
    raise_unsupported(unsupported)
    program = IntegerProgram(nodes, outputs)  # (which builds the regions: fuse_requantize)
    program.check_layer_inputs()
    return program


def check_supported(gm: GraphModule) -> None:
    """Before any training: raise one :class:`UnsupportedOpError` listing every node of a quantized (not yet
    frozen) graph that the integer program will not be able to express."""
    unsupported = []
    for node in gm.graph.nodes:
        if node.op == "output" or ops.is_bookkeeping(gm, node):
            continue
        try:
            ops.describe(gm, node, frozen=False)
        except Unsupported as reason:
            unsupported.append(_listed(node, reason))
    raise_unsupported(unsupported)


def _listed(node, reason: Exception) -> str:
    """One line of the error: the fx node, why, and the model's source line where the capture recorded it."""
    line = f"{node.format_node()}  ({reason})"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [text.strip() for text in trace if text.strip().startswith("File ")]
    if frames:
        line += f"  [{frames[-1]}]"
    return line


def raise_unsupported(unsupported: list[str]) -> None:
    if unsupported:
        raise UnsupportedOpError(
            f"the integer reference cannot express {len(unsupported)} node(s):\n  " + "\n  ".join(unsupported)
        )


def integer_values(nodes: list[IntNode]) -> set[str]:
    """The names of the nodes whose values are integer (``q * scale``), known from the ops alone."""
    integer: set[str] = set()
    for node in nodes:
        op = ops.op_named(node.op)
        if node.op == "quantize" or (op is not None and (op.is_layer or op.quantized_output)):
            integer.add(node.name)
        elif op is not None and op.output_is_integer(node, [name in integer for name in node.inputs]):
            integer.add(node.name)
    return integer


def fuse_requantize(nodes: list[IntNode]) -> list[IntNode]:
    """Set ``attrs["region"]`` of every ``quantize`` node (see the module docstring); returns ``nodes``."""
    by_name = {node.name: node for node in nodes}
    order = {node.name: index for index, node in enumerate(nodes)}
    integer = integer_values(nodes)

    def fused(name: str) -> bool:
        node = by_name.get(name)
        op = ops.op_named(node.op) if node is not None else None
        return op is not None and op.fuses_into_requantize and name not in integer

    for node in nodes:
        if node.op != "quantize" or not node.inputs:
            continue
        steps: set[str] = set()
        leaves: list[str] = []
        pending = [node.inputs[0]]
        while pending:
            name = pending.pop()
            if name in steps or name in leaves:
                continue
            if fused(name):
                steps.add(name)
                pending.extend(by_name[name].inputs)
            else:
                leaves.append(name)
        node.attrs["region"] = {"steps": sorted(steps, key=order.__getitem__),
                                "leaves": sorted(leaves, key=lambda n: order.get(n, -1))}
    return nodes
