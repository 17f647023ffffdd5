"""Which upstream examples to replay, and when: pure numpy, no Ray, no torch.

Replay (Jin & Ren 2024, sec. 5) mixes upstream examples into fine-tuning at `ratio` (paper: 1/32
for OLMo-1B/7B, 1/8 for OLMo-7B-Instruct). Two mixings (`replay.mixing`):

    lrf    the authors' code (`data_utils/replay_helper.py` `create_mixture_examples`, run by the
           Hugging Face Trainer's random sampler): one upstream example after every 1 / ratio task
           examples of the task's training set, int(n_task * ratio) + 1 upstream examples drawn
           and their order permuted; the whole mixture is then shuffled into batches each epoch, so
           replayed examples share batches with task examples. Steps: int(max_steps * (1 + ratio)),
           capped at max_epochs passes over the task set alone (`run_llm_ocl.py`). `lrf_mixture`.
    steps  whole replay steps: one optimizer step of upstream examples per 1 / ratio task steps,
           task_steps * (1 + ratio) steps in all (`replay_schedule`).

Which examples are replayed is the sampler's choice, always drawn from the replay pool, never from
the held-out (never-replayed) examples that replay runs are judged on, and without replacement:

    random        uniform
    predicted     probability softmax(predicted forgetting / T), T = 0.1
    ground_truth  the same softmax over measured forgetting (an upper bound for prediction)
    top_k         the examples with the largest predicted forgetting, largest first

Sampling "without replacement with probability softmax" is successive sampling: each draw picks
among the examples not drawn yet with probability proportional to their weight. It is drawn here by
the Gumbel-top-k trick (the order of log w + Gumbel noise), which has exactly that distribution and
gives a whole ordering in one sort.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLERS = ("random", "predicted", "ground_truth", "top_k")


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """(n,) probabilities softmax(scores / temperature), computed stably (max subtracted first)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not len(scores):
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a NaN prediction would silently never be replayed)")
    logits = scores / temperature
    logits -= logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()  # type: ignore[no-any-return]


def weighted_order(
    scores: np.ndarray, temperature: float, rng: np.random.Generator, count: int | None = None
) -> np.ndarray:
    """Positions into `scores`, drawn without replacement with P proportional to softmax(scores / T).

    Gumbel-top-k: argsort of scores / T + Gumbel noise is a draw of successive sampling without
    replacement from softmax(scores / T). Returns the first `count` positions (all by default).
    """
    scores = np.asarray(scores, dtype=np.float64)
    softmax_weights(scores, temperature)  # validation
    keys = scores / temperature + rng.gumbel(size=len(scores))
    order = np.argsort(-keys, kind="stable")
    return order if count is None else order[:count]


def top_k_order(scores: np.ndarray, count: int | None = None) -> np.ndarray:
    """Positions of the largest scores first (ties in position order): `weighted_order` as T -> 0."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order if count is None else order[:count]


def replay_order(
    sampler: str,
    pool: np.ndarray,
    count: int,
    seed: int,
    scores: np.ndarray | None = None,
    temperature: float = 0.1,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """`count` distinct upstream example indices from `pool`, in replay order.

    pool: (P,) upstream indices that may be replayed; scores: (P,) predicted (or, for ground_truth,
    measured) forgetting of each pool example, needed by every sampler but random; exclude: indices
    never to draw (already replayed ones in the online variant). Deterministic in `seed`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown replay sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    pool = np.asarray(pool, dtype=np.int64)
    if len(np.unique(pool)) != len(pool):
        raise ValueError("replay pool has repeated examples")
    keep = np.ones(len(pool), dtype=bool)
    if exclude is not None and len(exclude):
        keep = ~np.isin(pool, np.asarray(exclude, dtype=np.int64))
    if count > int(keep.sum()):
        raise ValueError(
            f"replay needs {count} distinct examples but the pool has only {int(keep.sum())} left; "
            "lower replay.ratio or replay.n_never_replayed"
        )
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = pool[keep]
    rng = np.random.default_rng(seed)
    if sampler == "random":
        return rng.permutation(candidates)[:count]
    if scores is None:
        raise ValueError(f"replay sampler {sampler!r} needs a score per pool example")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != pool.shape:
        raise ValueError(f"scores {scores.shape} must match the pool {pool.shape}")
    kept_scores = scores[keep]
    if sampler == "top_k":
        return candidates[top_k_order(kept_scores, count)]
    return candidates[weighted_order(kept_scores, temperature, rng, count)]


