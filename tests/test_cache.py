"""The preprocessed-volume cache: entries, keys, atomic writes, and the per-file checks of bad input (issue 10)."""

import json
import logging
import os
import re
import warnings

import numpy as np
import pytest
from scripts.data.cache import cache_folder, open_volume, prepare_volumes
from scripts.data.preprocessing import VolumeWarning, preprocessing
from scripts.utils.errors import BundleError
from test_data import _phantom, _save

PATCH = (8, 8, 4)


def _prepare(tmp_path, files, modality="ct", **kwargs):
    return prepare_volumes([{"image": f} for f in files], tmp_path / "cache", modality, PATCH, **kwargs)


def _entries(tmp_path):
    return sorted(p.name for p in tmp_path.joinpath("cache").glob("*/*"))


def test_entry_holds_the_preprocessed_volume_as_memory_mappable_arrays(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    expected = preprocessing("ct", PATCH)({"image": file})
    volume = open_volume(entry)
    assert isinstance(volume["image"].base, np.memmap) and volume["image"].dtype == np.float16
    assert volume["image"].shape == volume["body"].shape == tuple(expected["image"].shape)
    np.testing.assert_allclose(volume["image"], expected["image"].numpy(), atol=2**-11)
    np.testing.assert_array_equal(volume["body"], expected["body"].numpy())
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    assert meta["source"] == file and meta["shape"] == list(expected["image"].shape[1:])
    np.testing.assert_allclose(meta["affine"], expected["image"].affine.numpy())
    memory = open_volume(entry, in_memory=True)
    assert not isinstance(memory["image"].base, np.memmap)
    np.testing.assert_array_equal(memory["image"], volume["image"])


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
        open_volume(second)["image"], preprocessing("ct", PATCH)({"image": file})["image"].numpy(), atol=2**-11
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


def test_a_killed_writer_leaves_no_entry_and_its_leftover_is_removed(tmp_path):
    file = _save(_phantom()[0], tmp_path / "case.nii.gz")
    (entry,) = _prepare(tmp_path, [file])
    folder = os.path.dirname(entry)
    name = os.path.basename(entry)
    os.rename(entry, f"{folder}/.tmp-999999999-{name}")  # as if its writer died before the rename
    os.remove(f"{folder}/.tmp-999999999-{name}/meta.json")
    assert _prepare(tmp_path, [file]) == [entry]
    assert os.listdir(folder) == [name]


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
