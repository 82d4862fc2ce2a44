"""Prepare DAPO-Math-17k for verl + VIP: deduplicate prompts and give each a stable integer ``extra_info.index``.

The published parquet (``BytedTsinghua-SIA/DAPO-Math-17k``) repeats each of its ~17.9k problems about 100 times
(~1.79M rows), each copy with its own random ``extra_info.index``. VIP's predictor learns per prompt across steps, so
the same problem must keep one id, and a training batch must not hold the same problem twice. This script keeps one
row per distinct prompt text and numbers the prompts by the SHA-1 of their text (stable across machines and runs).

    python examples/verl/prepare_dapo_math.py --src /data/dapo-math-17k.parquet --out ~/data/vip
    python examples/verl/prepare_dapo_math.py --src BytedTsinghua-SIA/DAPO-Math-17k --out ~/data/vip   # needs the Hub

Writes ``<out>/dapo_math_17k_dedup.parquet`` (verl's RL format: ``data_source``, ``prompt`` as chat messages,
``ability``, ``reward_model.ground_truth``, ``extra_info.index``) and prints the row counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import pandas as pd


def prompt_text(prompt: Any) -> str:
    """The text that identifies a problem: the concatenated message contents of a chat prompt, or the string."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for msg in list(prompt):
        parts.append(str(msg.get("content", "")) if isinstance(msg, dict) else str(msg))
    return "\n".join(parts)


def dedup(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct prompt text, ordered and indexed by the text's SHA-1; ``extra_info.index`` = position.

    Raises ``ValueError`` when a required column is missing or two copies of a prompt disagree on the answer.
    """
    missing = {"prompt", "reward_model", "data_source"} - set(df.columns)
    if missing:
        raise ValueError(f"not a verl RL parquet: missing columns {sorted(missing)}")
    texts = df["prompt"].map(prompt_text)
    answers = df["reward_model"].map(lambda r: json.dumps(r.get("ground_truth") if isinstance(r, dict) else r))
    conflicts = (pd.DataFrame({"t": texts, "a": answers}).groupby("t")["a"].nunique() > 1).sum()
    if conflicts:
        raise ValueError(f"{conflicts} prompt(s) appear with different ground truths; fix the source data first")
    keep = ~texts.duplicated()
    out = df.loc[keep].copy()
    out["_sha1"] = texts[keep].map(lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
    out = out.sort_values("_sha1").reset_index(drop=True)

    def extra(row: pd.Series) -> dict[str, Any]:
        info = dict(row["extra_info"]) if isinstance(row.get("extra_info"), dict) else {}
        info["source_index"] = str(info.get("index", ""))
        info["index"] = int(row.name)
        info["prompt_sha1"] = row["_sha1"]
        return info

    out["extra_info"] = out.apply(extra, axis=1)
    return out.drop(columns=["_sha1"])


def load(src: str) -> pd.DataFrame:
    if os.path.exists(src):
        return pd.read_parquet(src)
    import datasets  # verl depends on it

    return datasets.load_dataset(src, split="train").to_pandas()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="local parquet file or Hugging Face dataset id")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    df = load(args.src)
    out = dedup(df)
    os.makedirs(os.path.expanduser(args.out), exist_ok=True)
    path = os.path.join(os.path.expanduser(args.out), "dapo_math_17k_dedup.parquet")
    out.to_parquet(path)
    print(f"{len(df)} rows -> {len(out)} distinct prompts -> {path}")


if __name__ == "__main__":
    main()