def split_never_replayed(n_examples: int, n_never_replayed: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, never_replayed): a seeded, fixed choice of held-out upstream examples, both sorted.

    The never-replayed set is the only set replay runs are judged on: an example that was replayed
    says nothing about whether the sampler protected the examples it did not see.
    """
    if not 0 < n_never_replayed < n_examples:
        raise ValueError(
            f"replay.n_never_replayed must be in 1..{n_examples - 1} for {n_examples} upstream examples, "
            f"got {n_never_replayed}"
        )
    order = np.random.default_rng([seed, n_examples]).permutation(n_examples)
    return np.sort(order[n_never_replayed:]), np.sort(order[:n_never_replayed])


# ---- step accounting -------------------------------------------------------------------------------


def replay_step_count(task_steps: int, ratio: float) -> int:
    """Replay steps added to `task_steps`: round(task_steps * ratio), so total = task_steps * (1 + ratio)."""
    if ratio < 0:
        raise ValueError(f"replay ratio must be >= 0, got {ratio}")
    return math.floor(task_steps * ratio + 0.5)


def replay_schedule(task_steps: int, ratio: float) -> np.ndarray:
    """(total steps,) bool, True at replay steps, spread evenly: with ratio 1/R one replay step
    in every block of R task steps. A step's index among task (or replay) steps is the count of
    task (or replay) steps before it (`np.cumsum`)."""
    n_replay = replay_step_count(task_steps, ratio)
    total = task_steps + n_replay
    schedule = np.zeros(total, dtype=bool)
    if n_replay:
        # The r-th replay step (r = 1..n) goes after round((r - 1/2) * task_steps / n) task steps: in
        # the middle of its block, so training still ends on task steps (and reports the task loss).
        after = np.floor((np.arange(1, n_replay + 1) - 0.5) * task_steps / n_replay + 0.5).astype(np.int64)
        schedule[after + np.arange(n_replay)] = True  # task steps before it + replay steps before it
    return schedule


def step_plan(schedule: np.ndarray, step: int) -> tuple[bool, int]:
    """(is_replay, index): whether optimizer step `step` is a replay step and its index among
    replay steps (or among task steps): what the batch at that step is cut from."""
    is_replay = bool(schedule[step])
    index = int(np.count_nonzero(schedule[:step] == is_replay))
    return is_replay, index


def online_switch_step(schedule: np.ndarray, fraction: float) -> tuple[int, int]:
    """(step, random_replay_steps): the online variant measures forgetting before optimizer step
    `step` = ceil(fraction * total steps); the replay steps before it use random replay
    (`random_replay_steps` of them), the ones from it on use the completed row's predictions."""
    if not 0 < fraction < 1:
        raise ValueError(f"online fraction must be in (0, 1), got {fraction}")
    step = math.ceil(fraction * len(schedule))
    return step, int(np.count_nonzero(schedule[:step]))


# ---- the authors' mixing (replay.mixing: lrf) --------------------------------------------------------


def lrf_replay_draws(n_task: int, ratio: float) -> int:
    """Upstream examples drawn for a task set of `n_task` examples: int(n_task * ratio) + 1, as
    `create_mixture_examples` (the last one is drawn but never placed when n_task * ratio is whole)."""
    if ratio <= 0:
        raise ValueError(f"replay ratio must be > 0, got {ratio}")
    return int(n_task * ratio) + 1


def lrf_mixture(n_task: int, ratio: float) -> np.ndarray:
    """(n_task + placed,) int64: the mixture dataset before shuffling, exactly as the authors' loop

        wait = 0; for each task example: append it; wait += ratio; if wait >= 1: wait -= 1, append
        the next upstream example

    Entries >= 0 are task example indices, entry -(r + 1) is the r-th drawn upstream example. The
    float accumulation is kept as theirs: a power-of-two ratio (1/32, 1/8, 1/4) places exactly after
    every 1 / ratio task examples, while ratio 0.1 places after 11, 21, 31, ... (ten additions of
    0.1 fall just short of 1.0), as their code does."""
    if n_task <= 0:
        raise ValueError(f"lrf_mixture: the task needs at least one example, got {n_task}")
    lrf_replay_draws(n_task, ratio)  # validation
    out: list[int] = []
    wait, placed = 0.0, 0
    for task_index in range(n_task):
        out.append(task_index)
        wait += ratio
        if wait >= 1:
            wait -= 1
            placed += 1
            out.append(-placed)
    return np.asarray(out, dtype=np.int64)


def lrf_total_steps(max_steps: int, ratio: float, max_epochs: float, n_task: int, batch: int) -> int:
    """Optimizer steps of an lrf replay fine-tune: int(max_steps * (1 + ratio)), then capped at
    max_epochs passes over the task set (not the mixture), as `run_llm_ocl.py` does (at least 1)."""
    extended = int(max_steps * (1 + ratio))
    by_epochs = math.floor(max_epochs * n_task / batch)
    return max(1, min(extended, by_epochs))


def permuted_draws(order: np.ndarray, seed: int) -> np.ndarray:
    """The drawn examples in a seeded random order (`rng.permutation(sample_idxs)` in the authors'
    `sample_random`): which of the int(n * ratio) + 1 draws is left unplaced does not depend on the
    sampler's own order (top_k's is by score)."""
    return np.random.default_rng([seed, 1]).permutation(np.asarray(order, dtype=np.int64))
