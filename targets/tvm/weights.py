"""Weights of a lowered program: bit-packed storage in the artifact, and the TE function that unpacks them.

*Matches*: every conv/linear weight of a lowered :class:`~mpqc.reference.IntegerProgram` (``b <= 8`` bits, codes in
the signed b-bit range ``[-(2^(b-1)-1), 2^(b-1)-1]``).

*Rewrites to*: one ``uint8`` array holding every layer's codes back to back, ``b`` bits per weight
(:func:`pack_bits`): layer ``l`` starts at byte ``offset_l`` (its stream byte-aligned), weight ``i`` of the layer
(row-major in the layer's own ``[out, in, kh, kw]`` order) occupies bits ``[8*offset_l + i*b, 8*offset_l + (i+1)*b)``
little-endian, holding ``w + 2^(b-1) - 1`` (in ``[0, 2^b - 2]``). One byte of padding ends the array, so every
weight can be read as a 16-bit window. :func:`unpack_te` decodes one layer straight into the layout its kernel
reads (:class:`WeightLayout`): ``oihw`` (TVM's conv), ``hwio`` (its channels-last conv), ``io`` (a transposed linear
weight for ``matmul``) or ``vnni`` (``[ceil(out/16), kh*kw*ceil(in/4), 16, 4]`` int8 for the AVX512-VNNI kernels of
``kernels/implicit_gemm.py``, zero where ``out``/``in`` were padded to 16/4).

*Ensures*: the packed array is ``sum_l ceil(b_l * n_l / 8) + 1`` bytes (within one byte per layer of
``sum bits * params / 8``); unpacking gives the codes back exactly (``tests/test_tvm.py`` checks it against
:func:`vnni_layout` and the reference run). The unpack function is the Relax function ``unpack_weights`` of the
lowered module, run once when a module or artifact is loaded, never per inference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mpqc.errors import ConfigError, MpqcError

LAYOUTS = ("oihw", "hwio", "io", "vnni")
PACKED_WEIGHTS = "weights.packed"  # params.bin entry holding every weight, bit-packed
UNPACK_FUNCTION = "unpack_weights"  # the module's function that unpacks them, run once at load
_CHUNK = 1 << 20  # weights packed per numpy step (a multiple of 8, so every chunk ends on a byte boundary)


@dataclass(frozen=True)
class WeightLayout:
    """How one layer's weight is stored in the packed array and laid out for its kernel."""

    name: str  # the Relax parameter it becomes
    layer: str  # the program node it belongs to (error messages)
    bits: int
    shape: tuple[int, ...]  # the layer's own weight shape: [out, in/groups, *kernel] or [out, in]
    layout: str
    offset: int = 0  # first byte of the layer's bit stream in the packed array
    #: ``vnni`` only: the kernel's width as its kernel reads it, zero taps after the layer's own (an AMX kernel
    #: reads a few-channel conv's taps 64 bytes at a time: ``kernels/amx.py``); 0: the layer's own width
    kernel_width: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"weight {self.name!r}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"weight {self.name!r} of layer {self.layer!r}: {self.bits} bits; packed storage "
                              f"holds signed 2..8-bit weights")
        if self.layout == "io" and len(self.shape) != 2:
            raise ConfigError(f"weight {self.name!r}: the 'io' layout is for 2-D linear weights, got {self.shape}")
        if self.kernel_width and (self.layout != "vnni" or len(self.shape) != 4 or self.kernel_width < self.shape[3]):
            raise ConfigError(f"weight {self.name!r}: kernel_width {self.kernel_width} widens a 'vnni' conv2d "
                              f"weight's kernel, got {self.layout!r} {self.shape}")

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's bit stream."""
        return (self.count * self.bits + 7) // 8

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the unpacked parameter the kernel reads."""
        if self.layout == "oihw":
            return self.shape
        if self.layout == "io":
            return self.shape[::-1]
        if self.layout == "hwio":
            return (*self.shape[2:], self.shape[1], self.shape[0])
        out, inputs, taps = self.shape[0], self.shape[1], int(np.prod(self.kernel))
        return (-(-out // 16), taps * -(-inputs // 4), 16, 4)

    @property
    def kernel(self) -> tuple[int, ...]:
        """The kernel's spatial shape as its kernel reads it (``kernel_width`` applied)."""
        kernel = tuple(self.shape[2:])
        return (*kernel[:-1], self.kernel_width) if self.kernel_width else kernel


def place(layouts: list[WeightLayout]) -> list[WeightLayout]:
    """The layouts with their byte offsets assigned, one after the other."""
    placed, offset = [], 0
    for layout in layouts:
        placed.append(dataclasses.replace(layout, offset=offset))
        offset += layout.nbytes
    return placed


