"""AMX micro-kernel of the implicit-GEMM int8 convolution (``implicit_gemm.py``): ``tdpbusd`` on tile registers,
Sapphire Rapids and later Xeons (``/proc/cpuinfo`` flags ``amx_tile`` and ``amx_int8``, LLVM features ``amx-tile``,
``amx-int8``).

*Matches*: what the registry (``registry.py``) gives the ``amx`` ISA: ``conv2d`` (groups 1) at any bits <= 8 whose
input channels are a multiple of 64 (one tile row of int8 is 64 bytes: each step reads 64 channels of one kernel
tap), or whose channels padded to 4 divide 64 and which is not dilated along its width (a 3-channel stem, 16 or
32 channels: a step reads ``64 / C`` neighbouring taps of one kernel row, :meth:`AMXKernel.widened`). Every other
layer of an ``amx`` module falls back to the AVX-512 VNNI kernel (``Kernel.fallback``): every AMX CPU has AVX-512
VNNI, and a linear layer on one row would fill a tile to 1/16.

*Rewrites to*: the conv block :data:`AMX` (``amx_conv``), the same TE, packed ``[Co/16, K/4, 16, 4]`` weights and
shift (128) as VNNI: that weight layout is exactly AMX's "VNNI-packed" B operand, 16 rows of 4-byte groups times 16
output channels, so a B tile is 1 KiB of one channel block read at stride 64. A few-channel conv's kernel is widened
with zero taps to a multiple of ``64 / C`` columns (``ConvGeometry.extra_columns``, ``WeightLayout.kernel_width``):
7x7 on 4 bytes per pixel becomes 7x16, one step per kernel row. The schedule (:meth:`AMXKernel.lay_out`) tiles the
output: ``groups`` (1 or 2) runs of ``M`` pixels of one row (``M`` the largest divisor of the output width up to 16)
by ``16 * blocks`` channels (``blocks`` 1 or 2), up to 2 x 2 int32 accumulator tiles, and tensorizes that tile's
whole reduction with one intrinsic per geometry (:func:`register_intrinsic`): zero the accumulators (``tilezero``:
the tile's whole reduction is the intrinsic's, so the reduction's init, zeros stored to memory and loaded back,
is dropped from the schedule), then per 64-byte step load each group's activation tile (``M`` rows, one per output
pixel, at the row stride of the convolution's stride) and each block's weight tile and ``tdpbusd`` every pair, then
store the accumulators. The tile configuration is loaded once per parallel chunk of tiles (:func:`configure_chunks`,
``ldtilecfg`` being as slow as a small tile's reduction), not per tile. The fused epilogue follows per tile, as for
VNNI. Tile registers are immediates: the intrinsic's loops over groups and blocks are unrolled, so they fold to
constants. ``tuning_db`` times every candidate tile per geometry (``schedule.tune_vnni_tiles``).

*Ensures*: int32 accumulation is exact: ``tdpbusd`` adds each group of four u8 x s8 products into an int32 element
without saturation (like ``vpdpbusd``), so the layers are bit-exact with ``mpqc.reference`` at every bit pair.
Linux lets a process use AMX tiles only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM)``; without it the first
tile instruction dies of SIGILL): a process that registers the intrinsic on an AMX CPU asks (every in-process run of
AMX code, lowered module, tile tuning or latency table, builds it first), and ``loader.check_cpu`` asks before an
exported artifact with AMX kernels runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from mpqc.targets.tvm.kernels.avx512_vnni import SHIFT
from mpqc.errors import ConfigError
from mpqc.targets.tvm.kernels.implicit_gemm import GEOMETRY_ATTR, ConvGeometry, Kernel, LayerFacts, MicroKernel, Tile

log = logging.getLogger(__name__)

CHANNEL_STEP = 64  # input channels (bytes) per tile row: one tdpbusd reduces 64 of them
MAX_ROWS = 16  # tile rows: output pixels per tile
# tile registers: accumulators 0-3 (2 * pixel group + channel block), activations 4-5 (one per pixel group),
# weights 6-7 (one per channel block)
ACTIVATION_TILE, WEIGHT_TILE = 4, 6
CHUNKS_PER_CORE = 4  # parallel chunks of a layer per core, each loads the tile configuration once (configure_chunks)


def fits(layer: LayerFacts) -> bool:
    """A 2-D conv (groups 1) whose input channels fill whole 64-byte tile rows, or whose channels (padded to 4)
    divide 64 and which is not dilated along its width: a tile row then holds that many neighbouring taps of a
    kernel row (:func:`taps_per_row`)."""
    padded = -(-layer.channels // 4) * 4
    return layer.op == "conv2d" and layer.groups == 1 and (
        layer.channels % CHANNEL_STEP == 0 or (CHANNEL_STEP % padded == 0 and not layer.dilated))


def taps_per_row(channels: int) -> int:
    """Kernel taps one 64-byte tile row reads: 1 where ``channels`` (padded to 4) fill it, else ``64 / channels``
    neighbouring taps of a kernel row (a 3-channel first conv: 16 taps of 4 bytes)."""
    return max(1, CHANNEL_STEP // channels)


def tile_config(group: int, groups: int, blocks: int) -> list[int]:
    """The 64-byte AMX tile configuration (palette 1) as 16 little-endian uint32 words: ``groups x blocks`` int32
    accumulator tiles of ``group`` rows x 16, ``groups`` activation tiles of ``group`` rows x 64 bytes, ``blocks``
    weight tiles of 16 x 64 bytes."""
    colsb, rows = {}, {}
    for g in range(groups):
        rows[ACTIVATION_TILE + g], colsb[ACTIVATION_TILE + g] = group, CHANNEL_STEP
        for b in range(blocks):
            rows[2 * g + b], colsb[2 * g + b] = group, 64
    for b in range(blocks):
        rows[WEIGHT_TILE + b], colsb[WEIGHT_TILE + b] = CHANNEL_STEP // 4, 64
    words = [1, 0, 0, 0]  # palette 1, start row 0
    words += [colsb.get(2 * w, 0) | colsb.get(2 * w + 1, 0) << 16 for w in range(8)]  # bytes 16-47: colsb[16]
    words += [sum(rows.get(4 * w + b, 0) << 8 * b for b in range(4)) for w in range(4)]  # bytes 48-63: rows[16]
    return words


def split_rows(rows: int) -> tuple[int, int]:
    """(pixels per activation tile, pixel groups) of a tile of ``rows`` output pixels: one group up to 16 rows, two
    halves above."""
    return (rows, 1) if rows <= MAX_ROWS else (rows // 2, 2)


def register_intrinsic(rows: int, blocks: int, kernel: tuple[int, int], channels4: int, stride_w: int,
                       dilation: tuple[int, int]) -> str:
    """Register (once per process and geometry) the tensor intrinsic of one ``rows x 16*blocks`` output tile's
    whole reduction over ``kernel`` taps and ``4 * channels4`` input channels (``rows`` pixels in one or two groups
    of activation tiles, :func:`split_rows`), and return its name."""
    kh, kw = kernel
    dh, dw = dilation
    name = f"mpqc_amx_u8s8s32_{rows}x{blocks}_k{kh}x{kw}_c{channels4}_s{stride_w}_d{dh}x{dw}"
    if name in _REGISTERED:
        return name
    _allow_tiles_here()
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    span_h, span_w = (kh - 1) * dh + 1, (rows - 1) * stride_w + (kw - 1) * dw + 1
    k_rows, channels, width = kh * kw * channels4, channels4 * 4, 16 * blocks
    steps, taps = max(1, channels // CHANNEL_STEP), taps_per_row(channels)  # 64-byte steps per tap, taps per step
    if taps > 1 and (kw % taps or dw != 1):
        raise ConfigError(f"AMX conv: {channels} channels read {taps} taps per tile row, so the kernel's width "
                          f"({kw}) must be a multiple of {taps} and its dilation 1, got {dw}")
    group, groups = split_rows(rows)

    def buffers(a_handle, b_handle, c_handle, a_h, a_w, b_block, c_row):
        """The activation, weight and accumulator regions of one tile (strides: the impl's names for them)."""
        return (T.match_buffer(a_handle, (1, span_h, span_w, channels), "uint8", offset_factor=1,
                               strides=[T.int32(), a_h, a_w, 1]),
                T.match_buffer(b_handle, (blocks, k_rows, 16, 4), "int8", offset_factor=1,
                               strides=[b_block, 64, 4, 1]),
                T.match_buffer(c_handle, (1, 1, rows, width), "int32", offset_factor=1,
                               strides=[T.int32(), T.int32(), c_row, 1]))

    def regions(a, b, c):
        T.reads(c[0, 0, 0:rows, 0:width], a[0, 0:span_h, 0:span_w, 0:channels], b[0:blocks, 0:k_rows, 0:16, 0:4])
        T.writes(c[0, 0, 0:rows, 0:width])

    def update(a, b, c, i, j, rh, rw, rc, rq):
        """The update block's body, ``c += a * b``. TVM leaves the reduction loops of extent 1 (a 1-row or 1x1
        kernel's taps, one channel quad) out of the conv block's iterators, so this does too (0 in their place)."""
        loops = [i, j] + [v for v, extent in ((rh, kh), (rw, kw), (rc, channels4)) if extent > 1] + [rq]
        axes = iter(T.axis.remap("SS" + "R" * (len(loops) - 2), loops))
        vi, vj = next(axes), next(axes)
        vh, vw, vc = [next(axes) if extent > 1 else 0 for extent in (kh, kw, channels4)]
        vq = next(axes)
        product = T.cast(a[0, vh * dh, vi * stride_w + vw * dw, vc * 4 + vq], "int32") * T.cast(
            b[vj // 16, (vh * kw + vw) * channels4 + vc, vj % 16, vq], "int32")
        T.buffer_store(c, c[0, 0, vi, vj] + product, [0, 0, vi, vj])

    @T.prim_func(s_tir=True)
    def desc(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a, b, c = buffers(a_handle, b_handle, c_handle, T.int32(), T.int32(), T.int32(), T.int32())
        with T.sblock("root"):
            regions(a, b, c)
            for i, j, rh, rw, rc, rq in T.grid(rows, width, kh, kw, channels4, 4):
                with T.sblock("update"):
                    update(a, b, c, i, j, rh, rw, rc, rq)

    def call(name_, *args):
        return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name_}", *args))

    # tile registers (immediates: the unrolled loops' indices fold to constants): accumulators 2 * g + b,
    # activations ACTIVATION_TILE + g, weights WEIGHT_TILE + b, for pixel group g and channel block b
    @T.prim_func(s_tir=True)
    def impl(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a_h, a_w, b_block, c_row = T.int32(), T.int32(), T.int32(), T.int32()
        a, b, c = buffers(a_handle, b_handle, c_handle, a_h, a_w, b_block, c_row)
        with T.sblock("root"):
            regions(a, b, c)
            for g in T.unroll(groups):
                for t in T.unroll(blocks):
                    call("tilezero", T.uint8(2 * g + t))
            for rh, rw, step in T.grid(kh, kw // taps, steps):  # (taps > 1: the 64 bytes of `taps` pixels)
                for g in T.unroll(groups):
                    call("tileloadd64", T.uint8(ACTIVATION_TILE + g),
                         a.access_ptr("r", offset=g * group * stride_w * a_w + rh * dh * a_h + rw * taps * dw * a_w
                                      + step * CHANNEL_STEP), T.int64(stride_w * a_w))
                for t in T.unroll(blocks):
                    call("tileloadd64", T.uint8(WEIGHT_TILE + t),
                         b.access_ptr("r", offset=t * b_block + ((rh * kw + rw * taps) * channels4 + step * 16) * 64),
                         T.int64(64))
                for g in T.unroll(groups):
                    for t in T.unroll(blocks):
                        call("tdpbusd", T.uint8(2 * g + t), T.uint8(ACTIVATION_TILE + g), T.uint8(WEIGHT_TILE + t))
            for g in T.unroll(groups):
                for t in T.unroll(blocks):
                    call("tilestored64", T.uint8(2 * g + t), c.access_ptr("w", offset=g * group * c_row + 16 * t),
                         T.int64(c_row * 4))

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


_REGISTERED: set[str] = set()


def config_block(words: list[int]):
    """The ``amx_config`` block: load the tile configuration ``words`` (:func:`tile_config`) into this thread's tile
    registers. ``ldtilecfg`` costs about 0.3 us here (2-core Xeon, ~800 cycles: as much as a 14 x 32 tile's whole
    3x3x128 reduction), so it runs once per parallel chunk, not per tile: the configuration is per thread and
    nothing else in a chunk touches it."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def configure() -> None:
        with T.sblock("root"):
            T.reads()
            T.writes()
            with T.sblock("amx_config"):
                T.reads()
                T.writes()
                config = T.alloc_buffer((16,), "uint32", scope="local")
                config[0] = T.uint32(words[0])
                config[1] = T.uint32(words[1])
                config[2] = T.uint32(words[2])
                config[3] = T.uint32(words[3])
                config[4] = T.uint32(words[4])
                config[5] = T.uint32(words[5])
                config[6] = T.uint32(words[6])
                config[7] = T.uint32(words[7])
                config[8] = T.uint32(words[8])
                config[9] = T.uint32(words[9])
                config[10] = T.uint32(words[10])
                config[11] = T.uint32(words[11])
                config[12] = T.uint32(words[12])
                config[13] = T.uint32(words[13])
                config[14] = T.uint32(words[14])
                config[15] = T.uint32(words[15])
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0])))

    return configure.body.block.body


def configure_chunks(sch, chunks, words: list[int]) -> None:
    """Make the loop ``chunks`` parallel with the ``amx_config`` block (:func:`config_block`) first in its body."""
    from tvm import tirx

    loop = sch.get(chunks)
    body = tirx.SeqStmt([config_block(words), loop.body])
    sch.state.replace(sch.get_sref(chunks), tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL,
                                                      body, loop.thread_binding, loop.annotations), {})


def parallel_chunks(extent: int, cores: int | None = None) -> int:
    """Chunks of a parallel loop of ``extent`` tiles: the largest divisor of ``extent`` up to
    :data:`CHUNKS_PER_CORE` per core (the target's ``num-cores``, else this machine's), so that threads get equal
    shares and each loads the configuration a few times; ``extent`` (one tile each) where no divisor gives every
    core one."""
    if cores is None:
        import tvm

        target = tvm.target.Target.current(allow_none=True)
        cores = int(target.attrs.get("num-cores", 0)) if target is not None else 0
        cores = cores or os.cpu_count() or 1
    chunks = max(d for d in range(1, min(CHUNKS_PER_CORE * cores, extent) + 1) if extent % d == 0)
    return chunks if chunks >= min(cores, extent) else extent


def _allow_tiles_here() -> None:
    """Ask Linux for the AMX tiles in this process, where the CPU has them: what builds AMX code here is what runs
    it here (``LoweredModule``, tile tuning, the latency table, tests). An exported artifact's loader asks itself."""
    from mpqc.cpu import cpu_flags
    from mpqc.targets.tvm.loader import request_amx_tiles

    if {"amx_tile", "amx_int8"} <= cpu_flags():
        try:
            request_amx_tiles()
        except RuntimeError as error:  # running it will say so again; building is fine
            log.warning("%s", error)


@dataclass(frozen=True)
class AMXKernel(MicroKernel):
    """The AMX micro-kernel: its tile is ``rows`` output pixels (one or two groups of <= 16, :func:`split_rows`) x
    ``blocks`` (<= 2) 16-channel blocks, up to 2 x 2 accumulator tiles, laid out and tensorized by :meth:`lay_out`
    instead of the register-tile schedule (``register``, ``max_accumulators`` and ``preferred_accumulators`` are
    that schedule's and unused here)."""

    def tile_candidates(self, out_width: int, channel_blocks: int) -> list[Tile]:
        """``rows``: the largest divisor of the output width up to 16, and twice that (two activation tiles) where
        it divides the width too; by 1 or 2 channel blocks: up to 2 x 2 accumulator tiles."""
        group = max(r for r in range(1, min(MAX_ROWS, out_width) + 1) if out_width % r == 0)
        rows = [group] + ([2 * group] if out_width % (2 * group) == 0 else [])
        return [Tile(r, b) for r in rows for b in (1, 2) if channel_blocks % b == 0]

    def default_tile(self, out_width: int, channel_blocks: int) -> Tile:
        """One pixel group by two channel blocks where the channels allow: measured best or within 10% of it on
        most ResNet-18 geometries here (2-core Xeon, 2 threads: 14x14x256 14x2 0.147 ms vs 14x1 0.170; 7x7x512 7x2
        0.193 vs 0.259; 56x56x64 14x1 0.238 vs 14x2 0.255, 28x2 0.284); tuning (``tuning_db``) measures them all."""
        return self.tile_candidates(out_width, channel_blocks)[1 if channel_blocks % 2 == 0 else 0]

    def widened(self, geometry: ConvGeometry) -> ConvGeometry:
        """A few-channel conv's kernel widened to a multiple of :func:`taps_per_row` columns (zero weights): each
        kernel row is read 64 bytes at a time. A 7x7 first conv on 3 (4) channels becomes 7x16: 7 tile steps
        with 7/16 of each useful, against 49 one-tap steps of the VNNI kernel with 4 of its 64 bytes useful."""
        taps = taps_per_row(geometry.channels4 * 4)
        width = geometry.kernel[1]
        return dataclasses.replace(geometry, extra_columns=-(-width // taps) * taps - width) if taps > 1 else geometry

    def lay_out(self, sch, conv, tile: Tile):
        geometry = _geometry(sch, conv)
        intrinsic = register_intrinsic(tile.rows, tile.blocks, **geometry)
        n, oh, ow, co, rh, rw, rc, rq = sch.get_loops(conv)
        co_tiles, co_tile = sch.split(co, [None, 16 * tile.blocks])
        ow_tiles, ow_tile = sch.split(ow, [None, tile.rows])
        sch.reorder(co_tiles, n, oh, ow_tiles, ow_tile, co_tile, rh, rw, rc, rq)
        tiles = sch.fuse(co_tiles, n, oh, ow_tiles)

        def finish():
            init = sch.decompose_reduction(conv, ow_tile)
            dead = _own_loop(sch, init, conv)
            sch.tensorize(ow_tile, intrinsic)
            _drop(sch, dead)
            # split after tensorizing (the split's bindings would keep the tile from being blockized), and made
            # parallel by configure_chunks (the primitive refuses a loop over a tensorized block: it reads and
            # writes its accumulators; the tiles are independent, as they were when parallel before)
            chunks, _ = sch.split(tiles, [parallel_chunks(int(sch.get(tiles).extent)), None])
            configure_chunks(sch, chunks, tile_config(*split_rows(tile.rows), tile.blocks))

        return tiles, finish


def _own_loop(sch, init, conv):
    """The outermost loop of ``init``'s nest that ``conv``'s nest does not share."""
    shared = [sch.get_sref(loop) for loop in sch.get_loops(conv)]
    return next(loop for loop in sch.get_loops(init) if not any(sch.get_sref(loop).same_as(s) for s in shared))


def _drop(sch, loop) -> None:
    """Remove the reduction's init nest (zeros stored to the accumulators' memory): the intrinsic starts its tiles
    with ``tilezero`` and overwrites that memory with ``tilestored``, so those stores were dead (4 KiB per 2x2
    tile)."""
    from tvm import tirx

    nest = sch.get(loop)  # an empty loop in its place (the schedule's state replaces a loop with a loop)
    sch.state.replace(sch.get_sref(loop), tirx.For(nest.loop_var, nest.min, nest.extent, tirx.ForKind.SERIAL,
                                                    tirx.Evaluate(0)), {})


def _geometry(sch, conv) -> dict:
    """The conv block's kernel taps, input channels / 4, horizontal stride and dilation (its
    ``implicit_gemm.GEOMETRY_ATTR`` annotation)."""
    kh, kw, channels4, stride_w, dh, dw = (int(v) for v in sch.get(conv).annotations[GEOMETRY_ATTR])
    return {"kernel": (kh, kw), "channels4": channels4, "stride_w": stride_w, "dilation": (dh, dw)}


VNNI_FALLBACK = "avx512vnni"
AMX = AMXKernel("amx_conv", None, 4, 4)
KERNEL = Kernel("amx", ("amx-tile", "amx-int8", "avx512vnni", "avx512bw"), lambda layer: AMX, lambda layer: SHIFT,
                fits=fits, fallback=VNNI_FALLBACK)
