"""A cheap stand-in for RLVR training without an LLM, whose learning is real policy-gradient learning.

Model (documented in ``docs/benchmarks.md``)
--------------------------------------------
* A pool of ``N`` prompts. Prompt ``i`` has a feature vector ``x_i`` in ``R^d`` and a bias ``b_i``. Features are
  clustered (``x_i = c_k + e_i``: cluster centre plus a within-cluster offset) so prompts share structure; the
  bias has a cluster part (topic difficulty ``a_k``) and an idiosyncratic part: ``b_i = b_0 + a_k + u_i``.
* The policy is one shared parameter vector ``theta`` (``d``), starting at 0. It solves prompt ``i`` with
  probability ``p_i = sigmoid(x_i . theta + b_i)``; at the start ``p_i = sigmoid(b_i)`` spreads over (0, 1).
* A rollout of prompt ``i`` has reward ``r ~ Bernoulli(p_i)`` and score vector
  ``s = d log pi(r) / d theta + sigma * xi = (r - p_i) x_i + sigma * xi`` with ``xi ~ N(0, I_d)`` independent of
  the reward: the token-level score variation of an LLM that carries no information about the reward (the VIP
  paper's modelling assumption). Only the projection of such noise onto the parameters matters, so ``xi`` lives in
  the parameter space.
* Each step the estimator's actual gradient is formed over each prompt's group, whatever its size:
  ``g = (1 / K) sum_{kept i} (1 / n_i) sum_j A_ij s_ij`` with Dr.GRPO (``A = r - mean``), RLOO (``A = r - mean of
  the others``) or GRPO (``A = (r - mean) / (std + 1e-6)``) advantages; a group of one rollout gets ``A = 0``;
  ``K`` = the prompts planned for the step (``normalize="batch"``, default: a dropped prompt adds 0 and does not
  enlarge the others' step, so every strategy has the same effective learning rate) or the prompts that got
  rollouts (``normalize="kept"``: the CPU trainer's choice, which gives dropping strategies a larger step).
  Then plain SGD: ``theta <- theta + lr * g``.

So success rates rise, transfer between prompts of a cluster, and interfere (a step that helps one cluster can hurt
another whose features point the other way). The estimator's true gradient variance differs from the paper's
simplified model because the signal part ``(r - p) x`` is correlated with the advantage. ``sigma`` sets how much
of the gradient is reward-independent noise: at ``sigma = 0`` every allocation learns alike; allocation matters
when noise dominates (see ``vipalloc bench simulate``'s sigma sweep). The bias mean defaults to 0 so the mean
success starts near 0.5: pure noise (a random walk of ``theta``) then cannot raise the mean success on its own
(``sigmoid`` is odd around 0), only learning can.

Prompt texts: each cluster-level feature direction is rendered as words. A vocabulary of pseudo-words, each with a
random vector ``u_w``; prompt ``i`` draws ``words_per_prompt`` words with probabilities ``softmax(beta x_i . u_w)``.
Prompts with similar features share words, so a text embedder (the hashing one by default) gives similar
embeddings, as in real data; the topic difficulty ``a_k`` is thus visible through the text, the idiosyncratic
``u_i`` is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy.special import expit

__all__ = ["SIM_ESTIMATORS", "PromptStream", "SimConfig", "Simulator", "group_advantages_np"]

SIM_ESTIMATORS = ("drgrpo", "rloo", "grpo")
_GRPO_EPS = 1e-6
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class SimConfig:
    """Simulator parameters (all defaults are the ones ``vipalloc bench simulate`` uses).

    Units: ``lr`` multiplies the gradient in logit units per unit feature; ``sigma`` is the standard deviation of
    each coordinate of the reward-independent score noise (the signal part ``(r - p) x`` has norm < ~1.5).
    """

    n_prompts: int = 512  # pool size N
    n_clusters: int = 8  # K clusters of prompts
    dim: int = 16  # d, feature / parameter dimension
    cluster_scale: float = 1.0  # norm scale of cluster centres c_k ~ N(0, I/d) * scale
    within_scale: float = 0.6  # norm scale of within-cluster offsets e_i ~ N(0, I/d) * scale
    bias_mean: float = 0.0  # b_i = bias_mean + a_k + e_i: initial logit of prompt i in cluster k
    cluster_bias_std: float = 1.0  # a_k ~ N(0, cluster_bias_std^2): topic-level difficulty (visible via the text)
    bias_std: float = 1.0  # e_i ~ N(0, bias_std^2): idiosyncratic difficulty (invisible in the text)
    sigma: float = 10.0  # reward-independent score noise per coordinate
    lr: float = 1.0  # SGD step size on theta
    estimator: str = "drgrpo"  # advantage used for the update: drgrpo | rloo | grpo
    normalize: str = "batch"  # "batch": g / (prompts planned); "kept": g / (prompts with rollouts), like the trainer
    optimizer: str = "sgd"  # "sgd": theta += lr g; "adam": Adam(beta1=0.9, beta2=0.999, eps=1e-8) ascent, like LLM RL
    adam_beta1: float = 0.9  # Adam's first-moment decay; 0 = no momentum (normalisation only), to separate the two
    vocab_size: int = 256  # pseudo-words of the prompt texts
    words_per_prompt: int = 12
    text_beta: float = 3.0  # sharpness of the feature -> word distribution

    def __post_init__(self) -> None:
        for name in ("n_prompts", "n_clusters", "dim", "vocab_size", "words_per_prompt"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"SimConfig.{name} must be a positive integer, got {val!r}")
        if self.n_clusters > self.n_prompts:
            raise ValueError(f"n_clusters ({self.n_clusters}) cannot exceed n_prompts ({self.n_prompts})")
        for name in ("cluster_scale", "within_scale", "cluster_bias_std", "bias_std", "sigma", "text_beta"):
            val = float(getattr(self, name))
            if not (np.isfinite(val) and val >= 0):
                raise ValueError(f"SimConfig.{name} must be a finite number >= 0, got {val!r}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"SimConfig.lr must be a positive number, got {self.lr!r}")
        if not np.isfinite(self.bias_mean):
            raise ValueError("SimConfig.bias_mean must be finite")
        if not (0.0 <= self.adam_beta1 < 1.0):
            raise ValueError(f"SimConfig.adam_beta1 must lie in [0, 1), got {self.adam_beta1!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"SimConfig.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.normalize not in ("batch", "kept"):
            raise ValueError(f"SimConfig.normalize must be 'batch' or 'kept', got {self.normalize!r}")
        if self.estimator not in SIM_ESTIMATORS:
            raise ValueError(f"SimConfig.estimator must be one of {', '.join(SIM_ESTIMATORS)}, got {self.estimator!r}")

    def with_(self, **changes: Any) -> SimConfig:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_advantages_np(rewards: np.ndarray, counts: np.ndarray, estimator: str) -> np.ndarray:
    """Per-rollout advantages for consecutive groups of sizes ``counts`` (groups of size 0 allowed).

    ``rewards``: float (R,) with ``R = counts.sum()``, group ``i``'s rollouts contiguous in order. Returns float64
    (R,). A group of one rollout gets 0 (no baseline), a constant group gets 0 under every estimator.
    """
    r = np.asarray(rewards, np.float64)
    c = np.asarray(counts, np.int64)
    if r.shape != (int(c.sum()),):
        raise ValueError(f"rewards has {r.size} entries but counts sum to {int(c.sum())}")
    if estimator not in SIM_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(SIM_ESTIMATORS)}")
    owner = np.repeat(np.arange(len(c)), c)
    n = c[owner].astype(np.float64)
    total = np.bincount(owner, weights=r, minlength=len(c))[owner]
    mean = total / np.maximum(n, 1.0)
    if estimator == "drgrpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = r - (total - r) / np.maximum(n - 1.0, 1.0)
    else:
        sq = np.bincount(owner, weights=(r - mean) ** 2, minlength=len(c))[owner]
        std = np.sqrt(sq / np.maximum(n - 1.0, 1.0))
        adv = (r - mean) / (std + _GRPO_EPS)
    return np.where(n > 1, adv, 0.0)


def _pseudo_words(rng: np.random.Generator, k: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < k:
        w = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Simulator:
    """One simulated world: a prompt pool and a policy ``theta`` trained by the estimator's gradient.

    Attributes
    ----------
    ids: list[str]
        Prompt ids ``"s<seed>-<i>"`` (unique within the pool).
    texts: list[str]
        Prompt texts (pseudo-words drawn from the prompt's features).
    features: np.ndarray
        float64 ``(N, d)``.
    bias: np.ndarray
        float64 ``(N,)``.
    cluster: np.ndarray
        int64 ``(N,)`` cluster of each prompt.
    theta: np.ndarray
        float64 ``(d,)`` policy parameters, updated in place by :meth:`update`.
    """

    def __init__(self, config: SimConfig | None = None, seed: int = 0) -> None:
        self.config = cfg = config or SimConfig()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 0xC0FFEE])
        d = cfg.dim
        centres = rng.normal(size=(cfg.n_clusters, d)) * cfg.cluster_scale / np.sqrt(d)
        # every cluster is used at least once, the rest at random
        cluster = np.concatenate([np.arange(cfg.n_clusters), rng.integers(cfg.n_clusters, size=cfg.n_prompts)])
        self.cluster = rng.permutation(cluster[: cfg.n_prompts]).astype(np.int64)
        self.features = centres[self.cluster] + rng.normal(size=(cfg.n_prompts, d)) * cfg.within_scale / np.sqrt(d)
        topic = rng.normal(0.0, cfg.cluster_bias_std, size=cfg.n_clusters)
        self.bias = cfg.bias_mean + topic[self.cluster] + rng.normal(0.0, cfg.bias_std, size=cfg.n_prompts)
        self.theta = np.zeros(d)
        self._adam_m = np.zeros(d)
        self._adam_v = np.zeros(d)
        self._t = 0
        self.ids = [f"s{self.seed}-{i}" for i in range(cfg.n_prompts)]
        self.texts = self._make_texts(rng)

    def _make_texts(self, rng: np.random.Generator) -> list[str]:
        cfg = self.config
        vocab = _pseudo_words(rng, cfg.vocab_size)
        u = rng.normal(size=(cfg.vocab_size, cfg.dim))
        # scale features to unit norm for the text model so text sharpness does not depend on cluster_scale
        norm = np.linalg.norm(self.features, axis=1, keepdims=True)
        xs = self.features / np.where(norm > 0, norm, 1.0)
        logits = cfg.text_beta * xs @ u.T  # xs . u ~ N(0, 1) per word
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        texts = []
        for i in range(cfg.n_prompts):
            words = rng.choice(cfg.vocab_size, size=cfg.words_per_prompt, p=probs[i])
            texts.append("solve: " + " ".join(vocab[w] for w in words))
        return texts

    # ------------------------------------------------------------------ state
    def logits(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``x_i . theta + b_i`` for prompts ``idx`` (all when None), float64."""
        if idx is None:
            return self.features @ self.theta + self.bias
        idx = np.asarray(idx, np.int64)
        return self.features[idx] @ self.theta + self.bias[idx]

    def true_p(self, idx: np.ndarray | None = None) -> np.ndarray:
        """True success probabilities of prompts ``idx`` (all when None) under the current policy."""
        return expit(self.logits(idx))

    def mean_success(self) -> float:
        """Exact mean success probability over the whole pool (the evaluation metric; no sampling noise)."""
        return float(self.true_p().mean())

    def state(self) -> dict[str, Any]:
        return {"theta": self.theta.copy()}

    # ------------------------------------------------------------------ one step
    def rollouts(
        self,
        idx: Sequence[int] | np.ndarray,
        counts: Sequence[int] | np.ndarray,
        rng: np.random.Generator,
        width: int | None = None,
    ) -> list[np.ndarray]:
        """Sample ``counts[i]`` Bernoulli(p_i) rewards (0.0/1.0) for each prompt ``idx[i]`` under the current policy.

        Draws a fixed ``(len(idx), width)`` block of uniforms (``width`` defaults to ``max(counts)``) and uses the
        first ``counts[i]`` of row ``i``: with the same ``width``, strategies that share a generator share their
        random numbers (common random numbers make paired comparisons between strategies much tighter).
        """
        idx_a = np.asarray(idx, np.int64)
        c = np.asarray(counts, np.int64)
        if idx_a.shape != c.shape:
            raise ValueError(f"idx and counts must align, got shapes {idx_a.shape} and {c.shape}")
        if np.any(c < 0):
            raise ValueError("counts must be >= 0")
        w = int(c.max(initial=0)) if width is None else int(width)
        if w < int(c.max(initial=0)):
            raise ValueError(f"width {w} is smaller than the largest count {int(c.max())}")
        u = rng.random((len(c), w))
        p = self.true_p(idx_a)
        return [(u[i, : c[i]] < p[i]).astype(np.float64) for i in range(len(c))]

    def gradient(
        self,
        idx: Sequence[int] | np.ndarray,
        rewards: Sequence[np.ndarray],
        rng: np.random.Generator,
        p: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The estimator's policy gradient ``g`` (float64 ``(d,)``) from one step's groups.

        ``rewards[i]`` are the rewards of prompt ``idx[i]`` (empty = not generated). ``p`` are the success
        probabilities the rollouts were sampled with (default: the current policy's). The sum of per-prompt
        gradients is divided by ``batch_size`` (default ``len(idx)``, the prompts planned) when
        ``config.normalize == "batch"``, or by the number of prompts with rollouts when it is ``"kept"``.
        """
        cfg = self.config
        idx_a = np.asarray(idx, np.int64)
        if len(rewards) != len(idx_a):
            raise ValueError(f"got {len(idx_a)} prompts but {len(rewards)} reward arrays")
        counts = np.array([len(r) for r in rewards], np.int64)
        kept = counts > 0
        # drawn first, whatever the counts: the generator's consumption must not depend on the allocation
        z = rng.standard_normal((len(counts), cfg.dim))
        if not kept.any():
            return np.zeros(cfg.dim)
        p_used = self.true_p(idx_a) if p is None else np.asarray(p, np.float64)
        r = np.concatenate([np.asarray(x, np.float64) for x in rewards])
        adv = group_advantages_np(r, counts, cfg.estimator)
        owner = np.repeat(np.arange(len(counts)), counts)
        weight = adv / counts[owner]  # per-prompt mean over its rollouts
        # signal: sum_j A_j (r_j - p_i) x_i / n_i  -> a scalar per prompt times x_i
        coef = np.bincount(owner, weights=weight * (r - p_used[owner]), minlength=len(counts))
        g = coef @ self.features[idx_a]
        # noise: sum_j w_j sigma xi_j with xi_j ~ N(0, I) iid is exactly sigma * sqrt(sum_j w_j^2) * z_i, z_i ~ N(0, I);
        # (one z per prompt slot, drawn above: common random numbers across strategies)
        if cfg.sigma > 0:
            scale = np.sqrt(np.bincount(owner, weights=weight**2, minlength=len(counts)))
            g = g + cfg.sigma * (scale @ z)
        if cfg.normalize == "kept":
            return g / int(kept.sum())
        return g / (len(idx_a) if batch_size is None else int(batch_size))

    def update(self, grad: np.ndarray) -> None:
        """One ascent step on expected reward: SGD ``theta <- theta + lr * grad``, or Adam (bias-corrected moments,
        ``beta1 = config.adam_beta1`` (0.9), ``beta2 = 0.999``, ``eps = 1e-8``), whose per-coordinate normalisation
        makes the step along the true gradient shrink as the noise grows, as with the Adam-trained LLMs of RLVR."""
        grad = np.asarray(grad, np.float64)
        if grad.shape != self.theta.shape or not np.all(np.isfinite(grad)):
            raise ValueError(f"gradient must be finite with shape {self.theta.shape}")
        lr = self.config.lr
        if self.config.optimizer == "sgd":
            self.theta = self.theta + lr * grad
            return
        self._t += 1
        b1 = self.config.adam_beta1
        self._adam_m = b1 * self._adam_m + (1 - b1) * grad
        self._adam_v = 0.999 * self._adam_v + 0.001 * grad**2
        m_hat = self._adam_m / (1 - b1**self._t)
        v_hat = self._adam_v / (1 - 0.999**self._t)
        self.theta = self.theta + lr * m_hat / (np.sqrt(v_hat) + 1e-8)


class PromptStream:
    """Epoch-shuffled batches of distinct prompt indices: every prompt once per epoch, a new order each epoch.

    The same ``seed`` gives the same stream, so every strategy of a seed sees the same prompts in the same order.
    """

    def __init__(self, n_prompts: int, seed: int) -> None:
        if n_prompts < 1:
            raise ValueError("n_prompts must be >= 1")
        self.n = int(n_prompts)
        self.rng = np.random.default_rng([int(seed), 0x5EED])
        self._order = self.rng.permutation(self.n)
        self._pos = 0
        self.epoch = 0

    def next(self, m: int) -> np.ndarray:
        """The next ``m`` distinct prompt indices (``m <= n_prompts``); leftovers of an epoch start the next."""
        if not 1 <= m <= self.n:
            raise ValueError(f"batch size must be in [1, {self.n}], got {m}")
        out = list(self._order[self._pos : self._pos + m])
        self._pos += m
        if len(out) < m:
            self._order = self.rng.permutation(self.n)
            self.epoch += 1
            taken = set(out)
            chosen = [int(i) for i in self._order if i not in taken][: m - len(out)]
            picked = set(chosen)
            # the prompts that complete this batch are consumed first from the new epoch
            self._order = np.array(chosen + [int(i) for i in self._order if i not in picked], np.int64)
            self._pos = len(chosen)
            out.extend(chosen)
        return np.asarray(out, np.int64)
