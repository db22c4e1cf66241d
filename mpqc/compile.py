"""``mpqc.compile``: the whole compiler, every stage in order (``mpqc.pipeline.STAGES``), in one function."""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader

from mpqc.budgets import Budget, LayerBits, parse_budget
from mpqc.augment import augmentation_off
from mpqc.checkpoint import RunDirectory, atomic_torch_save
from mpqc.config import CompileConfig, QuantizerConfig
from mpqc.data import check_loader
from mpqc.distributed import setup as setup_distributed
from mpqc.errors import ConfigError, DataError
from mpqc import pipeline
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import (cost_items, current_bits, quantized_activations, quantized_layers,
                                          smallest_bits)
from mpqc.passes.prune_channels import fewest_channels, gate_decisions, prune_channels
from mpqc.passes.allocate_table_rows import allocate_table_rows, count_reads
from mpqc.passes.round_weights import round_weights
from mpqc.quantizers import get_method
from mpqc.reference import IntegerProgram
from mpqc.report import load_report, save_report
from mpqc.report_build import build_report
from mpqc.search import budget_start_bits, floor_only_kinds, search
from mpqc.task import Inputs, Task, resolve_task
from mpqc.train import epoch_batches, finetune
from mpqc.train import evaluate_metrics as evaluate  # every value of the task's metric, not only the reported one

log = logging.getLogger(__name__)

Data = tuple[DataLoader, DataLoader | None]


