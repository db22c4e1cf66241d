"""Configuration: frozen dataclasses, validated on construction."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

from mpqc.budgets import SQUARED_PENALTY
from mpqc.errors import ConfigError
from mpqc.quantizers.base import BitRange
from mpqc.quantizers.calibration import WEIGHT_INITS

FIRST_LAST_POLICIES = ("learn", "fixed")
TABLE_ROWS = ("uniform", "frequency")
#: Settings added after runs existed, per part of the config: left out of a run's identity at their default values
#: and at the value runs begun before they existed used (``_EARLIER_VALUES``, where that is not the default), so that
#: those runs still resume.
_ADDED_LATER = {"quantizers": ("table_rows", "table_rows_batches", "weight_init_bits"),
                "search": ("penalty_power",), "finetune": ("penalty_power",)}
_EARLIER_VALUES = {"penalty_power": SQUARED_PENALTY}
#: ``QuantizerConfig.recompute_weights=None`` recomputes weight quantizers in the backward pass from this many
#: quantized weight elements on (100 M: VGG, the 32GF RegNets, the large ViTs).
RECOMPUTE_AUTO_PARAMS = 100_000_000


@dataclass(frozen=True)
class QuantizerConfig:
    """Where quantizers go and what bit-widths they may take.

    ``first_last="learn"`` (default, as DQ: every layer's precision is learned) or ``"fixed"``: the first layer's
    weight and input and the last layer's weight stay at ``first_last_bits``. ``residual_bits`` is the fixed
    precision of residual-add results that are not a layer's input (e.g. before the final pooling).

    Where the ranges start (:mod:`mpqc.quantizers.calibration`; every method learns them from there):
    ``weight_init="mse"`` (default) clips each output channel's weights where ``init_bits``-bit quantization has
    the smallest squared error, ``"max"`` at its largest magnitude; activation ranges start at the
    ``activation_percentile`` of the calibration batch (100: its largest value).

    ``weight_init_bits``: where the weight quantizers' bit-widths (and the MSE clip of their ranges) start: None
    (default) at ``init_bits``, a number at that many bits, ``"budget"`` at the most bits at which all of them meet
    the budget (``mpqc.search.budget_start_bits``: at 3 bits per weight, 3), so the search trades bits between
    layers from its first step instead of descending from 8 to the budget first.

    ``shift_activations`` (default on): a bounded-below activation read only by linears / unpadded 1x1 convs (GELU,
    SiLU, ...) gets ``-min f`` added so that its codes are unsigned, the shift folded into the readers' biases
    (``passes/shift_activations.py``); False leaves them signed.

    ``recompute_weights``: training keeps no intermediate of a weight quantizer for the backward pass but recomputes
    it there (``torch.utils.checkpoint``), one layer at a time: the same values and gradients, about half the
    training memory of a large model (a quantizer's intermediates are several copies of its weight) for one more
    weight quantization per step. ``None`` (default): on where the quantized weights total at least
    :data:`RECOMPUTE_AUTO_PARAMS` elements (RegNetY-128GF, 637 M: its search was killed at 21.6 GiB without it; with
    it the zoo's whole run peaks at 15.8 GiB).

    ``table_rows``: an embedding table's rows share its frozen bit-width (``"uniform"``, default) or, with
    ``"frequency"``, each row gets bits by how often the first ``table_rows_batches`` training batches read it, at
    the same mean (``passes/allocate_table_rows.py``: a text model's frequent tokens at more bits, unread ones at
    the least; the table's memory unchanged).
    """

    weight_bits: BitRange = BitRange(2, 8)
    activation_bits: BitRange = BitRange(2, 8)
    init_bits: int = 8
    weight_init_bits: int | str | None = None
    first_last: str = "learn"
    first_last_bits: int = 8
    residual_bits: int = 8
    weight_init: str = "mse"
    activation_percentile: float = 99.99
    shift_activations: bool = True
    recompute_weights: bool | None = None
    table_rows: str = "uniform"
    table_rows_batches: int = 256

    def __post_init__(self) -> None:
        if self.table_rows not in TABLE_ROWS:
            raise ConfigError(f"table_rows must be one of {TABLE_ROWS}, got {self.table_rows!r}")
        if self.table_rows_batches < 1:
            raise ConfigError(f"table_rows_batches must be at least 1, got {self.table_rows_batches}")
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(f"weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
        if not 0 < self.activation_percentile <= 100:
            raise ConfigError(f"activation_percentile must be in (0, 100], got {self.activation_percentile}")
        if self.first_last not in FIRST_LAST_POLICIES:
            raise ConfigError(f"first_last must be one of {FIRST_LAST_POLICIES}, got {self.first_last!r}")
        if self.weight_bits.min_bits < 2:
            raise ConfigError(
                f"weight bits must be at least 2 (signed symmetric quantization), got min_bits="
                f"{self.weight_bits.min_bits}"
            )
        if not (2 <= self.residual_bits <= 16):
            raise ConfigError(f"residual_bits must be in 2..16, got {self.residual_bits}")
        if not (2 <= self.first_last_bits <= 16):
            raise ConfigError(f"first_last_bits must be in 2..16, got {self.first_last_bits}")
        if not (1 <= self.init_bits <= 16):
            raise ConfigError(f"init_bits must be in 1..16, got {self.init_bits}")
        if not (self.weight_init_bits in (None, "budget")
                or (isinstance(self.weight_init_bits, int) and not isinstance(self.weight_init_bits, bool)
                    and 1 <= self.weight_init_bits <= 16)):
            raise ConfigError(f"weight_init_bits must be None, 'budget' or an integer in 1..16, got "
                              f"{self.weight_init_bits!r}")

    @property
    def weight_start_bits(self) -> int:
        """The bits the weight quantizers start at: ``weight_init_bits`` where it is a number, else ``init_bits``
        (``"budget"`` is resolved by ``mpqc.compile``, which rebuilds the quantizers at the number it finds)."""
        return self.weight_init_bits if isinstance(self.weight_init_bits, int) else self.init_bits

    def at_floor(self, kinds: Iterable[str]) -> "QuantizerConfig":
        """This config with the bit-range of each of ``kinds`` (``"weight"``, ``"activation"``) shrunk to its
        minimum: those quantizers train at fixed bits, as uniform QAT's do."""
        kinds = set(kinds)
        if kinds - {"weight", "activation"}:
            raise ConfigError(f"at_floor: kinds must be 'weight' or 'activation', got {sorted(kinds)}")
        lowest = {kind: getattr(self, f"{kind}_bits").min_bits for kind in kinds}
        return replace(self, **{f"{kind}_bits": BitRange(bits, bits) for kind, bits in lowest.items()})


@dataclass(frozen=True)
class TrainConfig:
    """One training phase (search or fine-tune).

    ``epochs`` passes over the training data, each cut to ``max_steps_per_epoch`` batches when set.
    Weights use SGD at ``lr`` with ``momentum`` (Nesterov's when ``nesterov``) and ``weight_decay`` on every
    non-quantizer parameter, the learning rate following a cosine to 0 over the phase; quantizer parameters (scales,
    ranges, bit-width parameters) use Adam at ``quantizer_lr`` without weight decay. The defaults (plain momentum,
    weight decay 5e-5) are what measured best for the mixed-precision search at short compute (issue 18,
    ``bench/results/recipe.json``: Nesterov + weight decay 5e-4 + augmentation took DQ at 2 bits/weight from 53.3%
    to 37.8%); ``nesterov=True, weight_decay=5e-4`` is the widely used uniform-QAT recipe, kept as an option.
    ``penalty_weight`` scales the budget penalty (search only); with ``penalty_ramp`` > 0 that weight grows linearly
    over the phase to ``penalty_weight * (1 + penalty_ramp)`` at its last step, which drives a search that would
    settle above its budget (the task loss holding the bits up) onto it by the end. ``penalty_power`` shapes the
    penalty, ``relu(cost / limit - 1) ** penalty_power``: 2 is DQ's squared hinge, whose pull vanishes as the cost
    nears the limit (a search may sit a few percent above it, left to freezing's rounding); 1 is a hinge linear in
    the excess, pulling as hard 1% above the budget as 50% above, so that the search ends on the budget, trading
    bits between layers (and, kernel-wise, pruning channels) instead of every layer being rounded down. ``None``
    (the default) means the method's default (``QuantMethod.defaults.penalty_power``: 2, except kernel-wise
    FracBits, 1: measured +0.87 and +0.56 points at 2 bits/weight A8 and A4, -0.12 at 3 and -0.61 at 1.5
    bits/weight A8, where it prunes more to buy bits; ``bench/results/accuracy_parts/`` and ``_variants/``).
    ``distill`` adds knowledge distillation from the fp32 model (KL at ``distill_temperature``, weight
    ``distill_weight``); ``None`` (the default) means the method's default (``QuantMethod.defaults``: off, except
    SDQ's fine-tuning). A checkpoint is written every ``checkpoint_every`` steps and at every epoch end.
    """

    epochs: int = 2
    max_steps_per_epoch: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    quantizer_lr: float = 0.01
    penalty_weight: float = 5.0
    penalty_ramp: float = 0.0
    penalty_power: float | None = None
    distill: bool | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")
        for name in ("lr", "quantizer_lr", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "penalty_weight", "penalty_ramp", "distill_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.penalty_power is not None and not (math.isfinite(self.penalty_power) and self.penalty_power >= 1):
            raise ConfigError(f"penalty_power must be a finite number >= 1 (1: a linear hinge, 2: DQ's squared one), "
                              f"got {self.penalty_power}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov=True needs momentum > 0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @property
    def effective_penalty_power(self) -> float:
        """``penalty_power``, or DQ's squared hinge where no method filled it in (a search run outside ``compile``)."""
        return SQUARED_PENALTY if self.penalty_power is None else self.penalty_power


#: How the frozen weights are fitted to their integer grids before fine-tuning (``passes/round_weights.py``).
WEIGHT_ROUNDINGS = ("nearest", "mse", "gptq")


@dataclass(frozen=True)
class RoundingConfig:
    """How ``mpqc.compile`` fits the frozen weights to their grids before fine-tuning (``passes/round_weights.py``).

    ``how``: ``"mse"`` (default: each channel's scale re-fitted to its integer bit-width), ``"nearest"`` (the
    ranges the search left, the step of the integer bits) or ``"gptq"`` (the ``"mse"`` scales, then GPTQ's
    error-compensating rounding of every conv and linear on ``batches`` training batches, ``H`` damped by
    ``damping`` times its mean diagonal). ``"mse"`` measured ahead of ``"nearest"`` in every run we made
    (``bench/results/rounding.json``: Fashion-MNIST quick start +0.43 points at 2.25 bits/weight, +0.18 at 3;
    MiniLM at 4 bits cosine 0.967 -> 0.975); ``"gptq"`` about level with it after fine-tuning.
    """

    how: str = "mse"
    batches: int = 4
    damping: float = 0.01

    def __post_init__(self) -> None:
        if self.how not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"weight rounding must be one of {WEIGHT_ROUNDINGS}, got {self.how!r}")
        if self.batches < 1:
            raise ConfigError(f"rounding batches must be >= 1, got {self.batches}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"rounding damping must be in (0, 1], got {self.damping}")


@dataclass(frozen=True)
class CompileConfig:
    """Everything ``mpqc.compile`` takes besides the model, inputs, budget, data and method."""

    quantizers: QuantizerConfig = QuantizerConfig()
    search: TrainConfig = TrainConfig(epochs=2)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.005, penalty_weight=0.0))
    rounding: RoundingConfig = RoundingConfig()
    seed: int = 0
    num_classes: int | None = None
    progress: bool = True

    def identity(self) -> dict:
        """The settings that make two runs the same run (a resumed run the continuation of an interrupted one), as
        JSON values: all but how progress shows and ``recompute_weights`` (memory for time, the same numbers)."""
        settings = asdict(self)
        settings.pop("progress")
        settings["quantizers"].pop("recompute_weights")
        for part, keys in _ADDED_LATER.items():  # runs begun before these existed still resume
            defaults = {f.name: f.default for f in fields(type(getattr(self, part)))}
            for key in keys:
                if settings[part][key] in (defaults[key], _EARLIER_VALUES.get(key, defaults[key])):
                    settings[part].pop(key)
        return json.loads(json.dumps(settings, default=str))
