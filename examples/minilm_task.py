"""The tasks of ``examples/minilm.py``: how a batch of texts runs through the encoder, its losses and its metrics.

Sentence embeddings are the mean of the token states over the attention mask (:func:`mean_pool`, as
sentence-transformers pools them), taken in the task's ``forward`` outside the compiled graph. Layer-wise
distillation (TinyBERT / TernaryBERT) uses an encoder returning every layer's token states, the last layer's first
(``minilm.minilm_layers``): :func:`pooled_and_layers` (``forward=``), :func:`layerwise_loss` (``loss=``),
:func:`cosine_to_fp32` (``metric=``, reading the fp32 model's outputs). The classifier's: :func:`cross_entropy`,
:func:`top1`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_pool(tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of ``tokens`` over the positions the attention mask keeps."""
    weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pooled(model, batch: dict[str, Tensor]) -> Tensor:
    """``forward=``: the model on the batch's keyword inputs, mean-pooled over its tokens (of its output 0 when it
    returns every layer's)."""
    tokens = model(batch["input_ids"], batch["attention_mask"])
    return mean_pool(tokens[0] if isinstance(tokens, (tuple, list)) else tokens, batch["attention_mask"])


def pooled_and_layers(model, batch: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``forward=`` of layer-wise distillation: the pooled embedding and every layer's token states (the model:
    :func:`minilm_layers`)."""
    states = tuple(model(batch["input_ids"], batch["attention_mask"]))
    return mean_pool(states[0], batch["attention_mask"]), states


#: The weight of the hidden-state term of :func:`layerwise_loss` (``--layer-weight``).
LAYER_WEIGHT = 1.0


def layerwise_loss(outputs: tuple[Tensor, tuple[Tensor, ...]], batch: dict[str, Tensor],
                   teacher: tuple[Tensor, tuple[Tensor, ...]], layer_weight: float | None = None) -> Tensor:
    """``loss=`` of layer-wise distillation (TinyBERT / TernaryBERT): 1 - cosine of the pooled embeddings, plus
    ``layer_weight`` times the mean over layers of each layer's squared error to the fp32 token states (over the
    tokens the attention mask keeps), relative to their mean square."""
    (embedding, states), (teacher_embedding, teacher_states) = outputs, teacher
    keep = batch["attention_mask"].bool()
    cosine = (1 - F.cosine_similarity(embedding, teacher_embedding.detach(), dim=1)).mean()
    errors = [F.mse_loss(s[keep], t[keep].detach()) / t[keep].detach().pow(2).mean().clamp_min(1e-12)
              for s, t in zip(states, teacher_states)]
    weight = LAYER_WEIGHT if layer_weight is None else layer_weight
    return cosine + weight * torch.stack(errors).mean()


def layerwise_distillation(layer_weight: float):
    """:func:`layerwise_loss` with its hidden-state term weighted ``layer_weight``."""
    def layerwise(outputs, batch: dict[str, Tensor], teacher) -> Tensor:
        return layerwise_loss(outputs, batch, teacher, layer_weight)
    layerwise.__qualname__ = f"layerwise_loss(layer_weight={layer_weight:g})"
    return layerwise


def cosine_to_fp32(outputs, batch: dict[str, Tensor], teacher) -> dict[str, float]:
    """``metric=`` of layer-wise distillation: the mean cosine of the pooled embeddings to the fp32 model's."""
    return {"cosine to fp32": float(F.cosine_similarity(outputs[0], teacher[0], dim=1).mean())}


def cross_entropy(logits: Tensor, batch: dict[str, Tensor], teacher_logits: Tensor | None) -> Tensor:
    """``loss=`` of the classifier (the pooled logits against the category labels)."""
    return F.cross_entropy(logits, batch["labels"])


def top1(logits: Tensor, batch: dict[str, Tensor]) -> dict[str, float]:
    """``metric=`` of the classifier: held-out accuracy in percent."""
    return {"top-1": float((logits.argmax(1) == batch["labels"]).float().mean() * 100)}