def compile(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...] | dict[str, Tensor],
    *,
    budget: Budget | str,
    data: Data | DataLoader | None = None,
    method: str = "dq",
    config: CompileConfig = CompileConfig(),
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    loss: Callable | str | None = None,
    forward: Callable | None = None,
    metric: Callable | None = None,
) -> "CompiledModel":
    """Quantize ``model`` to mixed precision under ``budget`` and return the frozen integer model and its report.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs. ``data`` is
    ``(train_loader, val_loader)`` (the validation loader may be None). The task (:mod:`mpqc.task`): by default
    classification of ``(inputs, labels)`` batches, or label-free distillation from the fp32 model when the batches
    hold inputs only; ``loss(outputs, batch, teacher_outputs) -> scalar``, ``forward(model, batch) -> outputs`` and
    ``metric(outputs, batch) -> {name: value}`` (first key reported and maximised; a third parameter gets the fp32
    model's outputs: ``metric(outputs, batch, teacher_outputs)``) make any other;
    ``loss="distill"`` (or ``"distill-kl"``, ``"distill-mse"``, ``"distill-cosine"``) distills even with labels.
    ``out`` is the run directory (checkpoints as the run goes, then the results); without it the run works in a
    temporary directory and ``CompiledModel.save`` writes the results where you choose. ``resume=True`` continues
    an interrupted run in ``out``; ``force=True`` overwrites whatever run ``out`` holds.

    Under ``torchrun`` every process calls it with the same arguments: it joins the process group, the search and
    fine-tuning run data-parallel (``train_loader``'s batch is the global batch, see :mod:`mpqc.distributed`),
    rank 0 alone writes ``out``, and every process returns the same result.
    """
    started = time.perf_counter()
    world = setup_distributed()  # one process unless torchrun started several
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be an mpqc Budget or a string like 'weight-memory=20KiB', got {budget!r}")
    quant_method = get_method(method)
    config = quant_method.configure(config)  # the method's defaults where the config leaves them None
    if not isinstance(example_inputs, (tuple, dict)):
        example_inputs = (example_inputs,)
    train_loader, val_loader = _split_data(data)
    torch.manual_seed(config.seed)

    gm, layers = pipeline.trace(model, example_inputs)                             # 1-3. torch.fx, fold BatchNorm,
                                                                                   #      params, MACs, activations
    example_inputs = pipeline.positional_inputs(gm, example_inputs)                #    keywords in the graph's order
    teacher = copy.deepcopy(gm).eval()
    first_batch = _first_batch(train_loader, config.seed)
    task = prepare_task(teacher, example_inputs, train_loader, config,             #    what it is trained for
                        loss=loss, forward=forward, metric=metric)
    identity = _identity(model, gm, budget, method, config, train_loader, task)

    calibration, training = _model_inputs(task, gm, first_batch), gm.training
    gm = pipeline.quantize(gm, quant_method, config.quantizers, calibration)      # 4. learnable-bit quantizers,
                                                                                   #    0 bits = pruned channel,
                                                                                   #    refuse unsupported ops
    budget = budget.measured_on(gm, calibration)                                   #    what a budget measures on
                                                                                   #    the model (latency: the
                                                                                   #    work between layers),
    smallest = budget.check_feasible(cost_items(gm, fewest_channels(gm)),          #    and infeasible budgets;
                                     smallest_bits(quantized_layers(gm), quantized_activations(gm)))
    floor_only = floor_only_kinds(gm, budget)                                      #    kinds the budget holds at
    start = _weight_start(gm, budget, config.quantizers, floor_only)               #    their floor, weights at the
    if floor_only or start is not None:                                            #    budget's bits: rebuilt there
        if floor_only:
            log.info("%s holds the %s at their minimum bits: no search for them", budget.text,
                     " and ".join(f"{kind}s" for kind in sorted(floor_only)))
        quantizers = config.quantizers.at_floor(floor_only)
        quantizers = quantizers if start is None else replace(quantizers, weight_init_bits=start)
        config = replace(config, quantizers=quantizers)
        gm = pipeline.quantize(copy.deepcopy(teacher).train(training), quant_method, config.quantizers, calibration)
    run = world.call_on_main(lambda: RunDirectory(out or tempfile.mkdtemp(prefix="mpqc-run-"), identity,
                                                  resume=resume, force=force))
    search(gm, budget, layers, train_loader, config.search,                         # 5. differentiable search
           checkpoint=run.checkpoint("search"), seed=config.seed, teacher=teacher, progress=config.progress,
           task=task)
    with torch.no_grad():
        bits = current_bits(quantized_layers(gm), quantized_activations(gm))
        searched = {name: (float(b.weight), float(b.activation)) for name, b in bits.items()
                    if isinstance(b, LayerBits)}
        search_cost = float(budget.cost(cost_items(gm, layers), bits))
        gates = {layer.name: gate_decisions(gate) for layer in quantized_layers(gm)
                 if (gate := layer.weight_quantizer.channel_gate()) is not None}
    search_done = time.perf_counter()
    fixed_layers = {layer.name for layer in quantized_layers(gm) if not layer.weight_quantizer.learnable_bits}

    gm = prune_channels(gm, example_inputs, budget, calibration)                   # 6. drop 0-bit channels
    unpruned, layers = layers, [layer.info for layer in quantized_layers(gm)]      #    (the smaller layers)
    gm = freeze(gm, budget)                                                        # 7. integer bits meeting budget
    gm = round_weights(gm, _rounding_inputs(task, gm, train_loader, config),       #    scales and rounding fitted
                       config.rounding.how, config.rounding.damping, config.progress)  # to them (MSE, GPTQ)
    if config.quantizers.table_rows == "frequency":                                #    table rows' bits by reads
        gm = allocate_table_rows(gm, _table_reads(task, gm, train_loader, config), config.quantizers.weight_bits)
    finetune(gm, train_loader, config.finetune, checkpoint=run.checkpoint("finetune"),  # 8. fine-tune, bits fixed
             seed=config.seed + 1, teacher=teacher, progress=config.progress, task=task)
    gm.eval()
    program = pipeline.to_integer_program(gm)                                      # 9. the integer model
    finished = time.perf_counter()
    output_spec = _output_spec(gm)

    metrics = {"fp32": None, "quantized": None, "integer_reference": None}
    if val_loader is not None:
        integer = CompiledModel(program=program, report={}, output_spec=output_spec)
        metrics = {name: evaluate(candidate, val_loader, world, task=task, teacher=teacher)
                   for name, candidate in (("fp32", teacher), ("quantized", gm), ("integer_reference", integer))}
    accuracy = {name: values and values[task.metric_name] for name, values in metrics.items()}
    report = build_report(                                                         # 10. report
        model_name=type(model).__name__, method=method, budget=budget, layers=layers, program=program,
        activations=cost_items(gm, []),
        searched_bits=searched, fixed_layers=fixed_layers, unpruned_layers=unpruned, search_cost=search_cost,
        smallest_cost=smallest, searched_gates=gates, floor_only=floor_only,
        weight_start_bits=start,
        accuracy=accuracy, metric=_metric_section(task, metrics),
        wall_time={"search": search_done - started, "finetune": finished - search_done,
                   "total": time.perf_counter() - started},
    )
    result = CompiledModel(program=program, report=report, graph=gm, run_dir=run.path, output_spec=output_spec)
    if out is not None:
        world.call_on_main(lambda: result.save(out))  # rank 0 writes; every process returns once it is written
    return result


