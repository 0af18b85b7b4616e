"""Eval images from tiny files in the real formats: CIFAR python batches, image folders, HF Parquet."""

from __future__ import annotations

import io
import os
import pickle
import shlex

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from invariance.config import DataConfig
from invariance.io.data import load_eval_images, load_labelled_images
from invariance.errors import DataError

# --- writers of the real formats -------------------------------------------------------------


def cifar_rows(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3072]`` uint8: per row the R, G, B planes of a 32x32 image, row-major (CIFAR layout)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(folder, rows: np.ndarray) -> str:
    """A ``cifar-10-batches-py`` folder with ``test_batch`` as the CIFAR site ships it."""
    folder.mkdir(parents=True, exist_ok=True)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(k % 10) for k in range(len(rows))],
        b"data": rows,
        b"filenames": [f"img_{k}.png".encode() for k in range(len(rows))],
    }
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return str(folder)


def write_cifar100(folder, rows: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    batch = {
        b"filenames": [f"img_{k}.png".encode() for k in range(len(rows))],
        b"batch_label": b"testing batch 1 of 1",
        b"fine_labels": [int(k % 100) for k in range(len(rows))],
        b"coarse_labels": [int(k % 20) for k in range(len(rows))],
        b"data": rows,
    }
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=2))
    return str(folder)


def color_of(k: int) -> tuple[int, int, int]:
    """A distinct constant colour per image, so the loaded image tells which file it came from."""
    return (10 * k % 256, 255 - 7 * k % 256, (50 + 3 * k) % 256)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def constant_png(k: int, height: int = 30, width: int = 40) -> bytes:
    return png_bytes(np.full((height, width, 3), color_of(k), dtype=np.uint8))


def assert_colors(images: torch.Tensor, positions) -> None:
    for image, k in zip(images, positions):
        expected = torch.tensor(color_of(int(k)), dtype=torch.float32)[:, None, None] / 255.0
        torch.testing.assert_close(image, expected.expand_as(image), rtol=0, atol=1e-5)


