import pytest

from deltaserve_zoo.matrix import AccuracyMatrix


@pytest.fixture
def matrix():
    rows = {
        "base": {"a": 0.1, "b": 0.05},
        "full:a": {"a": 0.95, "b": 0.2},
        "full:b": {"a": 0.3, "b": 0.9},
        "lora:a": {"a": 0.85, "b": 0.1},
        "lora:b": {"a": 0.0, "b": 0.8},
    }
    return AccuracyMatrix("llm", ["a", "b"], rows)


def test_summary_and_margins(matrix):
    s = matrix.summary()
    assert s == pytest.approx({"min_own_full": 0.9, "min_own_lora": 0.8, "max_base": 0.1, "min_margin": 0.65})
    # full:b on task a: 0.3 vs full:a on a, 0.95 -> 0.65; lora rows compare with lora rows
    assert matrix.margins() == pytest.approx({"full:a": 0.7, "full:b": 0.65, "lora:a": 0.7, "lora:b": 0.85})


def test_not_diagonal_dominant_shows_negative_margin(matrix):
    matrix.rows["lora:b"]["a"] = 0.9
    assert matrix.margins()["lora:b"] < 0


def test_save_load_round_trip_keeps_row_order(matrix, tmp_path):
    matrix.save(tmp_path, "test")
    again = AccuracyMatrix.load(tmp_path / "llm.json")
    assert list(again.rows) == list(matrix.rows) and again.rows == matrix.rows
    md = (tmp_path / "llm.md").read_text()
    assert "| full:a | **95.0%** | 20.0% |" in md and "min_margin 65.0%" in md
