"""The implicit-GEMM NHWC int8 convolution every x86 ISA kernel shares: its TE, its hand schedule, and the 16x4
u8 x s8 -> s32 block an ISA's micro-kernel tensorizes (``avx512_vnni.py``: one ``vpdpbusd``; ``avx_vnni.py``: two
ymm ``vpdpbusd``; ``avx2.py``: ``vpmaddubsw`` -> ``vpmaddwd``).

*Matches*: ``conv2d`` with ``groups == 1`` and 2-D ``linear`` layers that the registry (``registry.py``) gives an
ISA kernel. Grouped and depthwise convs, ``conv1d`` and targets without a kernel ISA keep ``generic.py``.

*Rewrites to* (:func:`conv2d_te`, one TE function per layer, emitted by ``../layers.py``):

* ``vnni_pad``: the input (NCHW, NHWC, or a ``[batch, features]`` matrix) copied into a zero-padded NHWC ``uint8``
  buffer with the channels padded to a multiple of 4. Signed (int8) activations are shifted by the kernel's shift
  on the way (VNNI: ``x + 128`` as uint8; padding then holds the shifted zero); ``../layers.py`` subtracts the exact
  correction ``shift * sum(w)`` per output channel from the int32 bias. Skipped when there is nothing to do
  (an unsigned NHWC input, no padding, channels a multiple of 4: 1x1 convs).
* ``<micro-kernel block>`` (``vnni_conv``, ``avxvnni_conv``, ``avx2_conv``, ...): ``out[n, oh, ow, co] = sum_{kh, kw, c}
  int32(xp[n, oh*s + kh*d, ow*s + kw*d, c]) * int32(w[co // 16, (kh*KW + kw)*C4 + c // 4, co % 16, c % 4])``, the
  weight packed ``[Co/16, KH*KW*C4, 16, 4]`` (``../weights.py``), output channels padded to 16 (``../layers.py``
  slices them off).

*Schedule* (:func:`schedule_conv`, applied by ``../schedule.py``; a hand schedule, not MetaSchedule): the output is
tiled ``R`` pixels of a row by ``CB`` blocks of 16 channels (:func:`choose_tile`; ``R*CB`` int32x16 accumulators
stay in registers), the tiles run in parallel, the reduction loops ``kh, kw, c/4`` go around the unrolled
``CB x R`` micro-kernel, whose 16x4 inner block is tensorized with the micro-kernel's intrinsic
(:func:`register_dot_16x4`). The fused epilogue (bias, requantisation or residual terms, the channel slice) is
inlined and computed per tile right after it, while the accumulators are in cache; the padding runs first, in
parallel, vectorized over channels.

*Ensures*: the int32 sums are exact for every micro-kernel the registry chooses (each ISA module says why), so the
layers are bit-exact with ``mpqc.reference`` (``tests/test_tvm.py``). The intrinsics' buffers declare their
strides: a weight block that is not the packed ``16x4`` layout is refused by ``tensorize`` instead of silently
reading the wrong bytes (TVM_NOTES trap 3).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpqc.errors import ConfigError

log = logging.getLogger(__name__)

KERNEL_ATTR = "mpqc_micro_kernel"  # the conv block's annotation naming its micro-kernel (MicroKernel.block)
GEOMETRY_ATTR = "mpqc_conv_geometry"  # its annotation (KH, KW, C/4, stride W, dilation H, W): what AMX tiles need
PAD_BLOCK, CONV_BLOCK = "vnni_pad", "vnni_conv"
MAX_ROWS = 8  # output pixels per register tile


def register_dot_16x4(name: str, value, lanes: int = 16) -> str:
    """Register the tensor intrinsic ``name`` for the 16x4 u8 x s8 -> s32 block that every micro-kernel of this
    implicit GEMM computes (``c[i] += sum_k a[k] * b[i, k]``, ``a`` 4 uint8, ``b`` the packed 16x4 int8 weight block,
    ``c`` 16 int32). Its body stores ``value(a, b, c, start)`` (a PrimExpr: the new ``int32 x lanes`` of ``c`` from
    lane ``start``) into ``c[start:start+lanes]`` for ``start = 0, lanes, ...``. Once per process and name; returns
    the name."""
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    def buffers(a_handle, b_handle, c_handle):
        # explicit strides: tensorize refuses a region that is not this compact 16x4 block (TVM_NOTES trap 3)
        return (T.match_buffer(a_handle, (4,), "uint8", offset_factor=1, strides=[1]),
                T.match_buffer(b_handle, (16, 4), "int8", offset_factor=1, strides=[4, 1]),
                T.match_buffer(c_handle, (16,), "int32", offset_factor=1, strides=[1]))

    @T.prim_func(s_tir=True)
    def desc(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a, b, c = buffers(a_handle, b_handle, c_handle)
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    if lanes not in (8, 16):
        raise ConfigError(f"intrinsic {name}: lanes must be 8 or 16, got {lanes}")
    if lanes == 16:  # (each body is parsed only where it is the one used: the store's lanes must match)
        @T.prim_func(s_tir=True)
        def whole(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
            a, b, c = buffers(a_handle, b_handle, c_handle)
            with T.sblock("root"):
                T.reads(c[0:16], a[0:4], b[0:16, 0:4])
                T.writes(c[0:16])
                c[T.ramp(T.int32(0), 1, 16)] = value(a, b, c, 0)
        impl = whole
    else:
        @T.prim_func(s_tir=True)
        def halves(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
            a, b, c = buffers(a_handle, b_handle, c_handle)
            with T.sblock("root"):
                T.reads(c[0:16], a[0:4], b[0:16, 0:4])
                T.writes(c[0:16])
                c[T.ramp(T.int32(0), 1, 8)] = value(a, b, c, 0)
                c[T.ramp(T.int32(8), 1, 8)] = value(a, b, c, 8)
        impl = halves
    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


_REGISTERED: set[str] = set()


def broadcast_activations(a, copies: int):
    """The 4 activation bytes of ``a`` repeated ``copies`` times, as ``uint8x(4*copies)`` (one 32-bit broadcast)."""
    from tvm.script import tirx as T

    return T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), copies),
                         dtype=f"uint8x{4 * copies}")


@dataclass(frozen=True)
class MicroKernel:
    """One tensorized inner block of the implicit GEMM: the TE block name that selects it (a prefix no other
    kernel's block name starts with), its intrinsic, and how many int32x16 accumulators its register tile holds
    (at most / preferred)."""

    block: str
    register: Any  # () -> intrinsic name
    max_accumulators: int
    preferred_accumulators: int
    steps: int = 1  # 4-deep reduction steps per intrinsic call (its weight block is [steps, 16, 4])

    def tile_candidates(self, out_width: int, channel_blocks: int) -> list["Tile"]:
        """The tiles :func:`schedule.tune_vnni_tiles` times for a geometry."""
        return tile_candidates(out_width, channel_blocks, self.max_accumulators)

    def default_tile(self, out_width: int, channel_blocks: int) -> "Tile":
        """The tile of a geometry no tuning has measured."""
        return choose_tile(out_width, channel_blocks, self)

    def widened(self, geometry: ConvGeometry) -> ConvGeometry:
        """``geometry`` as this micro-kernel reads it: its kernel columns (``ConvGeometry.extra_columns``, zero
        weights, ``WeightLayout.kernel_width``); here unchanged."""
        return geometry

    def lay_out(self, sch, conv, tile: "Tile"):
        """Tile the conv block's loops for this micro-kernel: (the parallel loop the epilogue follows, a callable
        that then tensorizes the reduction). Here the register tile: ``tile.rows`` pixels x ``tile.blocks``
        16-channel blocks of int32x16 accumulators around the tensorized 16x4 block."""
        intrinsic = self.register()
        n, oh, ow, co, rh, rw, rc, rq = sch.get_loops(conv)
        co_outer, co_inner = sch.split(co, [None, 16])
        co_tiles, co_tile = sch.split(co_outer, [None, tile.blocks])
        ow_tiles, ow_tile = sch.split(ow, [None, tile.rows])
        if self.steps > 1:  # the intrinsic covers `steps` reduction steps: rc_inner goes inside the tile loops
            rc, rc_inner = sch.split(rc, [None, self.steps])
            sch.reorder(co_tiles, n, oh, ow_tiles, rh, rw, rc, co_tile, ow_tile, rc_inner, co_inner, rq)
        else:
            sch.reorder(co_tiles, n, oh, ow_tiles, rh, rw, rc, co_tile, ow_tile, co_inner, rq)
        parallel = sch.fuse(co_tiles, n, oh, ow_tiles)
        sch.parallel(parallel)

        def tensorize():
            init = sch.decompose_reduction(conv, rh)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.unroll(co_tile)
            sch.unroll(ow_tile)
            sch.tensorize(rc_inner if self.steps > 1 else co_inner, intrinsic)

        return parallel, tensorize


@dataclass(frozen=True)
class LayerFacts:
    """What a kernel needs to know of a layer to take it."""

    op: str  # "conv2d", "linear", "conv1d"
    groups: int
    weight_bits: int
    activation_bits: int
    signed: bool  # signed (int8) activations
    rank: int  # rank of the layer's input (a linear layer is taken on 2-D inputs only)
    channels: int = 0  # input channels (in features of a linear layer): multi-step kernels need C/4 to divide
    dilated: bool = False  # a conv dilated along its width


@dataclass(frozen=True)
class Kernel:
    """One ISA's implicit-GEMM int8 kernel."""

    isa: str
    features: tuple[str, ...]  # LLVM features the target must have, all of them
    micro: Callable[[LayerFacts], MicroKernel]  # the micro-kernel for a layer's bits
    shift: Callable[[LayerFacts], int]  # what signed activations are shifted by (the bias absorbs shift * sum(w))
    fits: Callable[[LayerFacts], bool] | None = None  # what else a layer must be (AMX: channels in whole tile rows)
    fallback: str | None = None  # the ISA whose kernel takes the layers this one does not (AMX: AVX-512 VNNI)

    def takes(self, layer: LayerFacts) -> bool:
        """conv2d with groups 1, or linear (on a ``[rows, features]`` input; a rank >= 3 one, tokens, is
        flattened to that by the lowering); weights and activations of at most 8 bits; and what ``fits`` asks."""
        if layer.weight_bits > 8 or layer.activation_bits > 8:
            return False
        if self.fits is not None and not self.fits(layer):
            return False
        if layer.op == "linear":
            return layer.rank >= 2
        return layer.op == "conv2d" and layer.groups == 1

    def available(self, target: Any) -> bool:
        from tvm.target import codegen

        return target.kind.name == "llvm" and all(codegen.target_has_features(f, target) for f in self.features)


