"""The ``mpqc`` command line: a thin shell over the Python API.

    mpqc compile --model examples/models.py:resnet20 --data fashion-mnist --budget weight-memory=20KiB \\
                 --method dq --out runs/r20 [--resume | --force]
    mpqc report runs/r20
    mpqc export runs/r20 --onnx r20.onnx
    mpqc lower runs/r20 --target llvm --out artifacts/r20
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mpqc.cli_inputs import bits_or_budget, load_callable, prepare_run
from mpqc.config import TABLE_ROWS, WEIGHT_INITS, WEIGHT_ROUNDINGS
from mpqc.cpu import ISA_CHOICES
from mpqc.errors import ConfigError, MpqcError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="mpqc: %(message)s")
    from mpqc.distributed import RankFailedError, error_prefix, teardown

    succeeded = False
    try:
        status = args.run(args)
        succeeded = True
        return status
    except MpqcError as error:
        if not isinstance(error, RankFailedError):  # else the failed process has reported it
            print(f"mpqc {args.command}: error{error_prefix(str(error))}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mpqc {args.command}: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        teardown(synchronize=succeeded)  # leave the torchrun process group, if this process joined one


def _parser() -> argparse.ArgumentParser:
    from mpqc.budgets import BUDGET_KINDS
    from mpqc.quantizers import METHODS
    from mpqc.sweep import UNIFORM_BITS
    from mpqc.targets.fpga import COST_MODELS

    parser = argparse.ArgumentParser(prog="mpqc", description="Mixed-precision quantization compiler for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("compile", help="search bit-widths under a budget, freeze, fine-tune, write a report")
    c.add_argument("--model", required=True, help="FILE.py:CALLABLE or package.module:CALLABLE returning an nn.Module")
    c.add_argument("--data", required=True, help="dataset: fashion-mnist, digits (images); fortunes (texts labelled by "
                                                 "category), fortunes-text (unlabelled texts: distillation)")
    c.add_argument("--tokenizer", help="text sets: the directory of the model's saved tokenizer (default: the "
                                       "directory the model's Hugging Face config was loaded from)")
    c.add_argument("--max-length", type=int, default=64, help="text sets: tokens per text, padded or truncated "
                                                              "(default 64)")
    c.add_argument("--budget", required=True, help=f"KIND=VALUE, KIND one of {', '.join(BUDGET_KINDS)} "
                                                    "(e.g. weight-memory=20KiB, bitops=1.2G, avg-bits=2, "
                                                    "bitfusion=2.5M, latency=3ms)")
    c.add_argument("--method", default="dq", choices=sorted(METHODS), help="bit-width search method (default dq)")
    c.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, frozen model, report)")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    mode.add_argument("--force", action="store_true", help="overwrite whatever run --out holds")
    c.add_argument("--weights", type=Path, help="fp32 state_dict to start from (torch.save of model.state_dict())")
    c.add_argument("--pretrain-epochs", type=int, default=0,
                   help="train the fp32 model for N epochs first (cached under ~/.cache/mpqc/fp32)")
    c.add_argument("--search-epochs", type=int, default=2)
    c.add_argument("--finetune-epochs", type=int, default=1)
    c.add_argument("--steps-per-epoch", type=int, help="cut every epoch to N batches")
    c.add_argument("--checkpoint-every", type=int, default=50, help="write a checkpoint every N steps (and per epoch)")
    c.add_argument("--quantizer-lr", type=float, default=0.01, help="Adam learning rate of quantizer parameters")
    c.add_argument("--penalty-ramp", type=float, default=0.0,
                   help="grow the budget penalty's weight linearly over the search to (1 + RAMP) times its start, "
                        "so that the search itself reaches the budget (default 0: constant)")
    c.add_argument("--penalty-power", type=float, default=None,
                   help="the budget penalty is relu(cost/limit - 1) ** POWER: 2 DQ's squared hinge, 1 a linear hinge "
                        "that pulls the search onto the budget instead of a few percent above it (default: the "
                        "method's: 1 for fracbits-kernel, 2 for the others)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--subset", type=int, help="train on the first N examples of a seeded permutation")
    c.add_argument("--val-subset", type=int, help="validate on N examples")
    c.add_argument("--weight-bits", default="2-8", help="learnable weight bit range MIN-MAX (default 2-8)")
    c.add_argument("--act-bits", default="2-8", help="learnable activation bit range MIN-MAX (default 2-8)")
    c.add_argument("--first-last", choices=("learn", "fixed"), default="learn",
                   help="learn the first/last layers' precision (DQ, default) or keep them at 8 bits")
    c.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="augment the training batches with the data set's own augmentation (default off; "
                        "fashion-mnist: random crop with padding 2 and horizontal flip)")
    c.add_argument("--weight-init", choices=WEIGHT_INITS, default="mse",
                   help="where each weight channel's range starts: the MSE-best clipping (default) or its largest "
                        "magnitude")
    c.add_argument("--weight-init-bits", type=bits_or_budget, default=None, metavar="N|budget",
                   help="where the searched weights' bit-widths start: N bits, or 'budget' for the most bits at "
                        "which all of them meet the budget (default: 8)")
    c.add_argument("--shift-activations", action=argparse.BooleanOptionalAction, default=True,
                   help="GELU/SiLU/... read only by linears: shift the output to be nonnegative (unsigned codes), "
                        "the shift folded into the readers' biases (default on)")
    c.add_argument("--recompute-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each weight quantizer in the backward pass instead of keeping its intermediates: "
                        "about half the training memory of a large model, one more weight quantization per step "
                        "(default: on from 100 M quantized weights)")
    c.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="mse",
                   help="how the frozen weights are fitted to their integer grids before fine-tuning: mse (default: "
                        "each channel's range re-fitted to its bits), nearest (the searched ranges) or gptq (the mse "
                        "ranges, then GPTQ's error-compensating rounding on 4 training batches)")
    c.add_argument("--table-rows", choices=TABLE_ROWS, default="uniform",
                   help="embedding tables: every row at the table's bits (uniform, default) or each row's bits by how "
                        "often the training batches read it, at the same mean (frequency: a text model's frequent "
                        "tokens at more bits)")
    c.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="knowledge distillation from the fp32 model (default: the method's; sdq: on in fine-tuning)")
    c.add_argument("--loss", help="the task's loss(outputs, batch, teacher_outputs) -> scalar, as FILE.py:CALLABLE or "
                                   "module:CALLABLE; or distill (distill-kl, distill-mse, distill-cosine): agree with "
                                   "the fp32 model's outputs (default: classification, or distill without labels)")
    c.add_argument("--forward", help="forward(model, batch) -> outputs, as FILE.py:CALLABLE or module:CALLABLE "
                                      "(default: the model on the batch's inputs)")
    c.add_argument("--metric", help="metric(outputs, batch[, teacher_outputs]) -> {name: value}, first key maximised, as "
                                     "FILE.py:CALLABLE or module:CALLABLE (default: the task's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--dist-timeout", type=float, default=10.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others before failing (default 10)")
    c.set_defaults(run=_compile)

    sw = commands.add_parser("sweep", help="compile at every method x budget x activation bits, plus uniform QAT; "
                                            "write sweep.json and pareto.png (resumable)")
    for action in c._actions:  # the model, data and training options are compile's (argparse has no public copy)
        if action.dest in _SWEEP_SHARED_OPTIONS:
            sw._add_action(action)
    sw.add_argument("--method", default="dq", help="comma-separated methods, e.g. dq,fracbits,sdq,csq "
                                                   f"(known: {', '.join(sorted(METHODS))})")
    sw.add_argument("--budget", action="append", required=True,
                    help="KIND=V1,V2,... (repeatable). weight-memory in bits per weight with a lower-case b "
                         "(weight-memory=1.5b,2b,4b) or in bytes (B, KiB, ...); bitops=1.2G,2.4G; avg-bits=2,3; any "
                         "kind also WxAy, the cost of uniform x-bit weights and y-bit activations (bitops=W3A8)")
    sw.add_argument("--act-bits", default="8", help="comma-separated activation bit-widths, the second axis "
                                                    "(activations fixed at each; default 8)")
    sw.add_argument("--uniform", default=",".join(map(str, UNIFORM_BITS)),
                    help="uniform-QAT weight bit-widths for the reference curve, run where their cost falls in the "
                         "budgets' range (default %(default)s)")
    sw.add_argument("--no-uniform", action="store_true", help="no uniform-QAT reference points")
    sw.add_argument("--out", required=True, type=Path, help="sweep directory (sweep.json, pareto.png, points/)")
    sweep_mode = sw.add_mutually_exclusive_group()
    sweep_mode.add_argument("--resume", action="store_true", help="continue the sweep in --out (finished points "
                                                                  "are read back, not recomputed)")
    sweep_mode.add_argument("--force", action="store_true", help="delete the sweep in --out and start over")
    sw.set_defaults(run=_sweep)

    r = commands.add_parser("report", help="print the per-layer table of a run directory")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--cost", choices=sorted(COST_MODELS),
                   help="also print the modelled accelerator cycles per layer (mpqc.targets.fpga)")
    r.set_defaults(run=_report)

    e = commands.add_parser("export", help="write a run's integer model for a runtime, checked against the reference")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--onnx", type=Path, help="write a QDQ ONNX model here (mpqc.targets.onnx)")
    e.add_argument("--input-shape", help="example input shape, batch first, e.g. 1,1,28,28 (default: the report's)")
    e.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21; 16-bit codes need 21)")
    e.add_argument("--compact-weights", action="store_true",
                   help="store weights of <= 4 bits as INT4 (half the file; onnxruntime then computes those layers "
                        "in fp32, within 1 LSB per step but not end to end, so the check fails: see --no-check)")
    e.add_argument("--cpu", action="append", default=[], metavar="QEMU_CPU",
                   help="also check onnxruntime on an emulated CPU (qemu-x86_64 -cpu NAME, e.g. Haswell for AVX2 "
                        "without AVX-512); repeatable")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime check against the reference")
    e.set_defaults(run=_export)

    lo = commands.add_parser("lower", help="compile a run's integer model with Apache TVM, bit-exact with the reference")
    lo.add_argument("run_dir", type=Path)
    lo.add_argument("--target", default="llvm", help="llvm (this CPU, features detected), cuda (sm_80) or cuda:sm_XX")
    lo.add_argument("--out", required=True, type=Path, help="artifact directory: model.so, params.bin, model.json, "
                                                              "loader.py (runs with tvm + numpy only)")
    lo.add_argument("--input-shape", help="input shape, batch first, e.g. 1,1,28,28 (default: the report's)")
    lo.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (default 0: default schedules)")
    lo.add_argument("--tuning-db", type=Path, help="MetaSchedule database directory, reused by later lowerings")
    lo.add_argument("--no-check", action="store_true", help="skip the bit-exact check against the reference (llvm)")
    lo.add_argument("--vnni", choices=("auto", "on", "off"), default="auto",
                    help="mpqc's VNNI int8 kernels for conv/linear: auto (where the target has avx512vnni), on "
                         "(refused on a target without it), off (TVM's own int8 operators)")
    lo.add_argument("--isa", choices=ISA_CHOICES, default="auto",
                    help="the conv/linear int8 kernels: auto (the best the target has), or forced: amx (tile "
                         "registers, for convs whose channels fill 64-byte rows; the rest on avx512vnni), avx512vnni, "
                         "avxvnni (256-bit VEX vpdpbusd), avx2 (on an AVX-512 host these two build for x86-64-v3 "
                         "and run there; refused where the CPU lacks the flag), generic (TVM's own)")
    lo.set_defaults(run=_lower)
    return parser


def _task_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``loss``/``forward``/``metric`` of ``mpqc.compile`` from ``--loss``/``--forward``/``--metric``."""
    loss = args.loss if args.loss is None or args.loss.startswith("distill") else load_callable(args.loss, "--loss")
    return {"loss": loss,
            "forward": None if args.forward is None else load_callable(args.forward, "--forward"),
            "metric": None if args.metric is None else load_callable(args.metric, "--metric")}


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,1,28,28`` -> (1, 1, 28, 28); None when the option was not given."""
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} must look like 1,1,28,28") from None


def _compile(args: argparse.Namespace) -> int:
    from datetime import timedelta

    import mpqc
    from mpqc.distributed import setup
    from mpqc.report import format_report

    budget = mpqc.parse_budget(args.budget)  # refuse a bad budget string before any work
    world = setup(timeout=timedelta(minutes=args.dist_timeout))  # torchrun: join the other processes
    model, example, train_loader, val_loader, config = prepare_run(args, args.act_bits)
    result = mpqc.compile(model, example, budget=budget, data=(train_loader, val_loader), method=args.method,
                          config=config, out=args.out, resume=args.resume, force=args.force, **_task_arguments(args))
    if world.is_main:
        print(format_report(result.report))
        print(f"\nwrote {args.out}/report.json, bits.png, program.json, program.pt")
    return 0


#: ``mpqc sweep`` takes these options of ``mpqc compile`` as they are (``dest`` names).
_SWEEP_SHARED_OPTIONS = ("model", "data", "tokenizer", "max_length", "weights", "pretrain_epochs", "search_epochs",
                         "finetune_epochs", "steps_per_epoch", "checkpoint_every", "quantizer_lr", "penalty_ramp",
                         "penalty_power", "batch_size", "subset", "val_subset", "weight_bits", "first_last", "distill",
                         "seed", "no_progress",
                         "loss", "forward", "metric", "augment", "weight_init", "weight_init_bits", "weight_rounding",
                         "shift_activations", "recompute_weights", "table_rows")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers, e.g. 8,4") from None


def _sweep(args: argparse.Namespace) -> int:
    from mpqc.sweep import parse_sweep_budgets, sweep

    budgets = [budget for text in args.budget for budget in parse_sweep_budgets(text)]  # refuse bad ones first
    act_bits = _int_list(args.act_bits, "--act-bits")
    uniform = None if args.no_uniform else _int_list(args.uniform, "--uniform")
    model, example, train_loader, val_loader, config = prepare_run(args, "2-8")
    result = sweep(model, example, data=(train_loader, val_loader), budgets=[b.label for b in budgets],
                   methods=args.method, act_bits=act_bits, uniform_bits=uniform, config=config, out=args.out,
                   resume=args.resume, force=args.force, **_task_arguments(args))
    print(result.table())
    print(f"\nwrote {args.out}/sweep.json, pareto.png, points/")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mpqc.report import format_report, load_report
    from mpqc.sweep import format_sweep, is_sweep_directory, load_sweep

    if is_sweep_directory(args.run_dir):
        print(format_sweep(load_sweep(args.run_dir).to_dict()))
        return 0
    report = load_report(args.run_dir)
    print(format_report(report))
    if args.cost:
        from mpqc.targets.fpga import cost_report, format_cost, layers_from_report

        print("\n" + format_cost(cost_report(*layers_from_report(report), args.cost)))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from mpqc.compile import CompiledModel
    from mpqc.targets.onnx import export_onnx, input_shape_from_report
    from mpqc.targets.onnx_check import check_agreement, compare_with_reference, format_agreement

    if args.onnx is None:
        raise ConfigError("give a target to export to, e.g. --onnx model.onnx")
    compiled = CompiledModel.load(args.run_dir)
    shape = _input_shape(args.input_shape)
    if shape is None:
        shape = input_shape_from_report(compiled)
        if shape is None:
            raise ConfigError(f"--input-shape: {args.run_dir}/report.json does not tell the input shape; pass one")
    examples = torch.randn((16, *shape[1:]), generator=torch.Generator().manual_seed(0))
    try:
        compiled.program.run(examples)
    except (RuntimeError, MpqcError) as error:
        raise ConfigError(f"--input-shape {','.join(map(str, shape))}: the model does not run on it: {error}") from None
    exported = export_onnx(compiled, args.onnx, input_shapes=[shape], opset=args.opset,
                           compact_weights=args.compact_weights)
    storage = ", ".join(f"{count} {kind}" for kind, count in exported.storage_counts().items())
    print(f"wrote {exported.path} (opset {exported.opset}; weights and activation codes stored as {storage})")
    if args.no_check:
        return 0
    for cpu in [None, *args.cpu]:
        agreement = compare_with_reference(compiled, exported.path, examples, cpu=cpu)
        print(f"onnxruntime vs the integer reference on 16 random inputs:\n{format_agreement(agreement)}")
        check_agreement(agreement, what=str(exported.path))
    return 0


def _lower(args: argparse.Namespace) -> int:
    import torch

    from mpqc.compile import CompiledModel
    from mpqc.targets.tvm import lower

    shape = _input_shape(args.input_shape)
    compiled = CompiledModel.load(args.run_dir)
    lowered = lower(compiled, target=args.target, out=args.out, input_shape=shape, trials=args.trials,
                    tuning_db=args.tuning_db, vnni={"auto": None, "on": True, "off": False}[args.vnni],
                    isa=args.isa)
    print(f"wrote {args.out}/model.so, params.bin, model.json, loader.py ({lowered.kind}, "
          f"built in {lowered.build_seconds:.1f} s)")
    if args.no_check or lowered.kind != "llvm":
        return 0
    shape = tuple(lowered.meta["inputs"][0]["shape"])
    examples = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if not torch.equal(lowered(examples), compiled.program.run(examples)):
        raise MpqcError(f"{args.out}: the TVM module's outputs differ from the integer reference")
    print(f"checked: outputs equal to the integer reference bit for bit on a random {','.join(map(str, shape))} input")
    return 0


if __name__ == "__main__":  # python -m mpqc.cli
    sys.exit(main())
