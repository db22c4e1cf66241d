"""The one training loop, used by the bit-width search and by fine-tuning, checkpointed and exactly resumable.

Loss = the task's loss (:mod:`mpqc.task`; classification: cross-entropy), optionally mixed with knowledge
       distillation from the fp32 teacher
       + ``penalty_weight`` * (1 + ``penalty_ramp`` * progress) * budget penalty (search only; its shape
         ``relu(cost / limit - 1) ** penalty_power``)
       + every quantizer's ``extra_loss()``;  progress goes from 0 at the phase's first step to 1 at its last.
Weights train with SGD (``TrainConfig.momentum``, Nesterov's by default, weight decay, cosine schedule), quantizer
parameters with Adam and no weight decay.

Exact resume: each epoch starts from ``torch.manual_seed(seed + epoch)`` (and re-seeds the train loader's own
generator, if it has one), so an epoch's batch order is a function of the seed and the epoch alone. A checkpoint
stores the model, both optimizers, the scheduler, the position (epoch, step) and the torch RNG state; resuming
replays the epoch's data order, skips the batches already seen, restores the RNG and goes on. With deterministic
CPU kernels the resumed run equals an uninterrupted one bit for bit.

Several processes (``torchrun``, see :mod:`mpqc.distributed`): when torch.distributed is initialised with more than
one process, every process loads its slice of each global batch, DistributedDataParallel wraps the whole step's
objective (:class:`_Objective`), and rank 0 alone writes checkpoints and shows progress; a checkpoint to resume
from is read by rank 0 and sent to the others.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpqc.budgets import Budget, LayerBits
from mpqc.checkpoint import load_checkpoint, save_checkpoint
from mpqc.config import TrainConfig
from mpqc.distributed import World, collective_failure, current_world
from mpqc.errors import CheckpointError, DataError, MpqcError, TaskError, TrainingDivergedError
from mpqc.layers import LayerInfo
from mpqc.quantizers.base import Quantizer
from mpqc.task import Inputs, Task, classification

#: The task of a caller that names none: classification of a one-input model.
DEFAULT_TASK = classification(Inputs(("input",)))


@dataclass(frozen=True)
class BudgetTerm:
    """What the search adds to the loss: ``budget.penalty(layers, bits(), power)``."""

    budget: Budget
    layers: Sequence[LayerInfo]
    bits: Callable[[], Mapping[str, LayerBits]]

    def cost(self) -> Tensor:
        return self.budget.cost(self.layers, self.bits())

    def penalty(self, power: float) -> Tensor:
        return self.budget.penalty(self.layers, self.bits(), power)


def train_phase(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    phase: str,
    checkpoint: Path | None,
    seed: int,
    budget: BudgetTerm | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    task: Task = DEFAULT_TASK,
) -> dict[str, float]:
    """Train ``model`` in place for ``config.epochs`` on ``task``; resume from ``checkpoint`` if it holds one of
    this phase.

    Returns the last step's metrics (over the global batch). ``stop_after_steps`` ends the call early after that
    many *new* steps (a checkpoint is written first): tests use it to simulate an interruption. Under torchrun the
    phase runs data-parallel on every process of the default process group (:mod:`mpqc.distributed`).
    """
    if len(train_loader) == 0:
        raise DataError(f"{phase}: the train loader is empty")
    world = current_world()
    try:
        return _train_phase(model, train_loader, config, phase=phase, checkpoint=checkpoint, seed=seed,
                            budget=budget, teacher=teacher, progress=progress, stop_after_steps=stop_after_steps,
                            world=world, task=task)
    except MpqcError:
        raise
    except Exception as error:  # another process stopped: say so, and where the last checkpoint is
        failure = collective_failure(world, f"{phase} (last checkpoint: {checkpoint})", error)
        if failure is None:
            raise
        raise failure from error


def _train_phase(
    model: nn.Module, train_loader: DataLoader, config: TrainConfig, *, phase: str, checkpoint: Path | None,
    seed: int, budget: BudgetTerm | None, teacher: nn.Module | None, progress: bool, stop_after_steps: int | None,
    world: World, task: Task,
) -> dict[str, float]:
    steps_per_epoch = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
    total_steps = steps_per_epoch * config.epochs
    quantizer_params = [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]
    quantizer_ids = {id(p) for p in quantizer_params}
    weight_params = [p for p in model.parameters() if id(p) not in quantizer_ids]
    weight_opt = torch.optim.SGD(weight_params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                 weight_decay=config.weight_decay)
    quant_opt = torch.optim.Adam(quantizer_params, lr=config.quantizer_lr) if quantizer_params else None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(weight_opt, T_max=max(total_steps, 1))

    epoch, step_in_epoch, rng_state = 0, 0, None
    # Rank 0 reads the checkpoint and sends it to every process (no shared file system needed).
    state = world.call_on_main(lambda: load_checkpoint(checkpoint)) if checkpoint is not None else None
    if state is not None:
        if state.get("phase") != phase:
            raise CheckpointError(f"checkpoint {checkpoint} belongs to phase {state.get('phase')!r}, not {phase!r}")
        model.load_state_dict(state["model"])
        weight_opt.load_state_dict(state["weight_optimizer"])
        if quant_opt is not None:
            quant_opt.load_state_dict(state["quantizer_optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        # At an epoch boundary the RNG is fully determined by the epoch seed; mid-epoch it is restored.
        rng_state = state["rng"] if step_in_epoch > 0 else None
        metrics = dict(state["metrics"])
    else:
        metrics = {}

    def save(epoch_: int, step_: int) -> None:
        if checkpoint is None or not world.is_main:
            return
        save_checkpoint({
            "phase": phase, "model": model.state_dict(), "weight_optimizer": weight_opt.state_dict(),
            "quantizer_optimizer": quant_opt.state_dict() if quant_opt is not None else {},
            "scheduler": scheduler.state_dict(), "epoch": epoch_, "step_in_epoch": step_,
            "rng": torch.get_rng_state(), "metrics": metrics,
        }, checkpoint)

    new_steps = 0
    objective = world.wrap(_Objective(model, config, budget, teacher, world, task))  # DDP on several processes
    train_loader = world.shard(train_loader)  # this process's slice of every global batch
    bar = tqdm(total=total_steps, initial=epoch * steps_per_epoch + step_in_epoch, desc=phase,
               disable=not (progress and world.is_main), dynamic_ncols=True)
    try:
        while epoch < config.epochs:
            model.train()
            batches = epoch_batches(train_loader, seed + epoch)
            for _ in range(step_in_epoch):
                next(batches)
            if rng_state is not None:
                torch.set_rng_state(rng_state)
                rng_state = None
            while step_in_epoch < steps_per_epoch:
                batch = next(batches)
                progress_fraction = (epoch * steps_per_epoch + step_in_epoch) / max(total_steps - 1, 1)
                for module in model.modules():
                    if isinstance(module, Quantizer):
                        module.set_progress(progress_fraction)
                where = f"{phase} epoch {epoch + 1}, batch {step_in_epoch}"
                metrics = _step(model, objective, batch, budget, weight_opt, quant_opt, progress_fraction, where)
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDivergedError(
                        f"{phase}: the loss became {metrics['loss']} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                        f"(task loss {task.name}: {metrics['task_loss']}); the last good checkpoint ({checkpoint}) "
                        "is kept. Lower the learning rates, or check the loss."
                    )
                scheduler.step()
                step_in_epoch += 1
                new_steps += 1
                bar.update(1)
                bar.set_postfix(_postfix(metrics, budget), refresh=False)
                if step_in_epoch % config.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    save(epoch, step_in_epoch)
                if stop_after_steps is not None and new_steps >= stop_after_steps:
                    save(epoch, step_in_epoch)
                    return metrics
            world.check_same_batches(train_loader, f"{phase} epoch {epoch + 1}")
            epoch, step_in_epoch = epoch + 1, 0
            save(epoch, 0)
    finally:
        bar.close()
    return metrics


def epoch_batches(loader: DataLoader, epoch_seed: int):
    """An iterator over ``loader`` whose order depends on ``epoch_seed`` alone (re-seeds torch and the loader)."""
    torch.manual_seed(epoch_seed)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(epoch_seed)
    return iter(loader)


class _Objective(nn.Module):
    """The whole loss of one training step as one module: the task's loss (mixed with distillation from ``teacher``)
    on this process's slice of the global batch, weighted by its share of it, plus every quantizer's
    ``extra_loss()`` and the weighted budget penalty (both computed identically on every process).

    Being one module lets DDP see every use of every parameter (the budget penalty reads quantizer parameters
    outside the model's forward). ``forward`` returns ``(loss, metrics)``; ``metrics`` are over the global batch.
    The teacher is kept out of the registered submodules: it is neither trained nor synchronized.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, budget: BudgetTerm | None, teacher: nn.Module | None,
                 world: World, task: Task) -> None:
        super().__init__()
        self.model = model
        self._fixed = (config, budget, teacher, world, task)

    def forward(self, batch, progress: float = 0.0, where: str = "training") -> tuple[Tensor, dict[str, float]]:
        config, budget, teacher, world, task = self._fixed
        outputs = task.run_forward(self.model, batch, where)
        mix = task.kd is not None and teacher is not None and bool(config.distill)
        teacher_outputs = None
        if teacher is not None and (task.uses_teacher or mix):
            with torch.no_grad():
                teacher_outputs = task.run_forward(teacher, batch, f"{where} (fp32 teacher)")
        elif task.uses_teacher:
            raise MpqcError(f"{where}: the task {task.name} needs the fp32 model's outputs, but no teacher was given")
        task_loss = task.compute_loss(outputs, batch, teacher_outputs, where)
        data_loss = task_loss
        if mix:
            distill = task.kd(outputs, teacher_outputs, config.distill_temperature)
            data_loss = (1 - config.distill_weight) * task_loss + config.distill_weight * distill
        means = [task_loss.detach(), data_loss.detach()]
        if task.step_accuracy is not None:
            means.append(task.step_accuracy(outputs, batch))
        share, global_means = world.global_batch_means(task.batch_size(batch), torch.stack(means))
        task_mean, data_mean = global_means[0], global_means[1]
        loss = data_loss * share  # share = 1.0 in one process
        data_free = torch.zeros(())
        for module in self.model.modules():
            if isinstance(module, Quantizer):
                extra = module.extra_loss()
                if extra is not None:
                    loss = loss + extra
                    data_free = data_free + extra.detach()
        metrics = {"task_loss": float(task_mean)}
        if task.step_accuracy is not None:
            metrics["accuracy"] = float(global_means[2] * 100)
        if budget is not None and config.penalty_weight > 0:
            penalty = budget.penalty(config.effective_penalty_power)
            weight = config.penalty_weight * (1.0 + config.penalty_ramp * progress)
            loss = loss + weight * penalty
            data_free = data_free + weight * penalty.detach()
            metrics["penalty"] = penalty.item()
        metrics["loss"] = float(data_mean) + float(data_free)
        return loss, metrics


