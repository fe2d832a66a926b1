"""open_prepared(): a damaged or mismatched prepared directory is a one-line error before training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from darkhorse.data.prepare import prepare
from darkhorse.data.prepared import open_prepared
from darkhorse.errors import DarkhorseError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    raw = root / "raw.jsonl"
    raw.write_text("".join(json.dumps({"domain": "ab"[i % 2], "text": f"line {i}"}) + "\n" for i in range(80)))
    return prepare([raw], root / "pristine", vocab_size=300, val_fraction=0.2, progress=False).path


@pytest.fixture
def copy(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "data")


def _edit_meta(path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_pristine_directory_opens(pristine):
    data = open_prepared(pristine)
    assert data.domain_names == ["a", "b"] and len(data.tokens("val")) == data.split_info("val")["tokens"]


def test_token_file_not_a_multiple_of_four(copy):
    with open(copy / "train.bin", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(DarkhorseError, match=r"train\.bin: size \d+ is not a multiple of 4"):
        open_prepared(copy)


def test_token_id_at_or_above_vocab_size(copy):
    tokens = np.fromfile(copy / "train.bin", dtype="<u4")
    tokens[5] = 300_000
    tokens.tofile(copy / "train.bin")
    with pytest.raises(DarkhorseError, match="token id 300000 >= vocab size"):
        open_prepared(copy)


def test_token_count_disagreeing_with_meta(copy):
    _edit_meta(copy, lambda meta: meta["splits"]["train"].update(tokens=meta["splits"]["train"]["tokens"] + 1))
    with pytest.raises(DarkhorseError, match="but meta.json says"):
        open_prepared(copy)


def test_domain_file_of_the_wrong_length(copy):
    with open(copy / "val.domains.bin", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(DarkhorseError, match=r"val\.domains\.bin: holds \d+ domain ids for \d+ tokens"):
        open_prepared(copy)


def test_loss_mask_of_the_wrong_length_missing_or_not_zero_one(copy, tmp_path):
    shutil.copy(copy / "train.mask.bin", tmp_path / "mask.bin")
    with open(copy / "train.mask.bin", "ab") as handle:
        handle.write(b"\x01")
    with pytest.raises(DarkhorseError, match=r"train\.mask\.bin: holds \d+ loss-mask entries for \d+ tokens"):
        open_prepared(copy)
    (copy / "train.mask.bin").unlink()
    with pytest.raises(DarkhorseError, match="meta.json says loss_mask but train.mask.bin is missing"):
        open_prepared(copy)
    mask = np.fromfile(tmp_path / "mask.bin", dtype="u1")
    mask[3] = 2
    mask.tofile(copy / "train.mask.bin")
    with pytest.raises(DarkhorseError, match=r"train\.mask\.bin: holds the value 2; a loss mask is 0 or 1"):
        open_prepared(copy)


def test_data_prepared_without_a_loss_mask_counts_every_token(copy):
    (copy / "train.mask.bin").unlink()
    (copy / "val.mask.bin").unlink()
    _edit_meta(copy, lambda meta: meta.pop("loss_mask"))
    assert open_prepared(copy).loss_mask("train") is None


def test_domain_id_without_a_name(copy):
    _edit_meta(copy, lambda meta: meta.update(domains=["a"]))
    with pytest.raises(DarkhorseError, match="domain id 1 but meta.json names only 1 domains"):
        open_prepared(copy)


def test_replaced_tokenizer(copy):
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    with pytest.raises(DarkhorseError, match="does not match tokenizer_sha256"):
        open_prepared(copy)


def test_split_listed_but_missing(copy):
    (copy / "val.bin").unlink()
    with pytest.raises(DarkhorseError, match="lists the val split but val.bin is missing"):
        open_prepared(copy)


def test_not_a_prepared_directory(tmp_path):
    with pytest.raises(DarkhorseError, match="no meta.json"):
        open_prepared(tmp_path)
    with pytest.raises(DarkhorseError, match="not found"):
        open_prepared(tmp_path / "nope")


def test_other_format_version(copy):
    _edit_meta(copy, lambda meta: meta.update(format="something-else"))
    with pytest.raises(DarkhorseError, match="prepare the data again"):
        open_prepared(copy)