def write_hf_parquet(path, first: int, count: int) -> None:
    """Like a Hugging Face datasets export: ``image`` struct<bytes, path>, ``label``."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": constant_png(k), "path": f"{k}.png"} for k in range(first, first + count)], type=image_type
            ),
            "label": pa.array([k % 10 for k in range(first, first + count)], type=pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def data_config(**values) -> DataConfig:
    return DataConfig(**values)


# --- CIFAR -------------------------------------------------------------------------------------


def test_cifar10_batch_decodes_to_the_exact_pixels(tmp_path):
    rows = cifar_rows(12)
    path = write_cifar10(tmp_path / "cifar-10-batches-py", rows)
    loaded = load_eval_images(data_config(format="cifar", path=path, n_samples=5), image_size=32)
    assert loaded.images.shape == (5, 3, 32, 32) and loaded.images.dtype == torch.float32
    assert loaded.indices.tolist() == [0, 1, 2, 3, 4]
    # channel c, row h, column w of image k is byte c * 1024 + h * 32 + w of row k, over 255
    expected = torch.from_numpy(rows[:5].reshape(5, 3, 32, 32).astype(np.float32)) / 255.0
    torch.testing.assert_close(loaded.images, expected, rtol=0, atol=1e-7)
    assert loaded.images[2, 1, 3, 4] == pytest.approx(rows[2, 1 * 1024 + 3 * 32 + 4] / 255.0)


def test_cifar_batch_written_with_the_numpy_module_name_of_the_original_files(tmp_path):
    # the files from the CIFAR site reference numpy.core.multiarray (numpy 2 writes numpy._core)
    rows = cifar_rows(6)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, rows)
    data = (folder / "test_batch").read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    (folder / "test_batch").write_bytes(data)
    loaded = load_eval_images(data_config(format="cifar", path=str(folder), n_samples=6), image_size=32)
    torch.testing.assert_close(loaded.images, torch.from_numpy(rows.reshape(6, 3, 32, 32).astype(np.float32)) / 255.0)


def test_cifar100_test_file_with_fine_labels(tmp_path):
    rows = cifar_rows(9, seed=1)
    path = write_cifar100(tmp_path / "cifar-100-python", rows)
    loaded = load_eval_images(data_config(format="cifar", path=path, n_samples=9), image_size=32)
    assert loaded.images.shape == (9, 3, 32, 32)
    torch.testing.assert_close(loaded.images, torch.from_numpy(rows.reshape(9, 3, 32, 32).astype(np.float32)) / 255.0)


@pytest.mark.parametrize(("image_size", "from_config"), [(48, False), (16, False), (24, True)])
def test_cifar_resized_to_the_model_input(tmp_path, image_size, from_config):
    path = write_cifar10(tmp_path / "c10", cifar_rows(4))
    config = data_config(format="cifar", path=path, n_samples=4, image_size=image_size if from_config else None)
    loaded = load_eval_images(config, image_size=999 if from_config else image_size)  # data.image_size wins
    assert loaded.images.shape == (4, 3, image_size, image_size)
    assert loaded.images.min() >= 0.0 and loaded.images.max() <= 1.0


def test_random_selection_is_seeded_sorted_and_matches_the_pixels(tmp_path):
    rows = cifar_rows(40, seed=2)
    path = write_cifar10(tmp_path / "c10", rows)

    def pick(seed):
        config = data_config(format="cifar", path=path, n_samples=10, selection="random", selection_seed=seed)
        return load_eval_images(config, image_size=32)

    first, again, other = pick(3), pick(3), pick(4)
    indices = first.indices.tolist()
    assert indices == sorted(indices) and len(set(indices)) == 10 and max(indices) < 40
    assert indices != list(range(10))
    assert torch.equal(first.indices, again.indices) and torch.equal(first.images, again.images)
    assert other.indices.tolist() != indices
    expected = torch.from_numpy(rows[indices].reshape(10, 3, 32, 32).astype(np.float32)) / 255.0
    torch.testing.assert_close(first.images, expected, rtol=0, atol=1e-7)


def test_asking_for_more_samples_than_the_data_holds(tmp_path):
    path = write_cifar10(tmp_path / "c10", cifar_rows(7))
    with pytest.raises(DataError, match="n_samples") as error:
        load_eval_images(data_config(format="cifar", path=path, n_samples=8), image_size=32)
    assert "7" in str(error.value)
    assert len(load_eval_images(data_config(format="cifar", path=path, n_samples=7), image_size=32).images) == 7


def test_cifar_batch_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"

    class WritesMarker:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": cifar_rows(3), b"labels": [0, 1, 2], b"extra": WritesMarker()}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="refused"):
        load_eval_images(data_config(format="cifar", path=str(folder), n_samples=3), image_size=32)
    assert not marker.exists()


def test_cifar_folder_without_batches(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="test_batch"):
        load_eval_images(data_config(format="cifar", path=str(tmp_path / "empty"), n_samples=1), image_size=32)


# --- image folder ------------------------------------------------------------------------------


def write_image_folder(root, per_class: dict[str, list[int]]) -> None:
    for class_name, numbers in per_class.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for k in numbers:
            (root / class_name / f"{k:03d}.png").write_bytes(constant_png(k, height=30 + k, width=40))


def test_image_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": [0, 1, 2], "dog": [3, 4]})
    (root / "README.txt").write_text("not an image")
    loaded = load_eval_images(data_config(format="imagefolder", path=str(root), n_samples=5), image_size=16)
    assert loaded.images.shape == (5, 3, 16, 16)
    assert loaded.indices.tolist() == [0, 1, 2, 3, 4]
    assert_colors(loaded.images, [0, 1, 2, 3, 4])  # sorted by path: cat/000..002, dog/003..004

    random = load_eval_images(
        data_config(format="imagefolder", path=str(root), n_samples=3, selection="random", selection_seed=1),
        image_size=16,
    )
    assert random.indices.tolist() == sorted(random.indices.tolist())
    assert_colors(random.images, random.indices.tolist())


def test_image_folder_uses_the_split_subfolder(tmp_path):
    write_image_folder(tmp_path / "ds" / "train", {"a": [0, 1, 2, 3]})
    write_image_folder(tmp_path / "ds" / "test", {"a": [7], "b": [8]})
    loaded = load_eval_images(data_config(format="imagefolder", path=str(tmp_path / "ds"), n_samples=2), image_size=8)
    assert_colors(loaded.images, [7, 8])
    with pytest.raises(DataError, match="n_samples"):
        load_eval_images(data_config(format="imagefolder", path=str(tmp_path / "ds"), n_samples=3), image_size=8)


def test_image_folder_classes_are_indexed_over_every_split(tmp_path):
    """A class with no test images must not shift the test labels against the training labels."""
    write_image_folder(tmp_path / "ds" / "train", {"ant": [0], "bee": [1], "cat": [2]})
    write_image_folder(tmp_path / "ds" / "test", {"ant": [3], "cat": [4]})  # no bee in test
    train = load_labelled_images(data_config(format="imagefolder", path=str(tmp_path / "ds"), split="train",
                                             n_samples=3), image_size=8)  # fmt: skip
    test = load_labelled_images(data_config(format="imagefolder", path=str(tmp_path / "ds"), n_samples=2), image_size=8)
    assert train.labels.tolist() == [0, 1, 2]
    assert test.labels.tolist() == [0, 2]  # cat is class 2 in both splits


def test_resize_shorter_side_then_center_crop_matches_pil(tmp_path):
    # a smooth 30x50 image: shorter side 30 -> 16 (width 50 -> 27), then the centre 16 columns 5..20
    small = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3)).astype(np.uint8)
    source = Image.fromarray(small).resize((50, 30), Image.BICUBIC)
    (tmp_path / "one" / "x").mkdir(parents=True)
    source.save(tmp_path / "one" / "x" / "0.png")
    loaded = load_eval_images(data_config(format="imagefolder", path=str(tmp_path / "one"), n_samples=1), image_size=16)
    expected = np.asarray(source.resize((27, 16), Image.BILINEAR).crop((5, 0, 21, 16)), dtype=np.float32) / 255.0
    got = loaded.images[0].permute(1, 2, 0).numpy()
    # measured 0.0033 (PIL rounds to uint8); an off-centre crop or a squash differs by > 0.2
    assert np.abs(got - expected).max() < 0.01


# --- Parquet (Hugging Face export) -------------------------------------------------------------


def test_hugging_face_parquet_export(tmp_path):
    write_hf_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", first=0, count=6)
    write_hf_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", first=100, count=20)
    loaded = load_eval_images(data_config(format="parquet", path=str(tmp_path), n_samples=4), image_size=24)
    assert loaded.images.shape == (4, 3, 24, 24)
    assert loaded.images.min() >= 0.0 and loaded.images.max() <= 1.0
    assert loaded.indices.tolist() == [0, 1, 2, 3]
    assert_colors(loaded.images, [0, 1, 2, 3])  # rows of the test file, not the train file

    chosen = load_eval_images(
        data_config(format="parquet", path=str(tmp_path), n_samples=3, selection="random", selection_seed=5), image_size=24
    )
    assert_colors(chosen.images, chosen.indices.tolist())
    # only the 6 test rows count: the train file is not part of the split
    with pytest.raises(DataError, match="n_samples"):
        load_eval_images(data_config(format="parquet", path=str(tmp_path), n_samples=7), image_size=24)
    train = load_eval_images(data_config(format="parquet", path=str(tmp_path), split="train", n_samples=2), image_size=24)
    assert_colors(train.images, [100, 101])


def test_parquet_single_file_and_plain_binary_column(tmp_path):
    table = pa.table({"img": pa.array([constant_png(k) for k in range(3)], type=pa.binary())})
    pq.write_table(table, tmp_path / "cifar.parquet")
    config = data_config(format="parquet", path=str(tmp_path / "cifar.parquet"), n_samples=3, image_column="img")
    assert_colors(load_eval_images(config, image_size=8).images, [0, 1, 2])
    with pytest.raises(DataError, match="image_column"):
        load_eval_images(config.model_copy(update={"image_column": "image"}), image_size=8)


# --- missing paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["cifar", "imagefolder", "parquet"])
def test_missing_path_is_a_data_error(tmp_path, data_format):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(DataError, match="does-not-exist"):
        load_eval_images(data_config(format=data_format, path=missing, n_samples=1), image_size=32)
