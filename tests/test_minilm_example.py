"""examples/minilm.py's layer-wise (hidden-state) distillation, on a tiny random BertModel (no download, no wheel):
the encoder returning every layer's token states (the last first), the loss over the tokens the mask keeps, and a
compile with the user loss/forward/metric whose report measures the cosine to the fp32 model."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import mpqc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("mpqc_example_minilm", ROOT / "examples" / "minilm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


minilm = _load_example()


def tiny_encoder(all_layers: bool, layers: int = 2):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    return minilm.SentenceEncoder(transformers.BertModel(config).eval(), all_layers=all_layers)


def batch_of_texts(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[1::2, 5:] = 0  # every other text padded after 5 tokens
    return {"input_ids": torch.randint(0, 100, (n, 8), generator=generator), "attention_mask": mask}


def test_layerwise_loss_matches_every_layer_over_the_kept_tokens():
    encoder, plain = tiny_encoder(all_layers=True), tiny_encoder(all_layers=False)
    batch = batch_of_texts()
    with torch.no_grad():
        states = encoder(batch["input_ids"], batch["attention_mask"])
        outputs = minilm.pooled_and_layers(encoder, batch)
        assert len(states) == 3  # the last layer, then the embeddings' and layer 1's
        torch.testing.assert_close(states[0], plain(batch["input_ids"], batch["attention_mask"]))
        torch.testing.assert_close(minilm.pooled(encoder, batch), minilm.pooled(plain, batch))  # output 0 pooled
    assert float(minilm.layerwise_loss(outputs, batch, outputs)) == pytest.approx(0.0, abs=1e-6)
    assert minilm.cosine_to_fp32(outputs, batch, outputs)["cosine to fp32"] == pytest.approx(1.0)

    noisy = tuple(s + 0.1 * torch.randn_like(s) for s in states)
    student = (minilm.mean_pool(noisy[0], batch["attention_mask"]), noisy)
    keep = batch["attention_mask"].bool()
    layers = torch.stack([F.mse_loss(s[keep], t[keep]) / t[keep].pow(2).mean() for s, t in zip(noisy, states)])
    cosine = (1 - F.cosine_similarity(student[0], outputs[0], dim=1)).mean()
    torch.testing.assert_close(minilm.layerwise_loss(student, batch, outputs, layer_weight=2.0),
                               cosine + 2.0 * layers.mean())
    torch.testing.assert_close(minilm.layerwise_distillation(0.5)(student, batch, outputs),
                               cosine + 0.5 * layers.mean())
    # padded tokens do not count: changing their states changes neither term
    padded = tuple(torch.where(keep.unsqueeze(-1), s, s + 100.0) for s in noisy)
    torch.testing.assert_close(minilm.layerwise_loss((student[0], padded), batch, outputs),
                               minilm.layerwise_loss(student, batch, outputs))


@pytest.mark.slow  # ~15 s: search, freeze and fine-tune of a 2-layer BertModel with the example's layer-wise task
def test_layerwise_distillation_compiles_and_reports_the_cosine_to_fp32():
    encoder = tiny_encoder(all_layers=True)
    batches = [batch_of_texts(seed=seed) for seed in range(4)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    config = mpqc.CompileConfig(search=mpqc.TrainConfig(epochs=2, quantizer_lr=0.05),
                                finetune=mpqc.TrainConfig(epochs=2, lr=0.001, penalty_weight=0.0), progress=False)
    compiled = mpqc.compile(encoder, batches[0], budget="avg-bits=6", data=(loader, loader), config=config,
                            loss=minilm.layerwise_distillation(1.0), forward=minilm.pooled_and_layers,
                            metric=minilm.cosine_to_fp32)
    report = compiled.report
    assert report["budget"]["met"]
    assert report["metric"]["name"] == "cosine to fp32" and report["accuracy"]["fp32"] == pytest.approx(1.0)
    assert report["accuracy"]["integer_reference"] > 0.9
    with torch.no_grad():
        fp32 = minilm.embed(encoder, loader)
        integer = minilm.embed(compiled, loader)  # the integer model's output 0, pooled: the sentence embedding
    assert integer.shape == fp32.shape
    assert float(F.cosine_similarity(integer, fp32).mean()) == pytest.approx(report["accuracy"]["integer_reference"],
                                                                              abs=1e-3)
