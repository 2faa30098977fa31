"""Image and text classification sources: HF datasets on disk, image folders, torchvision's error, text (issue 21)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lit_align.data import ForgetSplit, HoldoutSplit, ImageClassificationDataModule, TextClassificationDataModule
from lit_align.errors import ConfigError, DataError
from lit_align.models.causal_lm import TINY_TOKENIZER


def _image(value: int, size=(6, 5), mode="RGB"):
    from PIL import Image

    colour = (value, 255 - value, value // 2) if mode == "RGB" else value
    return Image.new(mode, size, colour)


def test_hf_dataset_on_disk_with_sub_classes(tmp_path):
    """A tiny CIFAR-100-like set saved with save_to_disk (and as a directory of parquet files): super-classes as y,
    sub-classes as fine labels, and its own test split as the test subset."""
    import datasets

    def part(n, offset):
        fine = [(i + offset) % 4 for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": [_image(10 * i) for i in range(n)], "fine_label": fine, "coarse_label": [f // 2 for f in fine]},
            features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64"),
                                        "coarse_label": datasets.ClassLabel(names=["animals", "vehicles"])}))

    datasets.DatasetDict({"train": part(24, 0), "test": part(8, 1)}).save_to_disk(str(tmp_path / "tiny"))
    (tmp_path / "parquet").mkdir()
    part(24, 0).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    part(8, 1).to_parquet(str(tmp_path / "parquet" / "test.parquet"))
    from_files = ImageClassificationDataModule(f"hf:{tmp_path / 'parquet'}", image_column="img",
                                               label_column="fine_label")
    from_files.setup()
    assert from_files.num_classes == 4 and from_files.indices("test").tolist() == list(range(24, 32))
    dm = ImageClassificationDataModule(f"hf:{tmp_path / 'tiny'}", image_column="img", label_column="coarse_label",
                                       fine_label_column="fine_label",
                                       split=ForgetSplit(kind="sub_class", sub_classes=[3], val_fraction=0.25),
                                       batch_size=4)
    dm.setup()
    assert dm.input_shape == (3, 5, 6) and dm.class_names == ["animals", "vehicles"]
    assert dm.indices("test").tolist() == list(range(24, 32))  # the source's own test split
    fine = dm.rows.fine_labels
    assert set(fine[dm.indices("forget")]) == {3} and 3 not in set(fine[dm.indices("retain")])
    assert set(dm.rows.labels[dm.indices("forget")]) == {1}
    batch = next(iter(dm.loader("forget", shuffle=True)))
    assert set(batch) == {"x", "y", "index"} and batch["x"].dtype == torch.float32
    row = int(batch["index"][0])
    expected = torch.tensor([10 * row, 255 - 10 * row, 5 * row], dtype=torch.float32) / 255
    torch.testing.assert_close(batch["x"][0, :, 0, 0], expected)
    with pytest.raises(DataError, match=r"data\.image_column='image' is not a column.*'img'"):
        ImageClassificationDataModule(f"hf:{tmp_path / 'tiny'}").setup()


def test_image_folder_offline(tmp_path):
    for name, value, size in (("cat", 40, (4, 4)), ("dog", 200, (7, 5))):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(6):
            _image(value + i, size=size, mode="L").save(tmp_path / "pics" / name / f"{i}.png")
    with pytest.raises(DataError, match=r"different sizes.*data\.image_size"):
        ImageClassificationDataModule(f"folder:{tmp_path / 'pics'}").setup()
    dm = ImageClassificationDataModule(f"folder:{tmp_path / 'pics'}", image_size=4,
                                       split=HoldoutSplit(val_fraction=0.25, test_fraction=0.25))
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and dm.input_shape == (1, 4, 4)
    x, y = dm.features(np.arange(12)), dm.labels(np.arange(12))
    assert torch.equal(y.bincount(), torch.tensor([6, 6]))
    assert torch.all((x[y == 0] < 50 / 255) & (x[y == 1] > 199 / 255))  # each image under its folder's class
    with pytest.raises(ConfigError, match="no such directory"):
        ImageClassificationDataModule(f"folder:{tmp_path / 'none'}").setup()


def test_torchvision_source_without_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # import fails, as on this machine
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError, match=r"torchvision:CIFAR10.*needs torchvision.*hf:uoft-cs/cifar10"):
        ImageClassificationDataModule("torchvision:CIFAR10").setup()
    with pytest.raises(ConfigError, match="CIFAR10, CIFAR100, SVHN"):
        ImageClassificationDataModule("torchvision:MNIST").setup()


def _jsonl(tmp_path) -> str:
    topics = ["sport", "space", "cooking"]
    words = {"sport": "the team won the match", "space": "a rocket to the moon", "cooking": "bake the bread"}
    path = tmp_path / "news.jsonl"
    with path.open("w") as f:
        for i in range(30):
            topic = topics[i % 3]
            row = {"body": f"{words[topic]} " * (1 + i % 4), "topic": topic, "lang": "en" if i % 2 else "fr"}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_text_from_local_jsonl_padded_per_batch(tmp_path):
    dm = TextClassificationDataModule(_jsonl(tmp_path), tokenizer=TINY_TOKENIZER, text_column="body",
                                      label_column="topic", group_column="lang", group_positive="en", max_length=12,
                                      split=HoldoutSplit(val_fraction=0.2, test_fraction=0.2), batch_size=4)
    dm.setup()
    assert dm.class_names == ["cooking", "space", "sport"] and dm.input_shape == () and dm.num_groups == 2
    batch = next(iter(dm.loader("train", shuffle=True)))
    assert set(batch) == {"x", "y", "index"}
    ids, mask = batch["x"]["input_ids"], batch["x"]["attention_mask"]
    lengths = [len(dm.tokenizer(json.loads(line)["body"])["input_ids"][:12])
               for line in open(tmp_path / "news.jsonl")]
    expected = [lengths[i] for i in batch["index"].tolist()]
    assert ids.shape == (4, max(expected)) and mask.sum(1).tolist() == expected  # padded to the batch's longest
    assert torch.all(ids[mask == 0] == dm.tokenizer.pad_token_id)
    assert max(lengths) == 12  # cut at max_length
    val = next(iter(dm.loader("val")))
    assert "group" in val and torch.equal(val["group"], dm.groups(val["index"]))
    features = dm.features(batch["index"])
    assert torch.equal(features["input_ids"], ids) and torch.equal(features["attention_mask"], mask)
    with pytest.raises(DataError, match=r"record 1 has no column 'text' \(data\.text_column\).*'body'"):
        TextClassificationDataModule(_jsonl(tmp_path), tokenizer=TINY_TOKENIZER, label_column="topic").setup()


def test_text_from_hf_dataset_dir(tmp_path):
    import datasets

    rows = [json.loads(line) for line in open(_jsonl(tmp_path))]
    data = {"text": [r["body"] for r in rows], "label": [i % 3 for i in range(30)],
            "label_text": [r["topic"] for r in rows]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data),
                          "test": datasets.Dataset.from_dict({k: v[:6] for k, v in data.items()})}
                         ).save_to_disk(str(tmp_path / "news"))
    dm = TextClassificationDataModule(f"hf:{tmp_path / 'news'}", tokenizer=TINY_TOKENIZER,
                                      label_name_column="label_text", split=ForgetSplit(kind="class_wise", classes=[2]))
    dm.setup()
    assert dm.class_names == ["sport", "space", "cooking"]
    assert dm.indices("test").tolist() == list(range(30, 36)) and dm.num_classes == 3
    assert set(dm.rows.labels[dm.indices("forget")]) == {2}
