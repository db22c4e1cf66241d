"""Shared fixtures: tiny real data (sklearn digits), the example models, and graphs at mixed precision."""
from __future__ import annotations

import os

# Torch's OpenMP threads busy-wait by default; on 2 shared cores that made some tests 100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import importlib.util  # noqa: E402
import random
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Hypothesis draws the same examples on every run and every machine (derived from each test's source), so a
# property test's verdict never depends on the run: a draw that once failed by a rounding tie (the SDQ-vs-fixed
# quantizer test, seed 890377, one element in 300 a code apart) does not come and go between CI runs.
settings.register_profile("mpqc", derandomize=True)
settings.load_profile("mpqc")

import mpqc  # noqa: E402
from mpqc.budgets import WeightMemory
from mpqc.config import QuantizerConfig
from mpqc import pipeline
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import insert_quantizers
from mpqc.quantizers import get_method

ROOT = Path(__file__).resolve().parent.parent

#: The torchvision classification models every graph pass must handle (random weights).
TORCHVISION_ZOO = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "vgg11_bn",
    "squeezenet1_0",
]


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``mpqc ARGS`` in this process (``mpqc.cli.main``: no interpreter and torch start-up per call, for the CLI
    calls that need no process of their own): its exit status (an argparse error's too), stdout and stderr."""
    from mpqc.cli import main

    capsys.readouterr()
    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def load_script(relative: str, name: str):
    """The repository's script ``relative`` (``bench/latency.py``, ``examples/models.py``) imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example_models = load_script("examples/models.py", "mpqc_example_models")


#: A compile configuration small enough for tests on the digits (2 search epochs, 1 fine-tune epoch).
FAST = mpqc.CompileConfig(
    search=mpqc.TrainConfig(epochs=2, quantizer_lr=0.05, checkpoint_every=10),
    finetune=mpqc.TrainConfig(epochs=1, lr=0.005, penalty_weight=0.0, checkpoint_every=10),
    progress=False,
)


def example_batch(loaders) -> torch.Tensor:
    """Two validation images: the example inputs of a compile on ``loaders``."""
    return next(iter(loaders[1]))[0][:2]


@pytest.fixture(scope="session")
def digits_loaders():
    from mpqc.data import loaders

    return loaders("digits", batch_size=64, seed=0)


@pytest.fixture(scope="session")
def _trained_small_cnn(digits_loaders):
    from mpqc.pretrain import train_fp32

    torch.manual_seed(0)
    model = example_models.small_cnn(num_classes=10, in_channels=1)
    train_fp32(model, *digits_loaders, epochs=4, progress=False)
    return model.eval()


@pytest.fixture
def trained_small_cnn(_trained_small_cnn):
    """A small CNN trained on digits (fresh copy per test)."""
    return copy.deepcopy(_trained_small_cnn)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (eval mode), so folding and quantization see
    realistic ranges rather than an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


def quantized_graph(model: torch.nn.Module, example: torch.Tensor, method: str = "dq", **config):
    """capture -> fold -> analyze -> insert quantizers (calibrated on ``example``)."""
    gm, layers = pipeline.trace(model.eval(), (example,))
    gm = insert_quantizers(gm, get_method(method), QuantizerConfig(**config), (example,))
    return gm, layers


def quantized_small_cnn(method: str = "dq", config: QuantizerConfig = QuantizerConfig()):
    """``examples/models.py``'s small CNN (seed 0) through ``pipeline.quantize`` as ``mpqc.compile`` does it
    (prunable layers marked), calibrated on one random 4 x 1 x 8 x 8 batch."""
    torch.manual_seed(0)
    example = (torch.randn(4, 1, 8, 8),)
    gm, _ = pipeline.trace(example_models.small_cnn(num_classes=10, in_channels=1).eval(), example)
    return pipeline.quantize(gm, get_method(method), config, example)


def set_bits(gm, bits_for) -> None:
    """Set every learnable DQ quantizer so that ``bits()`` is exactly ``bits_for(name)`` (an int), in the order and
    with the names of ``insert_quantizers.searched_quantizers``."""
    from mpqc.passes.insert_quantizers import searched_quantizers

    for name, q in searched_quantizers(gm):
        if q.learnable_bits:
            q.set_bits(bits_for(name))


def freeze_at_random_bits(gm, seed: int = 0, low: int = 2, high: int = 8):
    """Freeze ``gm`` at random integer bit-widths in [low, high] (a loose budget, so no bits are lowered)."""
    rng = random.Random(seed)
    chosen: dict[str, int] = {}
    set_bits(gm, lambda name: chosen.setdefault(name, rng.randint(low, high)))
    return freeze(gm, WeightMemory(1e12)), chosen


def mixed_bit_program(build, shape, seed: int):
    """``build()`` (random weights, BatchNorm statistics randomized) quantized on a random input of ``shape``, frozen
    at random mixed 2-8 bits: ``(graph, IntegerProgram, input)``. The draws are seeded (torch seed 0, then ``seed``
    for the bits)."""
    from mpqc.reference import IntegerProgram

    torch.manual_seed(0)
    x = torch.randn(shape)
    gm, _ = quantized_graph(randomize_batchnorm(build()), x)
    gm, chosen = freeze_at_random_bits(gm, seed=seed)
    assert len(set(chosen.values())) > 2, "the test needs really mixed bit-widths"
    return gm, IntegerProgram.from_graph(gm), x


# --------------------------------------------------------------------------------------------- kernel tests
def extreme_codes(rng, shape, low: int, high: int):
    """Random codes in [low, high] whose first half (along the first axis) sits at the extremes: ``high`` in
    the first quarter, ``low`` in the second (the values that saturate a naive vpmaddubsw kernel)."""
    codes = rng.integers(low, high + 1, shape)
    quarter = max(shape[0] // 4, 1)
    codes[:quarter], codes[quarter:2 * quarter] = high, low
    return codes


def conv_reference(nchw, weight, padding):
    """The exact (float64) convolution of NCHW codes, stride 1, as int64 NHWC."""
    import torch.nn.functional as F

    expected = F.conv2d(torch.from_numpy(nchw).double(), torch.from_numpy(weight).double(), None, 1, padding)
    return expected.permute(0, 2, 3, 1).round().long().numpy()


def build_conv_kernel(geometry, x_shape, x_dtype: str, weight_shape, tile=None, micro=None, target=None):
    """Build and schedule (tensorized) one implicit-GEMM convolution on ``micro`` (default AVX-512 VNNI's) for
    ``target`` (default this host); returns (run, asm): ``run(x, packed_weight)`` gives its int32 NHWC output."""
    import numpy as np
    import tvm
    from tvm import s_tir, te

    from mpqc.targets import tvm as mtvm
    from mpqc.targets.tvm.kernels import avx512_vnni, implicit_gemm

    micro = micro or avx512_vnni.VNNI
    x_te = te.placeholder(x_shape, x_dtype, name="x")
    w_te = te.placeholder(weight_shape, "int8", name="w")
    out = implicit_gemm.conv2d_te(x_te, w_te, geometry, name=micro.block)
    sch = s_tir.Schedule(te.create_prim_func([x_te, w_te, out]).with_attr("global_symbol", "main"))
    assert implicit_gemm.schedule_conv(sch, tile, micro)
    kernel = tvm.compile(sch.mod, target=tvm.target.Target(target or mtvm.host_target()))

    def run(x, packed):
        result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.int32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
        return result.numpy()

    return run, "".join(m.inspect_source("asm") for m in mtvm._import_tree(kernel.mod) if m.kind == "llvm")
