"""Fuzz the file readers and the CLI with random and mutated inputs: only clean errors, never a crash."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vipalloc import Allocator
from vipalloc._io import StateFileError
from vipalloc.cli import app, read_batch
from vipalloc.history import RolloutHistory

CLEAN_ERRORS = (StateFileError, ValueError)


def saved_history(tmp_path) -> bytes:
    h = RolloutHistory()
    rng = np.random.default_rng(0)
    for step in range(4):
        h.extend(
            step,
            [f"q{i}" for i in range(5)],
            [rng.binomial(1, 0.5, 4).astype(float) for _ in range(5)],
            prompts=[f"text {i}" for i in range(5)],
        )
    path = tmp_path / "seed.jsonl"
    h.save(path)
    return path.read_bytes()


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["flip", "delete", "insert", "truncate", "dup"])
        if not buf:
            break
        i = rng.randrange(len(buf))
        if op == "flip":
            buf[i] = rng.randrange(256)
        elif op == "delete":
            del buf[i : i + rng.randint(1, 20)]
        elif op == "insert":
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == "truncate":
            del buf[i:]
        else:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 40)]
    return bytes(buf)


def test_mutated_history_files_fail_cleanly(tmp_path) -> None:
    seed = saved_history(tmp_path)
    rng = random.Random(1234)
    path = tmp_path / "m.jsonl"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        path.write_bytes(mutate(seed, rng))
        try:
            RolloutHistory.load(path)
            outcomes["ok"] += 1
        except CLEAN_ERRORS:
            outcomes["error"] += 1
    assert outcomes["error"] > 300  # the checksum catches almost every mutation


def test_mutated_headerless_history_rows_fail_cleanly(tmp_path) -> None:
    seed = b"".join(
        json.dumps({"step": s, "prompt_id": f"q{i}", "rewards": [1, 0, 1], "prompt": "x"}).encode() + b"\n"
        for s in range(3)
        for i in range(4)
    )
    rng = random.Random(99)
    path = tmp_path / "rows.jsonl"
    loaded = 0
    for _ in range(400):
        path.write_bytes(mutate(seed, rng))
        try:
            h = RolloutHistory.load(path)
        except CLEAN_ERRORS:
            continue
        loaded += 1
        agg = h.aggregates()  # whatever loaded must be internally consistent
        assert np.all(agg.successes <= agg.trials) and np.all(agg.trials >= 0)
    assert loaded > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_history_and_batch(tmp_path, data) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    try:
        RolloutHistory.load(path)
    except CLEAN_ERRORS:
        pass
    try:
        read_batch(path)
    except CLEAN_ERRORS:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "step": json_values,
                "prompt_id": json_values,
                "rewards": json_values,
                "trials": json_values,
                "successes": json_values,
                "prompt": json_values,
            },
        ),
        max_size=5,
    )
)
def test_schema_fuzz_history_rows(tmp_path, rows) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        h = RolloutHistory.load(path)
    except CLEAN_ERRORS:
        return
    agg = h.aggregates()
    assert np.all(agg.successes <= agg.trials)


def test_mutated_allocator_state_fails_cleanly(tmp_path) -> None:
    alloc = Allocator(strategy="vip", predictor="beta")
    ids = [f"q{i}" for i in range(6)]
    plan = alloc.plan(ids, budget=48, step=0)
    alloc.observe(ids, [np.ones(n) for n in plan.counts], step=0)
    path = tmp_path / "a.json"
    alloc.save(path)
    seed = path.read_bytes()
    rng = random.Random(7)
    errors = 0
    for _ in range(300):
        path.write_bytes(mutate(seed, rng))
        try:
            Allocator.load(path)
        except CLEAN_ERRORS:
            errors += 1
    assert errors >= 295


@pytest.mark.parametrize("seed", range(3))
def test_cli_with_fuzzed_files_exits_cleanly(tmp_path, seed) -> None:
    runner = CliRunner()
    hist_seed = saved_history(tmp_path)
    batch_seed = b"".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"text {i}"}).encode() + b"\n" for i in range(5))
    rng = random.Random(seed)
    for _ in range(15):
        (tmp_path / "h.jsonl").write_bytes(mutate(hist_seed, rng) if rng.random() < 0.5 else hist_seed)
        (tmp_path / "b.jsonl").write_bytes(mutate(batch_seed, rng) if rng.random() < 0.7 else batch_seed)
        res = runner.invoke(
            app,
            [
                "allocate",
                "--history",
                str(tmp_path / "h.jsonl"),
                "--batch",
                str(tmp_path / "b.jsonl"),
                "--budget",
                str(rng.choice([0, 20, 40, 1000])),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--predictor",
                "beta",
                "-q",
            ],
        )
        assert res.exit_code in (0, 2), res.output
        if res.exit_code == 2:
            assert res.output.startswith("error: ")
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
