"""Tasks an environment chooses: ``environment_factory`` rows keyed by what ``reset()`` returns, before the plan.

TRL 1.16 resets each row's environment inside ``_generate_and_score_completions`` (``environment.reset(**row)``,
the observation appended to the row's prompt) -- after the plan has to be made. When the rows themselves do not
say which task they are, the plug-in resets the environments first:

* no ``train_dataset`` (the environment owns the data; TRL then trains on placeholder rows with an empty prompt);
* rows with neither a ``prompt`` nor a ``prompt_id_column`` value (e.g. a routing dataset with only an
  ``environment`` column, whose ``reset()`` supplies the prompt).

:func:`reset_before_plan` draws the same pooled instances TRL will draw for the batch (TRL's own pool and order),
calls ``reset(**row)`` once on each, and keys every row by a stable hash of its row and observation (the task).
:func:`cached_resets` then hands TRL those observations when it resets the same instances, so every environment is
reset exactly once per batch, as in plain TRL, and the episodes run on the tasks that were planned. The rows of one
group (``n_max`` copies of a row) must then share one task: :func:`check_group_tasks` refuses a group whose
environments returned different observations, with the fix (plain TRL would mix tasks inside one GRPO group).

Without a dataset the placeholder rows do not name tasks, so two groups with the same observation in one batch are
two draws of the environment (its hidden state may differ), not one prompt sampled twice: each group is planned on
its own, keyed by its observation and its rank among the batch's groups with that observation
(:func:`group_keys`). With a dataset, equal keys are the same row sampled twice and are planned once, as for
prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ResetTasks",
    "cached_resets",
    "check_group_tasks",
    "group_keys",
    "needs_reset_before_plan",
    "reset_before_plan",
]

# TRL 1.16's prompt for a row without one when an environment owns the data (_generate_and_score_completions)
PLACEHOLDER_PROMPT: list[dict[str, str]] = [{"role": "user", "content": ""}]


@dataclass
class ResetTasks:
    """This process's rows after their environments were reset before the plan (aligned with the local rows).

    ``keys``: a stable id per row (``"e"`` + 16 hex digits of SHA-1 over the row and its observation);
    ``texts``: what the allocator embeds per row (the observation's text, after the row's prompt text if any);
    ``observations``: ``reset()``'s return value per row (None: nothing appended to the prompt);
    ``environments``: the instance each row was reset on (TRL's pooled instance for that row);
    ``per_group``: the environment owns the data, so each group is its own task (:func:`group_keys`).
    """

    keys: list[str]
    texts: list[str]
    observations: list[Any]
    environments: list[Any]
    per_group: bool = False


def needs_reset_before_plan(trainer: Any, inputs: Sequence[dict[str, Any]], id_column: str) -> bool:
    """Whether the rows of this batch are identified only by their environment's ``reset()`` output: the trainer has
    environments and either owns no dataset (``trainer._vip_env_owned``) or some row has neither ``prompt`` nor a
    value in ``id_column``."""
    if getattr(trainer, "environment_factories", None) is None:
        return False
    if getattr(trainer, "_vip_env_owned", False):
        return True
    return any("prompt" not in x and x.get(id_column) is None for x in inputs)


def _reset_kwargs(trainer: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments TRL 1.16 passes to ``reset``: the row, less ``environment`` with several environments."""
    if getattr(trainer, "_multi_environment", False):
        return {k: v for k, v in row.items() if k != "environment"}
    return dict(row)


def _observation_text(observation: Any) -> str:
    """The text of an observation (a string, or a list of content parts whose ``text`` entries are joined)."""
    if observation is None:
        return ""
    if isinstance(observation, str):
        return observation
    if isinstance(observation, list):
        parts = [str(p["text"]) for p in observation if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if parts:
            return "\n".join(parts)
    return json.dumps(observation, sort_keys=True, default=str)


def reset_before_plan(trainer: Any, inputs: Sequence[dict[str, Any]], prompt_text: Any) -> ResetTasks:
    """Reset each local row's environment (TRL's pool, TRL's order: the ``k``-th row of an environment gets its
    ``k``-th pooled instance, created when missing) and key the row by its task.

    ``prompt_text``: the plug-in's prompt-to-text rule (applied to a row's ``prompt`` when it has one).
    """
    names = [x.get("environment") if trainer._multi_environment else None for x in inputs]
    for name in set(names):
        if name not in trainer.environment_factories:
            raise ValueError(
                f"a row has environment={name!r}, which is not among the environments passed to environment_factory "
                f"({list(trainer.environment_factories)}); fix the dataset's 'environment' column"
            )
    cursor: dict[Any, int] = {}
    keys, texts, observations, environments = [], [], [], []
    for row, name in zip(inputs, names):
        pool = trainer._environment_pool[name]
        index = cursor.get(name, 0)
        if index == len(pool):
            pool.append(trainer.environment_factories[name]())
        cursor[name] = index + 1
        env = pool[index]
        observation = env.reset(**_reset_kwargs(trainer, row))
        own = {k: v for k, v in row.items() if not (trainer._vip_env_owned and k == "prompt")}
        blob = json.dumps({"row": own, "observation": observation}, sort_keys=True, default=str)
        keys.append("e" + hashlib.sha1(blob.encode()).hexdigest()[:16])
        head = prompt_text(row["prompt"]) if "prompt" in row and not trainer._vip_env_owned else ""
        text = _observation_text(observation)
        texts.append("\n".join(t for t in (head, text) if t) or blob)
        observations.append(observation)
        environments.append(env)
    return ResetTasks(keys, texts, observations, environments, per_group=bool(trainer._vip_env_owned))


def check_group_tasks(keys: Sequence[str], width: int) -> None:
    """Refuse a group (``width`` consecutive rows, copies of one dataset row) whose environments chose different
    tasks: VIP gives a task its count, so all rows of a group must be that task."""
    for start in range(0, len(keys), width):
        if len(set(keys[start : start + width])) > 1:
            raise ValueError(
                f"environment_factory's reset() returned different observations for the {width} copies of one row "
                f"(rows {start}-{start + width - 1} of the generation batch): VIPGRPOTrainer plans rollouts per task "
                "and the copies of a row form one group, so they must share a task. Make reset(**row) return the same "
                "observation for the same row (e.g. draw the task from a seed or index column of the dataset), or give "
                "a train_dataset whose rows name the task (a 'prompt' or VIPGRPOConfig.prompt_id_column)"
            )


def group_keys(keys: Sequence[str], width: int) -> list[str]:
    """Keys of an environment-owned batch, one group (``width`` rows) per task: each group's key gets its rank among
    the batch's groups with the same observation (``"<key>.0"``, ``"<key>.1"``, ...), the same for all its rows."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for start in range(0, len(keys), width):
        key = keys[start]
        rank = seen.get(key, 0)
        seen[key] = rank + 1
        out.extend([f"{key}.{rank}"] * len(keys[start : start + width]))
    return out


@contextlib.contextmanager
def cached_resets(tasks: ResetTasks | None) -> Iterator[None]:
    """While TRL generates the batch, ``reset`` of each pre-reset instance returns its planned observation instead
    of resetting again (an instance attribute over the class method, removed on exit)."""
    if tasks is None:
        yield
        return
    patched = []
    try:
        for env, observation in zip(tasks.environments, tasks.observations):
            if "reset" in vars(env):  # pragma: no cover - an instance can appear once per batch only
                continue

            def reset(*_args: Any, _observation: Any = observation, **_kwargs: Any) -> Any:
                return _observation

            try:
                env.reset = reset
            except AttributeError as exc:  # e.g. __slots__ without a reset slot
                raise ValueError(
                    f"{type(env).__name__} instances do not accept attributes ({exc}): VIPGRPOTrainer resets "
                    "environments before the plan and hands TRL the observation; give the class a __dict__ "
                    "(no __slots__), or a train_dataset whose rows name the task"
                ) from exc
            patched.append(env)
        yield
    finally:
        for env in patched:
            del env.reset
