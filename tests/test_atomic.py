import json

import pytest

from deltaserve.experts.atomic import atomic_dir, write_json_atomic


def test_atomic_dir_publishes_complete_directory(tmp_path):
    target = tmp_path / "expert"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]


def test_atomic_dir_replaces_previous_version(tmp_path):
    target = tmp_path / "expert"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]


def test_atomic_dir_failure_keeps_previous_version(tmp_path):
    target = tmp_path / "expert"
    with atomic_dir(target) as tmp:
        (tmp / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    write_json_atomic(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
