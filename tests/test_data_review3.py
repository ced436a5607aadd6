"""Image-folder layouts that lost images or labels without a word (found by a review in the seventeenth session)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from test_data import collect, make_folder

from igpt import data
from igpt.errors import IgptError


def _png(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def test_images_beside_class_folders_are_refused(tmp_path, rng):
    make_folder(tmp_path / "a", rng)
    _png(tmp_path / "a" / "loose.png", rng)  # was left out: 6 images read, not 7
    with pytest.raises(IgptError, match=r"1 image file\(s\) \(e.g. loose.png\) beside class folders"):
        data.folder_source(tmp_path / "a")
    make_folder(tmp_path / "s" / "train", rng)
    _png(tmp_path / "s" / "stray.png", rng)  # beside train/ and test/
    with pytest.raises(IgptError, match="beside the split folders"):
        data.folder_source(tmp_path / "s")


def test_a_class_whose_images_sit_in_subfolders_is_refused(tmp_path, rng):
    make_folder(tmp_path / "a", rng)
    _png(tmp_path / "a" / "bird" / "2024" / "0.png", rng)  # the class 'bird' vanished: 2 classes, not 3
    with pytest.raises(IgptError, match=r"bird: its images are in subfolders"):
        data.folder_source(tmp_path / "a")
    (tmp_path / "a" / "bird" / "2024" / "0.png").unlink()  # a folder with nothing to read is still no class
    assert data.folder_source(tmp_path / "a").class_names == ["cat", "dog"]


def test_a_split_without_class_folders_beside_labelled_ones_is_refused(tmp_path, rng):
    make_folder(tmp_path / "s" / "train", rng)
    make_folder(tmp_path / "flat", rng, classes=("x",))
    shutil.copytree(tmp_path / "flat" / "x", tmp_path / "s" / "test")  # test/*.png: no classes
    with pytest.raises(IgptError, match=r"the test split\(s\) hold images without class folders"):
        data.folder_source(tmp_path / "s")  # shards had "labels": false beside train_labels.npy
    shutil.rmtree(tmp_path / "s" / "test")
    make_folder(tmp_path / "s" / "test", rng, per=1)
    src = data.folder_source(tmp_path / "s")
    assert src.class_names == ["cat", "dog"] and list(collect(src.splits["test"])[1]) == [0, 1]