@dataclass
class CompiledModel:
    """The result of :func:`compile`: the integer program (the frozen model), its report, and the fake-quant graph.

    Calling it runs the integer reference, on inputs given in order or by name, and returns the outputs in the
    model's structure (tensor, tuple or dict; a flat tuple for a model loaded from disk). ``graph`` is None for a
    model loaded from disk.
    """

    program: IntegerProgram
    report: dict[str, Any]
    graph: GraphModule | None = None
    run_dir: Path | None = None
    output_spec: pytree.TreeSpec | None = None

    def __call__(self, *inputs: Tensor, **named: Tensor) -> Any:
        outputs = self.program.run(*inputs, **named)
        if self.output_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs) if isinstance(outputs, tuple) else [outputs], self.output_spec)

    def save(self, path: str | Path) -> Path:
        """Write ``program.json``/``program.pt`` (the frozen model), ``report.json``, ``bits.png``, the fine-tuned
        fake-quant weights (``finetuned.pt``) and the run's checkpoints into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.program.save(path)
        save_report(self.report, path)
        if self.graph is not None:
            atomic_torch_save(self.graph.state_dict(), path / "finetuned.pt")
        if self.run_dir is not None and self.run_dir.resolve() != path.resolve():
            for name in ("checkpoints", "run.json"):
                source = self.run_dir / name
                if source.is_dir():
                    shutil.copytree(source, path / name, dirs_exist_ok=True)
                elif source.exists():
                    shutil.copy2(source, path / name)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CompiledModel":
        path = Path(path)
        return cls(program=IntegerProgram.load(path), report=load_report(path), run_dir=path)


# --------------------------------------------------------------------------------------------- helpers
def _weight_start(gm: GraphModule, budget: Budget, quantizers: QuantizerConfig,
                  floor_only: frozenset[str]) -> int | None:
    """Where ``weight_init_bits="budget"`` starts the searched weights (:func:`mpqc.search.budget_start_bits`);
    None where the config asks for no such start, the budget holds the weights at their floor, or none fits."""
    if quantizers.weight_init_bits != "budget" or "weight" in floor_only:
        return None
    start = budget_start_bits(gm, budget)
    if start is not None:
        log.info("%s: the searched weights start at %d bits, the most at which all of them meet it", budget.text,
                 start)
    return start


def _split_data(data: Data | DataLoader | None) -> Data:
    if data is None:
        raise DataError("data=None: the bit-width search needs training data; pass data=(train_loader, val_loader)")
    if isinstance(data, DataLoader):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], DataLoader) and (
        data[1] is None or isinstance(data[1], DataLoader)
    ):
        return data[0], data[1]
    raise DataError(f"data must be a DataLoader or a (train_loader, val_loader) pair, got {type(data).__name__}")


def _first_batches(train_loader: DataLoader, seed: int, count: int) -> list[Any]:
    """The train loader's first ``count`` batches for ``seed``, without augmentation (calibration data: the same
    on every process)."""
    with augmentation_off(train_loader):
        return list(itertools.islice(epoch_batches(train_loader, seed), count))


def _first_batch(train_loader: DataLoader, seed: int) -> Any:
    """The train loader's first batch for ``seed``, without augmentation (the calibration data)."""
    batches = _first_batches(train_loader, seed, 1)
    if not batches:
        raise DataError("train loader is empty")
    return batches[0]