def packed_size(layouts: list[WeightLayout]) -> int:
    """Bytes of the packed array holding ``layouts`` (placed), with its one byte of padding."""
    return (layouts[-1].offset + layouts[-1].nbytes if layouts else 0) + 1


def pack_bits(layouts: list[WeightLayout], codes: dict[str, np.ndarray]) -> np.ndarray:
    """The packed ``uint8`` array of every layer's codes (``codes[name]`` in the layer's own shape)."""
    packed = np.zeros(packed_size(layouts), np.uint8)
    for layout in layouts:
        values = np.asarray(codes[layout.name])
        if tuple(values.shape) != layout.shape:
            raise MpqcError(f"weight {layout.name!r}: codes of shape {tuple(values.shape)}, expected {layout.shape}")
        half = 2 ** (layout.bits - 1) - 1
        flat = values.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -half or flat.max() > half):
            raise MpqcError(f"layer {layout.layer!r}: weight codes span [{flat.min()}, {flat.max()}], outside the "
                            f"signed {layout.bits}-bit range [{-half}, {half}]")
        unsigned = (flat + half).astype(np.uint8)
        start = layout.offset
        for begin in range(0, unsigned.size, _CHUNK):
            chunk = unsigned[begin:begin + _CHUNK]
            if layout.bits == 8:
                stream = chunk
            else:
                bit_planes = (chunk[:, None] >> np.arange(layout.bits, dtype=np.uint8)) & 1
                stream = np.packbits(bit_planes.reshape(-1), bitorder="little")
            packed[start:start + stream.size] = stream
            start += stream.size
    return packed


def vnni_layout(weight: np.ndarray, kernel_width: int = 0) -> np.ndarray:
    """A ``[out, in, *kernel]`` (or ``[out, in]``) int8 weight as ``[ceil(out/16), taps*ceil(in/4), 16, 4]``:
    element ``[o // 16, tap * ceil(in/4) + i // 4, o % 16, i % 4]`` is ``weight[o, i, tap]``, zero where padded
    (``kernel_width``: a conv2d kernel widened to that many columns, zeros after its own)."""
    if kernel_width:
        weight = np.pad(weight, [(0, 0)] * 3 + [(0, kernel_width - weight.shape[3])])
    out, inputs = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:]))
    out16, in4 = -(-out // 16) * 16, -(-inputs // 4) * 4
    padded = np.zeros((out16, in4, taps), np.int8)
    padded[:out, :inputs] = weight.reshape(out, inputs, taps)
    blocks = padded.reshape(out16 // 16, 16, in4 // 4, 4, taps).transpose(0, 4, 2, 1, 3)
    return np.ascontiguousarray(blocks.reshape(out16 // 16, taps * in4 // 4, 16, 4))


def unpack_te(packed, layout: WeightLayout):
    """TE: ``layout``'s weight decoded from the packed array, in ``layout.kernel_shape`` (int8)."""
    from tvm import te, tirx

    bits, half = layout.bits, 2 ** (layout.bits - 1) - 1
    shape = layout.shape

    def decode(flat):
        bit = tirx.const(8 * layout.offset, "int64") + flat.astype("int64") * bits
        byte, shift = bit // 8, (bit % 8).astype("int32")
        window = packed[byte].astype("int32") | (packed[byte + 1].astype("int32") << 8)
        return (((window >> shift) & ((1 << bits) - 1)) - half).astype("int8")

    def flat_index(index) -> object:
        flat = index[0]
        for axis, extent in zip(index[1:], shape[1:]):
            flat = flat * extent + axis
        return flat

    if layout.layout == "oihw":
        return te.compute(shape, lambda *index: decode(flat_index(index)), name="unpack_weight")
    if layout.layout == "io":
        return te.compute(layout.kernel_shape, lambda i, o: decode(flat_index((o, i))), name="unpack_weight")
    if layout.layout == "hwio":
        return te.compute(layout.kernel_shape, lambda h, w, i, o: decode(flat_index((o, i, h, w))),
                          name="unpack_weight")
    out, inputs = shape[:2]
    kernel = layout.kernel
    in4 = -(-inputs // 4)

    def vnni(block, row, lane, quad):
        o, i = block * 16 + lane, (row % in4) * 4 + quad
        tap, taps = row // in4, []
        for extent in reversed(kernel):
            taps.insert(0, tap % extent)
            tap = tap // extent
        conditions = [o < out, i < inputs]
        if layout.kernel_width:  # the widened columns are zero
            conditions.append(taps[-1] < shape[-1])
            taps[-1] = tirx.min(taps[-1], shape[-1] - 1)
        inside = tirx.all(*conditions)
        index = (tirx.min(o, out - 1), tirx.min(i, inputs - 1), *taps)
        return tirx.if_then_else(inside, decode(flat_index(index)), tirx.const(0, "int8"))

    return te.compute(layout.kernel_shape, vnni, name="unpack_weight")