# --------------------------------------------------------------------------------------------- compute
@dataclass(frozen=True)
class ConvGeometry:
    """The static shape facts of one implicit-GEMM layer."""

    in_layout: str  # "NCHW", "NHWC" or "NC" (a linear layer's [batch, features], seen as a 1 x batch image)
    signed: bool
    channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    shift: int = 128  # added to signed activations to make them unsigned (the padding then holds it)
    #: kernel columns after the layer's own (zero weights: ``MicroKernel.widened``), read from as many more
    #: columns of padding on the right
    extra_columns: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.shift <= 128:
            raise ConfigError(f"ConvGeometry.shift must be in [1, 128], got {self.shift}")
        if self.in_layout not in ("NCHW", "NHWC", "NC"):
            raise ConfigError(f"ConvGeometry.in_layout must be NCHW, NHWC or NC, got {self.in_layout!r}")
        if self.extra_columns and self.dilation[1] != 1:
            raise ConfigError(f"ConvGeometry: extra kernel columns need dilation 1 along the width, got {self}")
        if self.channels < 1 or min(*self.kernel, *self.stride, *self.dilation) < 1 or min(self.padding) < 0 \
                or self.extra_columns < 0:
            raise ConfigError(f"ConvGeometry: channels, kernel, stride and dilation must be >= 1 and padding >= 0, "
                              f"got {self}")

    @property
    def channels4(self) -> int:
        return -(-self.channels // 4)


def conv2d_te(x, weight, geometry: ConvGeometry, name: str = CONV_BLOCK):
    """TE of the implicit-GEMM convolution: ``x`` (uint8/int8, ``geometry.in_layout``), ``weight`` int8
    ``[Co/16, KH*KW*C4, 16, 4]``; returns int32 ``[N, OH, OW, Co16]`` (NHWC; a linear layer gives
    ``[1, 1, batch, Co16]``). ``name``: the conv block's name, which selects its micro-kernel
    (:class:`MicroKernel`.block: :data:`CONV_BLOCK` for VNNI)."""
    from tvm import te, tirx

    g = geometry
    shape = [int(d) for d in x.shape]
    if g.in_layout == "NCHW":
        n, c, h, w = shape
    elif g.in_layout == "NHWC":
        n, h, w, c = shape
    else:
        (w, c), n, h = shape, 1, 1
    if c != g.channels:
        raise ConfigError(f"implicit-GEMM conv: the input has {c} channels, its geometry says {g.channels}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    kw += g.extra_columns
    c4 = g.channels4
    out16 = int(weight.shape[0]) * 16
    if int(weight.shape[1]) != kh * kw * c4:
        raise ConfigError(f"implicit-GEMM conv: packed weight rows {int(weight.shape[1])} != {kh}*{kw}*{c4}")

    def read(b, i, j, k):
        if g.in_layout == "NCHW":
            value = x[b, k, i, j]
        elif g.in_layout == "NHWC":
            value = x[b, i, j, k]
        else:
            value = x[j, k]
        return (value.astype("int32") + g.shift).astype("uint8") if g.signed else value

    needs_copy = g.signed or g.in_layout != "NHWC" or ph or pw or c4 * 4 != c or g.extra_columns
    if needs_copy:
        hp, wp = h + 2 * ph, w + 2 * pw + g.extra_columns
        fill = tirx.const(g.shift if g.signed else 0, "uint8")

        def padded(b, i, j, k):
            inside = [cond for cond, needed in ((i >= ph, ph), (i < h + ph, ph), (j >= pw, pw),
                                                (j < w + pw, pw or g.extra_columns), (k < c, c4 * 4 != c)) if needed]
            if not inside:
                return read(b, i, j, k)
            # a select of a read at clamped indices, valid for every pixel: it vectorizes, where an if_then_else
            # guarding the read made one branch per pixel (ResNet-18's first conv: 1.5 of its 5 ms at batch 8).
            # The condition says "the clamps changed nothing" rather than bounds on i and j: under bounds, the
            # simplifier drops the clamps from the select's value, and the padding's pixels read out of bounds.
            row, column = tirx.max(tirx.min(i - ph, h - 1), 0), tirx.max(tirx.min(j - pw, w - 1), 0)
            channel = tirx.min(k, c - 1) if c4 * 4 != c else k
            kept = [row == i - ph, column == j - pw] + ([k < c] if c4 * 4 != c else [])
            return tirx.Select(tirx.all(*kept), read(b, row, column, channel), fill)

        xp = te.compute((n, hp, wp, c4 * 4), padded, name=PAD_BLOCK)

        def source(b, i, j, k):
            return xp[b, i, j, k]
    else:
        hp, wp = h, w
        source = read
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1  # (extra columns: the same)
    rh, rw = te.reduce_axis((0, kh), "kh"), te.reduce_axis((0, kw), "kw")
    rc, rq = te.reduce_axis((0, c4), "c4"), te.reduce_axis((0, 4), "ci")

    def body(b, i, j, o):
        a = source(b, i * sh + rh * dh, j * sw + rw * dw, rc * 4 + rq)
        wgt = weight[o // 16, (rh * kw + rw) * c4 + rc, o % 16, rq]
        return te.sum(a.astype("int32") * wgt.astype("int32"), axis=[rh, rw, rc, rq])

    # the kernel's name as an annotation too: block names do not take part in structural equality, so without it
    # Relax would merge two layers of one geometry on different micro-kernels into one PrimFunc (and one kernel)
    return te.compute((n, oh, ow, out16), body, name=name,
                      attrs={KERNEL_ATTR: name, GEOMETRY_ATTR: [kh, kw, c4, sw, dh, dw]})


# --------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Tile:
    """Register tile of the micro-kernel: ``rows`` output pixels of one row x ``blocks`` 16-channel blocks."""

    rows: int
    blocks: int

    def __post_init__(self) -> None:
        if not (1 <= self.rows <= 32 and 1 <= self.blocks <= 4):
            raise ConfigError(f"tile {self.rows}x{self.blocks}: needs 1 <= rows <= 32 and 1 <= blocks <= 4")


def tile_candidates(out_width: int, channel_blocks: int, max_accumulators: int) -> list[Tile]:
    """Every register tile that fits: ``rows`` divides the output width, ``blocks`` the 16-channel blocks, and
    ``rows * blocks <= max_accumulators``."""
    rows = [r for r in range(1, min(MAX_ROWS, out_width) + 1) if out_width % r == 0]
    blocks = [b for b in range(1, min(4, channel_blocks) + 1) if channel_blocks % b == 0]
    return [Tile(r, b) for r in rows for b in blocks if r * b <= max_accumulators]


def choose_tile(out_width: int, channel_blocks: int, kernel: MicroKernel) -> Tile:
    """The default tile: about 14 accumulators, more rows first (each weight load feeds ``rows`` ``vpdpbusd``).
    7x2 measured fastest on every ResNet-18 layer here (of 5-13 candidates each, ``schedule.tune_vnni_tiles``):
    56x56x64 7x2 0.22 ms, 8x2 0.24, 4x4 0.23, 8x1 0.26; 28x28x128 7x2 0.21, 4x4 0.22; 7x7x512 7x2 0.21, 7x1 0.27."""
    candidates = tile_candidates(out_width, channel_blocks, kernel.max_accumulators)
    return max(candidates, key=lambda t: (-abs(t.rows * t.blocks - kernel.preferred_accumulators), t.rows))


def find_conv(sch, kernels: tuple[MicroKernel, ...]):
    """(the conv block under the root of the PrimFunc in ``sch``, its micro-kernel of ``kernels``), or
    (None, None)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        for kernel in kernels:
            if name.startswith(kernel.block):
                return block, kernel
    return None, None


def conv_signature(sch, conv) -> str:
    """The convolution's geometry as text (its loop extents and the shapes it reads): the key of its tile, the
    same for every layer of that shape whatever its epilogue; other micro-kernels' blocks than VNNI's (whose keys
    have no prefix) are prefixed with their block's name (``avx2_conv ...``)."""
    extents = "x".join(str(int(sch.get(loop).extent)) for loop in sch.get_loops(conv))
    reads = ";".join("x".join(str(int(d)) for d in region.source.ty.shape) for region in sch.get(conv).reads)
    name = sch.get(conv).name_hint
    prefix = "" if name.startswith(CONV_BLOCK) else name[: name.index("_conv") + 5] + " "
    return f"{prefix}conv {extents} reads {reads}"


def conv_shape(sch, conv) -> tuple[int, int]:
    """(output width, 16-channel blocks) of the ``vnni_conv`` block."""
    loops = sch.get_loops(conv)
    return int(sch.get(loops[2]).extent), int(sch.get(loops[3]).extent) // 16


def _is_output(sch, block, outputs) -> bool:
    return any(region.source.same_as(out) for region in sch.get(block).writes for out in outputs)


def schedule_conv(sch, tile: Tile | None, kernel: MicroKernel) -> bool:
    """Schedule the (fused) PrimFunc in ``sch`` holding ``kernel``'s conv block; False where it holds none."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    conv_index = next((i for i, name in enumerate(names) if name.startswith(kernel.block)), None)
    if conv_index is None:
        return False
    conv = blocks[conv_index]
    producers, epilogue = blocks[:conv_index], blocks[conv_index + 1:]
    outputs = list(sch.mod["main"].params)
    kept = []
    for block in epilogue:  # inline the epilogue into the blocks that write the function's outputs
        if _is_output(sch, block, outputs):
            kept.append(block)
        else:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - a block that cannot be inlined is computed per tile instead
                kept.append(block)
    tile = tile or kernel.default_tile(*conv_shape(sch, conv))
    parallel, tensorize = kernel.lay_out(sch, conv, tile)
    for block in kept:
        try:
            sch.reverse_compute_at(block, parallel)
        except Exception:  # noqa: BLE001 - an epilogue that cannot follow the tile runs after the conv, still right
            log.debug("implicit-GEMM epilogue %s left at the root", sch.get(block).name_hint)
            _vectorize_root(sch, block)
            continue
        _vectorize_inner(sch, block)
    tensorize()
    for block in producers:
        _vectorize_root(sch, block)
    return True


def _vectorize_inner(sch, block) -> None:
    """Vectorize a block placed under the tile loop along its innermost (channel) loop."""
    loops = sch.get_loops(block)[1:]
    if not loops:
        return
    extent = int(sch.get(loops[-1]).extent)
    if extent % 16 == 0 and extent > 16:
        _, loops[-1] = sch.split(loops[-1], [None, 16])
    elif extent > 16 or extent == 1:
        return
    sch.vectorize(loops[-1])


def _vectorize_root(sch, block) -> None:
    """A root-level producer/epilogue: outer loops fused in parallel, the innermost one vectorized. A short
    innermost loop (a few-channel input's 4 bytes per pixel) keeps the loop above it serial inside the parallel
    one: fusing it in too decomposed the fused index (two divisions) for every pixel, 2 of the 5 ms of ResNet-18's
    first conv at batch 8."""
    loops = sch.get_loops(block)
    extent = int(sch.get(loops[-1]).extent)
    outer = loops[:-2] if extent < 16 and len(loops) > 2 else loops[:-1]
    if len(outer) > 1:
        sch.parallel(sch.fuse(*outer))
    elif outer:
        sch.parallel(outer[0])
    lanes = next((v for v in (64, 32, 16) if extent % v == 0), extent if extent <= 64 else 0)
    if lanes > 1:
        if lanes != extent:
            _, inner = sch.split(loops[-1], [None, lanes])
        else:
            inner = loops[-1]
        sch.vectorize(inner)
