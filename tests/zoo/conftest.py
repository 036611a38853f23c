"""The Model Zoo's unit test of this bundle runs from a model-zoo checkout, where its bundle is `models/<name>/`, so
pytest does not collect it here: `tests/test_release.py` runs it against a release laid out as in the Zoo."""

collect_ignore_glob = ["test_*.py"]