def _step(model: nn.Module, objective: nn.Module, batch, budget: BudgetTerm | None,
          weight_opt, quant_opt, progress: float, where: str) -> dict[str, float]:
    # the last step's gradients (a copy of every weight) are freed before this step's forward pass, not after it
    weight_opt.zero_grad(set_to_none=True)
    if quant_opt is not None:
        quant_opt.zero_grad(set_to_none=True)
    loss, metrics = objective(batch, progress, where)
    if not math.isfinite(metrics["loss"]):
        return metrics
    loss.backward()
    weight_opt.step()
    if quant_opt is not None:
        quant_opt.step()
        for module in model.modules():
            if isinstance(module, Quantizer):
                module.project_()
    if budget is not None:
        with torch.no_grad():
            metrics["cost"] = float(budget.cost())
    return metrics


def _postfix(metrics: dict[str, float], budget: BudgetTerm | None) -> dict[str, str]:
    shown = {"loss": f"{metrics['loss']:.3f}"}
    if "accuracy" in metrics:
        shown["acc"] = f"{metrics['accuracy']:.1f}%"
    if budget is not None and "cost" in metrics:
        shown["cost"] = f"{budget.budget.format(metrics['cost'])} / {budget.budget.format(budget.budget.limit)}"
    return shown


@torch.no_grad()
def evaluate(model: Callable[..., Any], loader: DataLoader, world: World | None = None, *,
             task: Task = DEFAULT_TASK, teacher: Callable[..., Any] | None = None) -> float:
    """The task's metric (classification: top-1 accuracy in percent) of ``model`` on ``loader``; see
    :func:`evaluate_metrics`."""
    return evaluate_metrics(model, loader, world, task=task, teacher=teacher)[task.metric_name]


