"""``TrainConfig.penalty_power``: the budget penalty ``relu(cost / limit - 1) ** power``, DQ's squared hinge at 2
(default), a linear hinge at 1 whose pull does not vanish near the budget."""
import pytest
import torch

import mpqc
from mpqc.budgets import LayerBits, WeightMemory
from mpqc.errors import ConfigError
from mpqc.layers import LayerInfo

# a 1000-weight linear: 500 bytes at 4 bits
LAYER = LayerInfo(name="fc", op="linear", weight_shape=(10, 100), params=1000, bias_params=10, out_channels=10,
                  macs=1000, input_shape=(100,), output_shape=(10,), input_elements=100, output_elements=10)


def _gradient(limit_bytes: float, power: float) -> tuple[float, float]:
    """The penalty and its gradient in the layer's weight bits at 4 bits (500 bytes) against ``limit_bytes``."""
    weight = torch.tensor(4.0, requires_grad=True)
    penalty = WeightMemory(limit_bytes).penalty([LAYER], {"fc": LayerBits(weight, torch.tensor(8.0))}, power)
    penalty.backward()
    return penalty.item(), weight.grad.item()


def test_the_linear_hinge_is_the_excess_and_pulls_as_hard_near_the_budget_as_far_above_it():
    # 1% above the budget: the squared hinge's pull is 2 * 0.01 of the linear one's
    limit = 500 / 1.01
    linear, linear_grad = _gradient(limit, 1.0)
    squared, squared_grad = _gradient(limit, 2.0)
    assert linear == pytest.approx(0.01, rel=1e-4) and squared == pytest.approx(1e-4, rel=1e-3)
    assert linear_grad == pytest.approx(1000 / 8 / limit, rel=1e-5)  # d(cost / L)/dw = params / 8 / L
    assert squared_grad == pytest.approx(2 * 0.01 * linear_grad, rel=1e-3)
    far, far_grad = _gradient(500 / 1.5, 1.0)
    assert far == pytest.approx(0.5, rel=1e-5) and far_grad == pytest.approx(1000 / 8 / (500 / 1.5), rel=1e-5)
    assert _gradient(600, 1.0) == (0.0, 0.0)  # inside the budget: no penalty, no pull


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_a_penalty_power_below_one_or_not_finite_is_refused(bad):
    with pytest.raises(ConfigError, match="penalty_power"):
        mpqc.TrainConfig(penalty_power=bad)


def test_penalty_power_joins_a_runs_identity_only_away_from_its_default():
    """Runs begun before the setting existed still resume (their identity has no ``penalty_power``)."""
    assert "penalty_power" not in mpqc.CompileConfig().identity()["search"]
    hinge = mpqc.CompileConfig(search=mpqc.TrainConfig(penalty_power=1.0)).identity()
    assert hinge["search"]["penalty_power"] == 1.0
    assert hinge != mpqc.CompileConfig().identity()


def test_a_linear_hinge_ends_the_search_nearer_its_budget(trained_small_cnn, digits_loaders):
    """At a weight where DQ's squared penalty lets the task loss hold the bits above a tight budget, the linear hinge
    (same weight) drives the searched cost onto it."""
    from conftest import example_batch, quantized_graph
    from mpqc.passes.insert_quantizers import current_bits, quantized_layers
    from mpqc.search import search

    example = example_batch(digits_loaders)
    budget = mpqc.AverageBits(2.5)

    def searched_cost(power: float) -> float:
        torch.manual_seed(0)
        gm, layers = quantized_graph(trained_small_cnn, example, method="fracbits", init_bits=3)
        config = mpqc.TrainConfig(epochs=3, max_steps_per_epoch=12, quantizer_lr=0.05, penalty_weight=0.5,
                                  penalty_power=power)
        search(gm, budget, layers, digits_loaders[0], config, seed=0, progress=False)
        with torch.no_grad():
            return float(budget.cost(layers, current_bits(quantized_layers(gm))))

    squared, linear = searched_cost(2.0), searched_cost(1.0)  # measured: 2.96 and 2.49 bits
    assert linear <= budget.limit * 1.02 and squared > budget.limit * 1.1, (linear, squared)


def test_the_cli_passes_penalty_power(monkeypatch):
    from test_round_weights import cli_config

    assert cli_config("compile", ["--penalty-power", "1"], monkeypatch).search.penalty_power == 1.0
    assert cli_config("sweep", ["--penalty-power", "1.5"], monkeypatch).search.penalty_power == 1.5
    assert cli_config("compile", [], monkeypatch).search.penalty_power == 2.0
    with pytest.raises(ConfigError, match="penalty_power"):
        cli_config("compile", ["--penalty-power", "0.5"], monkeypatch)
