"""fsmooth.data: torchvision/ImageFolder/tar sources, cache, errors, device loader and augmentation."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fsmooth.data import (CIFAR10_CLASSES, DataError, DeviceLoader, augment, load_dataset, synthetic_dataset)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSMOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FSMOOTH_DATA", raising=False)


def write_torchvision(root, per_batch=3, n_test=5, dataset="cifar10", seed=0):
    """A tiny cifar-10-batches-py (or cifar-100-python) folder, pickled like the originals (protocol 2)."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if dataset == "cifar10"
             else ["train", "test"])
    arrays = {}
    for name in names:
        n = n_test if "test" in name else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        key = b"labels" if dataset == "cifar10" else b"fine_labels"
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": name.encode()}, f, protocol=2)
        arrays[name] = (data, labels)
    return folder, arrays


def write_folder(root, classes=CIFAR10_CLASSES, per_class=2, seed=0, splits=("train", "test")):
    """An ImageFolder tree of lossless PNGs; returns {split: (uint8 NCHW, labels)} in loader order."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    expected = {}
    for split in splits:
        images, labels = [], []
        for index, cls in enumerate(sorted(classes)):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / cls / f"{i:04d}.png")
                images.append(array.transpose(2, 0, 1))
                labels.append(index)
        expected[split] = (torch.from_numpy(np.stack(images)), torch.tensor(labels))
    return expected


def make_tar(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        for split in sorted(os.listdir(folder)):
            tar.add(folder / split, arcname=split)
    return path


def test_torchvision_layout_matches_pickles(tmp_path):
    folder, arrays = write_torchvision(tmp_path)
    for source in (tmp_path, folder):
        x, y = load_dataset(source, "train")
        assert x.dtype == torch.uint8 and x.shape == (15, 3, 32, 32) and y.dtype == torch.int64
        expected = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
        assert torch.equal(x, torch.from_numpy(expected))
        labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        assert y.tolist() == labels
    x, y = load_dataset(tmp_path, "test")
    assert torch.equal(x, torch.from_numpy(arrays["test_batch"][0].reshape(-1, 3, 32, 32)))


def test_cifar100_torchvision_layout(tmp_path):
    _, arrays = write_torchvision(tmp_path, dataset="cifar100", per_batch=7)
    x, y = load_dataset(tmp_path, "train", "cifar100")
    assert x.shape == (7, 3, 32, 32) and y.tolist() == arrays["train"][1]
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset(tmp_path, "train", "cifar10")


def test_malicious_pickle_is_refused(tmp_path):
    folder, _ = write_torchvision(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(tmp_path, "test")


def test_folder_and_tar_agree_with_pixels(tmp_path):
    expected = write_folder(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / "tree.tar.gz")
    for source in (tmp_path / "tree", archive):
        for split in ("train", "test"):
            x, y = load_dataset(source, split)
            assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])


def test_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import fsmooth.data as data
    write_folder(tmp_path / "tree", per_class=1, splits=("test",))
    archive = make_tar(tmp_path / "tree", tmp_path / "big.tar.gz")
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 1000)  # a random 32x32 PNG is about 3 kB

    def no_read(self, member):
        raise AssertionError(f"{member.name} was read before its size was checked")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", no_read)
    with pytest.raises(DataError, match=r"test/airplane/0000.png'? is \d+ bytes, more than the 1000"):
        load_dataset(archive, "test", use_cache=False)
    with pytest.raises(DataError, match=r"0000.png'? is \d+ bytes"):
        load_dataset(tmp_path / "tree", "test", use_cache=False)


def test_cache_hit_and_damaged_cache(tmp_path):
    expected = write_folder(tmp_path / "tree", splits=("test",))
    archive = make_tar(tmp_path / "tree", tmp_path / "d.tar.gz")
    x, _ = load_dataset(archive, "test")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    x2, _ = load_dataset(archive, "test")
    assert torch.equal(x2, expected["test"][0]) and torch.equal(x, x2)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_truncated_archive_names_path_and_leaves_no_cache(tmp_path):
    write_folder(tmp_path / "tree", per_class=3)
    archive = make_tar(tmp_path / "tree", tmp_path / "t.tar.gz")
    data = archive.read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.tar.gz"):
        load_dataset(bad, "test")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_corrupt_image_wrong_layout_and_missing_split(tmp_path):
    write_folder(tmp_path / "tree", splits=("train",))
    (tmp_path / "tree" / "train" / "cat" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="0000.png"):
        load_dataset(tmp_path / "tree", "train")
    with pytest.raises(DataError, match="split 'test' not found"):
        load_dataset(tmp_path / "tree", "test")
    write_folder(tmp_path / "three", classes=("a", "b", "c"), splits=("train",))
    with pytest.raises(DataError, match="3 class folders.*cifar10 needs 10"):
        load_dataset(tmp_path / "three", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="FSMOOTH_DATA"):
        load_dataset(None, "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset(tmp_path / "tree", "validation")


def test_env_variable_source(tmp_path, monkeypatch):
    write_torchvision(tmp_path)
    monkeypatch.setenv("FSMOOTH_DATA", str(tmp_path))
    x, _ = load_dataset(None, "test")
    assert x.shape[0] == 5


def test_augment_is_a_shifted_flipped_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(x.shape[0]):  # every output is one of the 2 * 9 * 9 candidate crops of its own input
        crops = [padded[i, :, oy:oy + 8, ox:ox + 8] for oy in range(9) for ox in range(9)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in crops)
    assert not torch.equal(out, x)
    flipped = sum(int(torch.equal(out[i], x[i].flip(-1))) for i in range(64))
    assert flipped < 64


def test_device_loader_order_and_sharding():
    x, y = synthetic_dataset(21, 3, image_size=8)
    loader = DeviceLoader(x, y, 4, shuffle=True, seed=3)
    loader.set_epoch(2)
    first = torch.cat([b for _, b in loader])
    again = torch.cat([b for _, b in loader])
    assert torch.equal(first, again) and first.numel() == 21
    loader.set_epoch(3)
    assert not torch.equal(torch.cat([b for _, b in loader]), first)
    # Two evaluation shards together cover every sample exactly once.
    shards = [DeviceLoader(x, torch.arange(21), 5, rank=r, world_size=2, pad=False) for r in range(2)]
    seen = torch.cat([b for s in shards for _, b in s])
    assert sorted(seen.tolist()) == list(range(21))
    batch, _ = next(iter(DeviceLoader(x, y, 4)))
    assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1
    assert torch.allclose(batch * 255, x[:4].float())


def test_synthetic_dataset_is_deterministic():
    a, la = synthetic_dataset(30, 5, seed=1)
    b, lb = synthetic_dataset(30, 5, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8
    assert torch.bincount(la).tolist() == [6] * 5


def test_incomplete_or_truncated_torchvision_folder(tmp_path):
    folder, _ = write_torchvision(tmp_path)
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[:100])
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset(tmp_path, "train")
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks.*test_batch"):
        load_dataset(tmp_path, "test")


def test_class_folders_are_labelled_in_natural_order_and_the_same_in_both_splits(tmp_path, caplog):
    # CIFAR-10 folders without its class names are labelled in their order, with a warning naming them
    renamed = tuple(c.upper() if c == "cat" else c for c in CIFAR10_CLASSES)
    write_folder(tmp_path / "renamed", classes=renamed, per_class=1, splits=("test",))
    with caplog.at_level("WARNING", logger="fsmooth.data"):
        load_dataset(tmp_path / "renamed", "test", use_cache=False)
    assert "CAT" in caplog.text and "not CIFAR-10's class names" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fsmooth.data"):
        write_folder(tmp_path / "named", per_class=1, splits=("test",))
        load_dataset(tmp_path / "named", "test", use_cache=False)
    assert caplog.text == ""
    # numbers in folder names are read by value, not as text ("10" after "1", before "2")
    for name, pattern in (("numbered", "{}"), ("prefixed", "class{}")):
        folders = tuple(pattern.format(i) for i in range(100))
        written, _ = write_folder(tmp_path / name, classes=folders, per_class=1, splits=("test",))["test"]
        x, y = load_dataset(tmp_path / name, "test", "cifar100", use_cache=False)
        label_of = {bytes(image.numpy()): int(label) for image, label in zip(x, y)}
        assert [label_of[bytes(image.numpy())] for image in written] == sorted(range(100), key=str)
    write_folder(tmp_path / "gap", classes=tuple(str(i) for i in range(1, 11)), per_class=1, splits=("test",))
    with pytest.raises(DataError, match="not 0 to 9"):
        load_dataset(tmp_path / "gap", "test", use_cache=False)
    # the two splits of one source must hold the same classes, in either source kind
    names = tuple(f"c{i:02d}" for i in range(100))
    write_folder(tmp_path / "split", classes=names, per_class=1, splits=("train",))
    write_folder(tmp_path / "split", classes=names[:99] + ("zz",), per_class=1, seed=1, splits=("test",))
    archive = make_tar(tmp_path / "split", tmp_path / "split.tar.gz")
    for source in (tmp_path / "split", archive):
        for split in ("train", "test"):
            with pytest.raises(DataError, match="c99.*zz|zz.*c99"):
                load_dataset(source, split, "cifar100", use_cache=False)


def test_device_loader_pads_tiny_sets_for_every_rank_and_checks_its_shard(tmp_path):
    x = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([7])
    for rank in range(4):  # one image, four ranks: each rank still gets one (wrapped) image, never an empty batch
        batches = list(DeviceLoader(x, y, 2, rank=rank, world_size=4))
        assert len(batches) == 1 and batches[0][1].tolist() == [7]
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([1, 2, 3])
    seen = [DeviceLoader(x, y, 8, rank=r, world_size=5)._indices().tolist() for r in range(5)]
    assert [len(s) for s in seen] == [1] * 5 and sorted(sum(seen, [])) == [0, 0, 1, 1, 2]
    for kwargs, name in (({"rank": 2, "world_size": 2}, "rank"), ({"rank": -1, "world_size": 2}, "rank"),
                         ({"world_size": 0}, "world_size"), ({"world_size": 2.0}, "world_size"),
                         ({"rank": True, "world_size": 2}, "rank")):
        with pytest.raises((ValueError, TypeError), match=name):
            DeviceLoader(x, y, 2, **kwargs)
    with pytest.raises(TypeError, match="batch_size"):
        DeviceLoader(x, y, 2.5)