def prepare_task(gm: GraphModule, example_inputs: tuple, train_loader: DataLoader, config: CompileConfig, *,
                 loss: Callable | str | None, forward: Callable | None, metric: Callable | None) -> Task:
    """The task that ``loss``/``forward``/``metric`` mean (:func:`mpqc.task.resolve_task`) for the captured fp32
    graph ``gm`` on ``train_loader``'s batches, checked by one run of its callables on the first batch; a
    classification's labels are checked against the model's classes first."""
    inputs = Inputs(tuple(str(node.target) for node in gm.graph.nodes if node.op == "placeholder"))
    with torch.no_grad():
        example_outputs = gm(*example_inputs)
    first_batch = _first_batch(train_loader, config.seed)
    task = resolve_task(inputs, first_batch, example_outputs, loss=loss, forward=forward, metric=metric)
    if task.step_accuracy is not None:  # classification: labels in [0, classes)
        check_loader(train_loader, "train", config.num_classes or _output_width(gm, example_inputs))
    return task.checked(gm, first_batch)


def _rounding_inputs(task: Task, gm: GraphModule, train_loader: DataLoader, config: CompileConfig) -> list[tuple]:
    """The model inputs of the first ``config.rounding.batches`` training batches (GPTQ's calibration data); none
    unless the rounding reads data."""
    if config.rounding.how != "gptq":
        return []
    return [_model_inputs(task, gm, batch)
            for batch in _first_batches(train_loader, config.seed, config.rounding.batches)]


def _table_reads(task: Task, gm: GraphModule, train_loader: DataLoader, config: CompileConfig) -> dict[str, Tensor]:
    """How often the first ``config.quantizers.table_rows_batches`` training batches read each embedding-table row."""
    def model(*args: Any, **kwargs: Any) -> Any:
        return gm(*task.inputs.positional(args, kwargs))

    with augmentation_off(train_loader):  # read one batch at a time (as _first_batches picks them), none kept
        batches = itertools.islice(epoch_batches(train_loader, config.seed), config.quantizers.table_rows_batches)
        return count_reads(gm, batches, lambda batch: task.run_forward(model, batch, "counting embedding-table reads"),
                           progress=config.progress)


def _model_inputs(task: Task, gm: GraphModule, batch: Any) -> tuple:
    """The positional inputs the task's ``forward`` gives the model for ``batch`` (calibration data)."""
    seen: list[tuple] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(task.inputs.positional(args, kwargs))
        return gm(*seen[-1])

    with torch.no_grad():
        task.run_forward(recording, batch, "calibration, batch 0")
    if len(seen) != 1:
        raise DataError(f"forward must call the model once per batch; it called it {len(seen)} times")
    return seen[0]


def _output_spec(gm: GraphModule) -> pytree.TreeSpec | None:
    """The structure of the graph's outputs (the integer program returns their tensors flat), if all are tensors."""
    leaves, spec = pytree.tree_flatten(gm.graph.output_node().args[0])
    return spec if all(isinstance(leaf, torch.fx.Node) for leaf in leaves) else None


def _metric_section(task: Task, metrics: dict[str, dict[str, float] | None]) -> dict[str, Any]:
    """``{"metric": ...}``: the task and its metric's name (what ``accuracy`` holds), and every value it returned."""
    return {"task": task.name, "name": task.metric_name, "unit": task.metric_unit, "values": metrics}


def _output_width(gm: GraphModule, example_inputs: tuple) -> int:
    with torch.no_grad():
        output = gm(*example_inputs)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ConfigError("the model must return one [batch, classes] tensor of logits to be trained by mpqc")
    return output.shape[1]


def _identity(model: nn.Module, gm: GraphModule, budget: Budget, method: str, config: CompileConfig,
              train_loader: DataLoader, task: Task | None = None) -> dict[str, Any]:
    """What makes two runs the same run (and a resumed run the continuation of an interrupted one)."""
    identity = {
        "model": type(model).__qualname__,
        "graph": hashlib.sha256(gm.code.encode()).hexdigest()[:16],
        "budget": budget.text,
        "method": method,
        "config": config.identity(),
        "train_data": {"examples": len(train_loader.dataset), "batch_size": train_loader.batch_size},
    }
    if task is not None and task.step_accuracy is None:  # a run of another task than classification
        identity["task"] = {"name": task.name, "metric": task.metric_name}
    return identity
