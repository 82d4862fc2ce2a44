"""RolloutHistory: append, windows, exact save/load, and clear errors for bad input or damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc._io import StateFileError
from vipalloc.history import RolloutHistory


def make_history() -> RolloutHistory:
    h = RolloutHistory()
    h.extend(0, ["a", "b"], [[1, 0, 1, 1], [0, 0]], prompts=["2+2=", "3*7="])
    h.extend(1, ["a", "c"], [[1, 1], [0.2, 0.9, 0.5]])
    h.append(3, "b", [1.0, 0.0, 0.0, 1.0])
    return h


def test_append_and_aggregates() -> None:
    h = make_history()
    assert len(h) == 5
    assert h.last_step == 3
    agg = h.aggregates()
    got = dict(zip(agg.prompt_ids, zip(agg.successes.tolist(), agg.trials.tolist(), agg.last_step.tolist())))
    assert got == {"a": (5, 6, 1), "b": (2, 6, 3), "c": (2, 3, 1)}  # 0.9 and 0.5 reach the 0.5 threshold
    c = agg.prompt_ids.index("c")
    assert agg.reward_sum[c] == pytest.approx(1.6)
    np.testing.assert_allclose(agg.rate, agg.successes / agg.trials)


def test_window_and_before_step() -> None:
    h = make_history()
    last = h.aggregates(window=1)
    assert last.prompt_ids == ["b"] and last.trials.tolist() == [4]
    two = h.aggregates(window=2, before_step=3)  # newest step before 3 is 1 -> steps {0, 1}
    assert sorted(two.prompt_ids) == ["a", "b", "c"]
    assert h.aggregates(before_step=0).prompt_ids == []
    with pytest.raises(ValueError, match="window"):
        h.aggregates(window=0)


def test_iter_steps_orders_by_step() -> None:
    h = RolloutHistory()
    h.append(5, "x", [1, 1])
    h.append(2, "y", [0])
    h.append(5, "z", [0, 1])
    got = [(s, ids, succ.tolist(), t.tolist()) for s, ids, succ, t in h.iter_steps()]
    assert got == [(2, ["y"], [0], [1]), (5, ["x", "z"], [2, 1], [2, 2])]


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        ([1.0, float("nan")], "NaN"),
        ([1.0, float("inf")], "NaN or inf"),
        ([1.5], "outside \\[0, 1\\]"),
        ([-0.1], "outside"),
        ([[1, 0]], "1-D"),
        (["x"], "not numeric"),
    ],
)
def test_bad_rewards_rejected_and_nothing_recorded(rewards, match) -> None:
    h = make_history()
    before = h.state_dict()
    with pytest.raises(ValueError, match=match):
        h.extend(7, ["ok", "bad"], [[1, 0], rewards])
    after = h.state_dict()
    assert len(h) == 5
    for key in ("step", "trials", "successes"):
        np.testing.assert_array_equal(before[key], after[key])


def test_bad_step_and_lengths() -> None:
    h = RolloutHistory()
    with pytest.raises(ValueError, match="step must be an integer"):
        h.append(1.5, "a", [1])
    with pytest.raises(ValueError, match=">= 0"):
        h.append(-1, "a", [1])
    with pytest.raises(ValueError, match="one array per prompt"):
        h.extend(0, ["a", "b"], [[1]])
    with pytest.raises(ValueError, match="success_threshold"):
        RolloutHistory(success_threshold=0.0)


def test_save_load_round_trip(tmp_path) -> None:
    h = make_history()
    path = tmp_path / "h.jsonl"
    h.save(path)
    g = RolloutHistory.load(path)
    a, b = h.state_dict(), g.state_dict()
    assert a["prompt_ids"] == b["prompt_ids"] and a["texts"] == b["texts"]
    for key in ("step", "prompt_index", "trials", "successes", "reward_sum"):
        np.testing.assert_array_equal(a[key], b[key])
    assert g.prompt_text("a") == "2+2="


def test_state_dict_round_trip_is_exact() -> None:
    h = make_history()
    g = RolloutHistory.from_state_dict(h.state_dict())
    np.testing.assert_array_equal(g.aggregates().reward_sum, h.aggregates().reward_sum)


def test_hand_written_file_without_header(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"step": 0, "prompt_id": "q1", "rewards": [1, 0, 1], "prompt": "1+1="}\n'
        "\n"
        '{"step": 1, "prompt_id": 7, "trials": 4, "successes": 1}\n'
    )
    h = RolloutHistory.load(path)
    agg = h.aggregates()
    assert agg.prompt_ids == ["q1", "7"]
    assert agg.successes.tolist() == [2, 1] and agg.trials.tolist() == [3, 4]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            '{"step": 0, "prompt_id": "a", "rewards": [1, 0]}\n{"step": 1, "prompt_id": "a", "rew',
            "line 2: not valid JSON",
        ),
        ('{"step": 0, "prompt_id": "a"}\n', "line 1: each row needs 'rewards'"),
        ('{"step": 0, "prompt_id": "a", "rewards": [2]}\n', "line 1: .*outside"),
        ('{"step": 0, "prompt_id": "a", "trials": 2, "successes": 3}\n', "line 1: need 0 <= successes <= trials"),
        ('{"prompt_id": "a", "rewards": [1]}\n', "line 1: each row needs 'step'"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        ('{"step": "x", "prompt_id": "a", "rewards": [1]}\n', "line 1: step must be an integer"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, match) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(StateFileError, match=match):
        RolloutHistory.load(path)


def test_truncated_or_edited_saved_file_detected(tmp_path) -> None:
    h = make_history()
    path = tmp_path / "h.jsonl"
    h.save(path)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # drop the last row: a truncated write
    with pytest.raises(StateFileError, match="checksum mismatch"):
        RolloutHistory.load(path)
    edited = text.replace('"successes":2', '"successes":1', 1)
    assert edited != text
    path.write_text(edited)
    with pytest.raises(StateFileError, match="checksum"):
        RolloutHistory.load(path)
    header = json.loads(lines[0])
    header["version"] = 99
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(StateFileError, match="newer vipalloc"):
        RolloutHistory.load(path)
    with pytest.raises(StateFileError, match="no such history file"):
        RolloutHistory.load(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(StateFileError, match="UTF-8"):
        RolloutHistory.load(tmp_path / "bin.jsonl")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch) -> None:
    h = make_history()
    path = tmp_path / "h.jsonl"
    h.save(path)
    good = path.read_text()
    h.append(9, "new", [1])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        h.save(path)
    assert path.read_text() == good
    assert [p.name for p in tmp_path.iterdir()] == ["h.jsonl"]  # no temp file left behind


rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 20),
        st.sampled_from(["a", "b", "c", "d"]),
        st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=0, max_size=6),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy)
def test_property_save_load_round_trip(tmp_path_factory, rows) -> None:
    h = RolloutHistory()
    for step, pid, rewards in rows:
        h.append(step, pid, rewards)
    path = tmp_path_factory.mktemp("prop") / "h.jsonl"
    h.save(path)
    g = RolloutHistory.load(path)
    ah, ag = h.aggregates(), g.aggregates()
    assert ah.prompt_ids == ag.prompt_ids
    np.testing.assert_array_equal(ah.trials, ag.trials)
    np.testing.assert_array_equal(ah.successes, ag.successes)
    np.testing.assert_array_equal(ah.reward_sum, ag.reward_sum)
    assert len(g) == len(h)