@torch.no_grad()
def evaluate_metrics(model: Callable[..., Any], loader: DataLoader, world: World | None = None, *,
                     task: Task = DEFAULT_TASK, teacher: Callable[..., Any] | None = None) -> dict[str, float]:
    """Every value of the task's metric of ``model`` on ``loader``, each the mean over the examples (per-batch
    values weighted by batch size). ``model`` is a module (run in eval mode on its parameters' device, its previous
    mode restored afterwards) or any callable, such as an integer program's ``run``; ``teacher``: the fp32 model,
    run where the task's metric reads its outputs (``Task.metric_uses_teacher``).

    With a multi-process ``world`` every process evaluates its slice of each batch and the sums are added, so
    every process returns the metric on the whole of ``loader`` (every process must call it)."""
    if task.metric_uses_teacher and teacher is None:
        raise MpqcError(f"evaluating {task.name}: its metric {task.metric_name!r} compares with the fp32 model's "
                        "outputs; pass teacher=")
    module = model if isinstance(model, nn.Module) else None
    device = next(module.parameters()).device if module is not None else torch.device("cpu")
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    world = world or World()
    sums: dict[str, float] = {}
    seen = 0
    try:
        for index, batch in enumerate(world.shard(loader, allow_empty=True)):
            batch = pytree.tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, batch)
            where = f"evaluation, batch {index}"
            outputs = task.run_forward(model, batch, where)
            teacher_outputs = None
            if teacher is not None and task.metric_uses_teacher:
                teacher_outputs = task.run_forward(teacher, batch, where + " (fp32 teacher)")
            count = task.batch_size(batch)
            values = task.compute_metric(outputs, batch, teacher_outputs, where)
            if sums and list(values) != list(sums):
                raise TaskError(f"{where}: the metric returned keys {list(values)}, the first batch {list(sums)}")
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value * count
            seen += count
    finally:
        if module is not None:
            module.train(was_training)
    keys = list(sums) or [task.metric_name]
    totals = world.sum([sums.get(key, 0.0) for key in keys] + [seen])
    seen = totals[-1]
    if seen == 0:
        raise DataError("cannot evaluate on an empty loader")
    return {key: total / seen for key, total in zip(keys, totals)}


def finetune(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    checkpoint: Path | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    task: Task = DEFAULT_TASK,
) -> dict[str, float]:
    """Fine-tune a frozen-precision model (weights and quantizer scales) on ``task``, with KD from ``teacher`` if
    configured."""
    return train_phase(
        model, train_loader, config, phase="finetune", checkpoint=checkpoint, seed=seed, teacher=teacher,
        progress=progress, stop_after_steps=stop_after_steps, task=task,
    )
