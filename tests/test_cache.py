"""The preprocessed-volume cache: entries, keys, atomic writes, the per-file checks of bad input (issue 10), and
damaged entries, other hosts' temporaries and the wait of the ranks other than 0 (issue 16)."""

import json
import logging
import os
import re
import time
import warnings

import numpy as np
import pytest
from scripts.data import cache
from scripts.data.cache import (
    CacheWarning,
    cache_folder,
    definition_digest,
    open_volume,
    prepare_volumes,
    wait_for_entries,
)
from scripts.data.preprocessing import VolumeWarning, preprocessing
from scripts.utils.errors import BundleError
from test_data import _phantom, _save

PATCH = (8, 8, 4)


def _prepare(tmp_path, files, modality="ct", **kwargs):
    return prepare_volumes([{"image": f} for f in files], tmp_path / "cache", modality, PATCH, **kwargs)


def _entries(tmp_path):
    return sorted(p.name for p in tmp_path.joinpath("cache").glob("*/*") if p.is_dir())


def test_entry_holds_the_preprocessed_volume_as_memory_mappable_arrays(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    expected = preprocessing("ct", PATCH)({"image": file})
    volume = open_volume(entry)
    assert volume["image"].mapped is not None and volume["image"].dtype == np.float16
    assert volume["image"].shape == volume["body"].shape == tuple(expected["image"].shape[1:])
    np.testing.assert_allclose(np.asarray(volume["image"]), expected["image"][0].numpy(), atol=2**-11)
    np.testing.assert_array_equal(np.asarray(volume["body"]), expected["body"][0].numpy())
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    assert meta["source"] == file and meta["shape"] == list(expected["image"].shape[1:])
    np.testing.assert_allclose(meta["affine"], expected["image"].affine.numpy())
    memory = open_volume(entry, in_memory=True)
    assert memory["image"].mapped is None
    np.testing.assert_array_equal(np.asarray(memory["image"]), np.asarray(volume["image"]))


def test_cache_is_shared_and_a_replaced_scan_is_preprocessed_again(tmp_path):
    hu, _ = _phantom()
    file = _save(hu, tmp_path / "case.nii.gz")
    (first,) = _prepare(tmp_path, [file])
    assert _prepare(tmp_path, [file]) == [first], "a second run reuses the entry"
    _save(np.where(hu > -500, 200.0, hu).astype(np.float32), tmp_path / "case.nii.gz")  # same path, new content
    os.utime(file, ns=(os.stat(file).st_atime_ns, os.stat(file).st_mtime_ns + 10**9))
    (second,) = _prepare(tmp_path, [file])
    assert second != first and not os.path.exists(first), "the old entry is removed"
    np.testing.assert_allclose(
        np.asarray(open_volume(second)["image"]),
        preprocessing("ct", PATCH)({"image": file})["image"][0].numpy(),
        atol=2**-11,
    )


def test_transform_and_dataset_have_their_own_folders(tmp_path):
    datalist = [{"image": str(tmp_path / "a" / "x.nii.gz")}]
    folders = {
        cache_folder(tmp_path, datalist, "ct", PATCH),
        cache_folder(tmp_path, datalist, "mri", PATCH),
        cache_folder(tmp_path, datalist, "ct", (8, 8, 8)),
        cache_folder(tmp_path, [{"image": str(tmp_path / "b" / "x.nii.gz")}], "ct", PATCH),
    }
    assert len(folders) == 4


def test_only_this_hosts_stale_temporaries_are_removed(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    folder, name = os.path.split(entry)
    stale = time.time() - 2 * cache.STALE_S
    temporaries = {  # as if their writers died before the rename; pids no process has
        "this host, stale": (f".tmp-{cache._HOST}-999999999-{name}", stale),
        "this host, recent": (f".tmp-{cache._HOST}-999999998-{name}", time.time()),
        "another host, stale": (f".tmp-{cache._HOST}x-999999999-{name}", stale),  # its writer may be alive
    }
    for leftover, mtime in temporaries.values():
        os.mkdir(f"{folder}/{leftover}")
        os.utime(f"{folder}/{leftover}", (mtime, mtime))
    assert _prepare(tmp_path, [file]) == [entry]
    kept = [temporaries[k][0] for k in ("this host, recent", "another host, stale")]
    assert sorted(os.listdir(folder)) == sorted([name, *kept, "folder.json"])


def test_folders_another_version_made_for_the_same_data_are_named_with_their_size(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    folder = os.path.dirname(entry)
    with open(os.path.join(folder, "folder.json")) as f:
        description = json.load(f)
    assert description["patch_size"] == list(PATCH) and description["definition"] == definition_digest()
    others = {  # another version of the code; of MONAI; the same code for another patch size (in use: not named)
        "old-code": {**description, "definition": "0" * 12},
        "old-monai": {**description, "monai": "1.3.0"},
        "other-patch": {**description, "patch_size": [16, 16, 8]},
    }
    for name, other in others.items():
        os.makedirs(tmp_path / "cache" / name / "entry")
        (tmp_path / "cache" / name / "folder.json").write_text(json.dumps(other))
        with open(tmp_path / "cache" / name / "entry" / "image.bin", "wb") as f:
            f.truncate(200_000_000)  # sparse: the size without the disk space
    with pytest.warns(CacheWarning, match="2 cache folder") as record:
        assert _prepare(tmp_path, [file]) == [entry]
    (message,) = [str(w.message) for w in record if issubclass(w.category, CacheWarning)]
    assert "(0.4 GB)" in message and "Delete them" in message
    assert str(tmp_path / "cache" / "old-code") in message and str(tmp_path / "cache" / "old-monai") in message
    assert "other-patch" not in message


def _damage(entry, how):
    if how == "cut image.bin":
        with open(os.path.join(entry, "image.bin"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 100)
    elif how == "broken meta.json":
        with open(os.path.join(entry, "meta.json"), "a") as f:
            f.write("}{")
    else:
        os.remove(os.path.join(entry, "body.bin"))


@pytest.mark.parametrize("how", ["cut image.bin", "broken meta.json", "missing body.bin"])
def test_a_damaged_entry_is_named_and_built_again_once(tmp_path, how):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    expected = open_volume(entry, in_memory=True)
    _damage(entry, how)
    named = rf"Cache entry {re.escape(entry)} of {re.escape(file)} is damaged \(.*{how.split()[1]}"
    with pytest.warns(CacheWarning, match=named):
        assert _prepare(tmp_path, [file]) == [entry]
    for key, array in open_volume(entry).items():
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[key]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert _prepare(tmp_path, [file]) == [entry], "built once: the next run uses it"


def test_an_entry_damaged_during_training_is_named(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    _damage(entry, "cut image.bin")
    with pytest.raises(BundleError, match=rf"Cache entry {re.escape(entry)} is damaged .* builds it again"):
        open_volume(entry)


@pytest.mark.parametrize("chunk", [(4, 4, 2), cache.CHUNK])
@pytest.mark.parametrize("in_memory", [False, True])
def test_chunked_volume_reads_what_the_array_holds(tmp_path, chunk, in_memory):
    """Boxes, points and the whole volume read from the chunks equal the same crops of the array written, at the
    padded borders too (the shape is no multiple of the chunk)."""
    rng = np.random.default_rng(0)
    shape = (13, 10, 7)
    image, body = rng.random(shape).astype(np.float16), rng.random(shape) < 0.5
    entry = cache.write_entry(tmp_path, "v", {}, image, body, chunk=chunk)
    assert cache.read_entry(entry)["chunk"] == list(chunk)
    volume = open_volume(entry, in_memory=in_memory)
    for key, array in (("image", image), ("body", body.astype(np.uint8))):
        chunked = volume[key]
        assert chunked.shape == shape and chunked.dtype == array.dtype
        np.testing.assert_array_equal(np.asarray(chunked), array)
        for _ in range(20):
            start = rng.integers(0, shape)
            stop = rng.integers(start + 1, np.asarray(shape) + 1)
            box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
            np.testing.assert_array_equal(chunked[box], array[box])
        np.testing.assert_array_equal(chunked[-4:, :3, 2:], array[-4:, :3, 2:])
        points = tuple(rng.integers(0, shape, size=(50, 3)).T)
        np.testing.assert_array_equal(chunked[points], array[points])
        with pytest.raises(IndexError):
            chunked[::2, :, :]


def _kept(x):
    """Doubles x."""
    return 2 * x  # a comment


def _reworded(x):
    """Twice x: another docstring."""
    return 2 * x


def _changed(x):
    """Doubles x."""
    return 3 * x


def test_the_folder_key_covers_the_code_that_makes_an_entry():
    assert cache._code(_kept).replace("_kept", "f") == cache._code(_reworded).replace("_reworded", "f")
    assert cache._code(_kept).replace("_kept", "f") != cache._code(_changed).replace("_changed", "f")
    # Pinned: a change to the preprocessing or to how an entry is stored changes it, and with it every cache folder,
    # so that no run reads entries the new code would not make. Update the value here when you change them.
    assert definition_digest() == "f45697617534", "the preprocessing or the cache's storage changed: update the pin"


def test_other_ranks_wait_for_every_entry_on_disk(tmp_path):
    files = [_save(_phantom()[0], tmp_path / f"case{i}.nii.gz") for i in range(2)]
    datalist = [{"image": f} for f in files]
    folder = cache_folder(tmp_path / "cache", datalist, "ct", PATCH)
    folder.mkdir(parents=True)
    with pytest.raises(BundleError, match=rf"for rank 0 to add an entry to the cache folder {re.escape(str(folder))}"):
        wait_for_entries(datalist, folder, stall_s=0.1)
    entries = _prepare(tmp_path, files)
    assert [meta["entry"] for meta in wait_for_entries(datalist, folder, stall_s=0.1)] == entries


@pytest.mark.parametrize("num_workers", [0, 1])
def test_every_bad_file_is_named_at_once(tmp_path, num_workers):
    good = _save(_phantom()[0], tmp_path / "good.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(1000))
    hu = _phantom()[0]
    hu[5, 5, 5] = np.nan
    nan = _save(hu, tmp_path / "nan.nii.gz")
    with pytest.raises(BundleError, match=rf"2 of 3 volumes(.|\n)*{re.escape(str(corrupt))}(.|\n)*{re.escape(nan)}"):
        _prepare(tmp_path, [good, str(corrupt), nan], num_workers=num_workers)


def test_suspicious_resampling_is_warned_about_by_name(tmp_path):
    thick = _save(_phantom((60, 50, 3))[0], tmp_path / "thick.nii.gz", affine=np.diag([0.8, 0.8, 20.0, 1.0]))
    with pytest.warns(VolumeWarning, match=rf"{re.escape(thick)}: resampling .* enlarges it 10x along axis 2") as w:
        _prepare(tmp_path, [thick])
    assert all(r.filename.endswith(os.path.join("scripts", "data", "cache.py")) for r in w), [r.filename for r in w]


def test_empty_and_constant_volumes_are_skipped_with_a_warning(tmp_path, caplog):
    good = _save(_phantom()[0], tmp_path / "good.nii.gz")
    air = np.random.default_rng(0).uniform(-170, -60, (20, 20, 6)).astype(np.float32)  # below the body threshold
    empty = _save(air, tmp_path / "air.nii.gz")
    constant = _save(np.full((20, 20, 6), 40.0, np.float32), tmp_path / "constant.nii.gz")
    caplog.set_level(logging.INFO, logger="scripts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = _prepare(tmp_path, [empty, good, constant])
    messages = [str(w.message) for w in caught if issubclass(w.category, VolumeWarning)]
    assert any(re.search(rf"Skipping {re.escape(empty)}: no body voxels", m) for m in messages), messages
    assert any(re.search(rf"Skipping {re.escape(constant)}: its intensity is constant", m) for m in messages)
    assert [os.path.basename(e).split("-")[0] for e in entries] == ["good"]
    folder = os.path.dirname(entries[0])
    summary = f"using 1 of 3 volumes (2 skipped: {empty}, {constant}; see the warnings); cache folder {folder}"
    assert summary in caplog.messages
    assert len(_entries(tmp_path)) == 3, "skipped volumes are remembered, not preprocessed again"
    with pytest.warns(VolumeWarning), pytest.raises(BundleError, match="None of the 1 volumes is usable"):
        _prepare(tmp_path, [constant])
