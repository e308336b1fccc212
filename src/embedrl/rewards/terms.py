"""EG-RL rewards (docs/method.md §4.4–4.8, §4.10): format, outcome (frozen Embedder) and process (Discriminator).

Every reward is a batch-level callable in TRL's form ``reward(prompts, completions, **columns) -> list[float | None]``
(``None`` = not applicable: excluded from the group baseline, counted). One call sees the **whole step batch**:
``B`` pairs × 2 sides × ``G`` rollouts, because the outcome and process rewards need in-batch negatives.

The columns a rollout batch carries, one value per completion:

- ``pair_id`` (str) and ``side`` (``query`` / ``target``), optionally ``rollout`` (0-based index inside the group;
  counted in order of appearance when absent): the trajectory's :class:`RolloutKey`. Rewards are joined on it and
  scattered back into the caller's order; position never carries identity (docs/method.md §4.10).
- ``cue_key`` and ``n_frames``: the prompt family's required cue and the video's frame count (format reward).
- ``input_text``: the side's textual input, instruction + text (the Discriminator's anchor and candidate inputs).
- anything else the injected Embedder needs to rebuild its items (media, evidence): passed through untouched.

Layers, from pure to stateful:

- pure maths over tensors and keys: :func:`check_groups`, :func:`outcome_terms`, :func:`outcome_rewards`,
  :func:`build_discriminator_candidates`, :func:`parse_choice`, :func:`total_reward`;
- picklable callable classes holding the frozen models, injected as plain callables (nothing here loads a model):
  :class:`RolloutScorer` (the Embedder; embeds a batch once and shares the similarities), :class:`OutcomeReward`,
  :class:`ProcessReward` (the Discriminator); and the function :func:`format_reward`.

Weights and knobs live in :class:`RewardConfig` (presets ``paper`` and ``reference``, docs/method.md §4.8); group
normalisation lives in :mod:`embedrl.train.grpo_math`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from embedrl.config import RewardConfig
from embedrl.prompts import Side, render_discriminator
from embedrl.tcot import format_ok

__all__ = [
    "OutcomeReward",
    "OutcomeTerms",
    "ProcessReward",
    "RolloutKey",
    "RolloutScorer",
    "SimilarityBatch",
    "build_discriminator_candidates",
    "build_reward_funcs",
    "check_groups",
    "derive_seed",
    "format_reward",
    "outcome_from_similarities",
    "outcome_rewards",
    "outcome_terms",
    "parse_choice",
    "rollout_keys",
    "scatter",
    "similarity_batch",
    "total_reward",
]

SIDES: tuple[Side, Side] = ("query", "target")
_OTHER_SIDE: dict[str, Side] = {"query": "target", "target": "query"}

# ----------------------------------------------------------------------------------------------------------------
# Identity: every trajectory carries a key (docs/method.md §4.10)
# ----------------------------------------------------------------------------------------------------------------


class RolloutKey(NamedTuple):
    """Identity of one trajectory. Rewards are keyed by it and never inferred from position."""

    pair_id: str
    side: Side  # "query" or "target"
    rollout: int  # 0-based index inside the (pair, side) group of G rollouts


def rollout_keys(
    pair_id: Sequence[Any], side: Sequence[str], rollout: Sequence[int] | None = None
) -> list[RolloutKey]:
    """The keys of a batch from its ``pair_id``, ``side`` and optional ``rollout`` columns.

    Without ``rollout`` (TRL does not number the completions of a prompt), each (pair, side) numbers its rows in
    order of appearance: any labelling of a group's rollouts is as good as another, since results are scattered back
    by key. Pair ids are converted with ``str``.

    >>> rollout_keys(["a", "a", "a"], ["query", "query", "target"])
    [RolloutKey(pair_id='a', side='query', rollout=0), RolloutKey(pair_id='a', side='query', rollout=1), \
RolloutKey(pair_id='a', side='target', rollout=0)]
    """
    if len(pair_id) != len(side) or (rollout is not None and len(rollout) != len(side)):
        n_roll = None if rollout is None else len(rollout)
        raise ValueError(f"columns differ in length: pair_id {len(pair_id)}, side {len(side)}, rollout {n_roll}")
    bad = sorted({s for s in side if s not in SIDES})
    if bad:
        raise ValueError(f"side values {bad} are not allowed; use 'query' or 'target'")
    if rollout is not None:
        return [RolloutKey(str(p), s, int(r)) for p, s, r in zip(pair_id, side, rollout, strict=True)]
    seen: Counter[tuple[str, str]] = Counter()
    keys = []
    for p, s in zip(pair_id, side, strict=True):
        keys.append(RolloutKey(str(p), s, seen[(str(p), s)]))
        seen[(str(p), s)] += 1
    return keys


def check_groups(keys: Sequence[RolloutKey], G: int | None = None) -> list[str]:
    """Check the batch's groups before any reward is computed (docs/method.md §4.10); return the pair ids in order.

    Every (pair, side) must hold exactly the rollouts ``0..G-1`` once each, and every pair both sides. ``G=None``
    takes ``G`` from the first group. A pair filtered out on one side must be removed on both before calling.

    Raises:
        ValueError: naming the first offending pair or key.
    """
    if not keys:
        raise ValueError("empty rollout batch: nothing to reward")
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise ValueError(f"duplicate rollout key {dup[0]}: each (pair_id, side, rollout) must appear once")
    groups: dict[str, dict[str, set[int]]] = {}
    for k in keys:
        if k.side not in SIDES:
            raise ValueError(f"key {k} has side {k.side!r}; use 'query' or 'target'")
        groups.setdefault(k.pair_id, {}).setdefault(k.side, set()).add(k.rollout)
    if G is None:
        G = len(next(iter(next(iter(groups.values())).values())))
    if G < 1:
        raise ValueError(f"G={G}: a group needs at least one rollout")
    for pair, sides in groups.items():
        missing = [s for s in SIDES if s not in sides]
        if missing:
            raise ValueError(
                f"pair {pair!r} has no {missing[0]}-side rollouts: both sides of every pair must be in the batch; "
                "drop the pair on both sides (docs/method.md §4.10)"
            )
        for s, rollouts in sides.items():
            if rollouts != set(range(G)):
                raise ValueError(
                    f"pair {pair!r}, side {s}: rollouts {sorted(rollouts)}, expected exactly G={G} rollouts "
                    f"numbered 0..{G - 1}"
                )
    return list(groups)


def scatter(by_key: Mapping[RolloutKey, Any], keys: Sequence[RolloutKey]) -> list[Any]:
    """``[by_key[k] for k in keys]``: results back into the caller's trajectory order (KeyError if one is missing)."""
    return [by_key[k] for k in keys]


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from ``parts`` through SHA-256: stable across processes and Python runs (unlike ``hash()``).

    >>> derive_seed(7, "pair-1", "query", 0) == derive_seed(7, "pair-1", "query", 0)
    True
    """
    digest = hashlib.sha256(json.dumps(list(parts), ensure_ascii=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


# ----------------------------------------------------------------------------------------------------------------
# Format reward (docs/method.md §4.5)
# ----------------------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages; the last one counts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise TypeError(f"a completion must be a string or a list of chat messages; got {type(completion).__name__}")


def format_reward(
    completions: Sequence[Any],
    cue_key: Sequence[str | None] | None = None,
    n_frames: Sequence[int | None] | None = None,
    *,
    requires_cue: bool = True,
    strict_outside_tags: bool = False,
    **kwargs: Any,
) -> list[float]:
    """``R_fmt ∈ {0, 1}`` per completion (docs/method.md §4.5), a wrapper of :func:`embedrl.tcot.format_ok`.

    TRL signature: ``cue_key`` and ``n_frames`` are columns (one value per completion); ``prompts`` and other columns
    arrive in ``kwargs`` and are ignored. ``requires_cue=False`` is the ``reference`` check (tags only). Bind the
    config knobs with :func:`functools.partial` (:func:`build_reward_funcs` does).

    >>> good = ('<thinking>A red cube. {"text_keywords": ["red cube"]}</thinking><rethink>Yes.</rethink>'
    ...         '<answer>A red cube.</answer>')
    >>> format_reward([good, "A red cube."], cue_key=["text_keywords", "text_keywords"])
    [1.0, 0.0]
    >>> format_reward([good.replace('{"text_keywords": ["red cube"]}', "")], requires_cue=False)
    [1.0]
    """
    n = len(completions)
    if requires_cue and cue_key is None:
        raise ValueError("format_reward needs a cue_key column (the prompt family's cue), or requires_cue=False")
    keys = list(cue_key) if cue_key is not None else [None] * n
    frames = list(n_frames) if n_frames is not None else [None] * n
    if len(keys) != n or len(frames) != n:
        raise ValueError(f"{n} completions but {len(keys)} cue_key and {len(frames)} n_frames values")
    if requires_cue and None in keys:
        raise ValueError(f"cue_key is None for completion {keys.index(None)}; every prompt family requires a cue")
    return [
        float(format_ok(completion_text(c), k if requires_cue else None, f, strict_outside_tags=strict_outside_tags))
        for c, k, f in zip(completions, keys, frames, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Similarities and the outcome reward (docs/method.md §4.4, §4.6)
# ----------------------------------------------------------------------------------------------------------------


class OutcomeTerms(NamedTuple):
    """The outcome reward of one anchor rollout and the terms behind it (all logged, docs/method.md §4.11)."""

    reward: float  # R_out = outcome_factor · Acc · margin
    s_plus: float  # mean similarity to the G positive rollouts
    s_minus: float  # softmax(s/τ)-weighted (or plain) mean similarity to the negatives
    margin: float  # s_plus − s_minus
    acc_paper: float  # 1 iff all G positives rank in the top-K
    acc_frac: float  # |TopK ∩ P| / G


def outcome_terms(
    sim: Tensor, anchor_pair: Sequence[str], cand_pair: Sequence[str], G: int, cfg: RewardConfig
) -> dict[str, Tensor]:
    """The outcome terms of every anchor against every candidate (docs/method.md §4.6). Pure; one direction.

    Args:
        sim: similarities [n_anchor, n_cand]: anchors of one side (rows) vs all rollouts of the other side (columns).
        anchor_pair, cand_pair: the pair id of each row / column. Candidates of the anchor's own pair are its
            positives ``P`` (exactly ``G`` of them); all others are negatives ``N`` (at least one).
        G: rollouts per group.
        cfg: ``tau_neg``, ``negative_weighting``, ``acc_k``, ``acc_mode``, ``outcome_factor``.

    Returns:
        ``s_plus``, ``s_minus``, ``margin``, ``acc_paper``, ``acc_frac`` and ``reward``, each [n_anchor] float32.

    Ranking and ties: the top-K are the first K of a stable sort by descending similarity of the candidates ordered
    **negatives first** (each group in column order). So a positive tied with a negative ranks below it: a tie never
    earns accuracy, and ``acc_paper = 1`` means every positive strictly outranks all but ``K − G`` negatives (for
    ``K = G``: every negative). The result does not depend on the column order.

    >>> sim = torch.tensor([[0.9, 0.7, 0.5, 0.1]])  # one anchor of pair "a"; columns: a, a, b, b
    >>> t = outcome_terms(sim, ["a"], ["a", "a", "b", "b"], G=2, cfg=RewardConfig())
    >>> [round(t[k].item(), 4) for k in ("s_plus", "s_minus", "margin", "acc_paper", "reward")]
    [0.8, 0.376, 0.424, 1.0, 0.424]
    """
    n_a, n_c = len(anchor_pair), len(cand_pair)
    if sim.dim() != 2 or tuple(sim.shape) != (n_a, n_c):
        raise ValueError(f"sim must be [n_anchor={n_a}, n_cand={n_c}]; got {tuple(sim.shape)}")
    sim = sim.detach().float()  # [n_a, n_c]
    if not torch.isfinite(sim).all():
        raise ValueError("sim holds NaN or inf: check the Embedder's output")
    index: dict[str, int] = {}
    a_idx = torch.tensor([index.setdefault(p, len(index)) for p in anchor_pair], dtype=torch.long)  # [n_a]
    c_idx = torch.tensor([index.setdefault(p, len(index)) for p in cand_pair], dtype=torch.long)  # [n_c]
    pos = a_idx[:, None] == c_idx[None, :]  # [n_a, n_c] positives P
    neg = ~pos  # [n_a, n_c] negatives N
    wrong = (pos.sum(1) != G).nonzero()
    if len(wrong):
        a = int(wrong[0])
        raise ValueError(
            f"anchor {a} (pair {anchor_pair[a]!r}) has {int(pos[a].sum())} positive candidates, not G={G}"
        )
    if not neg.any(1).all():
        raise ValueError(
            "an anchor has no negative candidates: the batch needs at least 2 pairs (docs/method.md §4.4)"
        )
    k = min(cfg.acc_k or G, n_c)
    if cfg.acc_mode == "all_in_topk" and k < G:
        raise ValueError(f"acc_k={cfg.acc_k} < G={G}: all G positives can never fit in the top-K; use acc_k >= G")

    s_plus = (sim * pos).sum(1) / G  # [n_a]
    if cfg.negative_weighting == "softmax":
        w = torch.softmax((sim / cfg.tau_neg).masked_fill(pos, float("-inf")), dim=1)  # [n_a, n_c], 0 on P
    else:
        w = neg.float() / neg.sum(1, keepdim=True)  # [n_a, n_c]
    s_minus = (w * sim).sum(1)  # [n_a]
    margin = s_plus - s_minus  # [n_a]

    neg_first = torch.argsort(pos.long(), dim=1, stable=True)  # [n_a, n_c]: negatives, then positives
    by_sim = torch.sort(sim.gather(1, neg_first), dim=1, descending=True, stable=True).indices  # [n_a, n_c]
    ranked = neg_first.gather(1, by_sim)  # [n_a, n_c] candidate columns, best first
    hits = pos.gather(1, ranked[:, :k]).sum(1).float()  # [n_a] positives in the top-K
    acc_paper = (hits == G).float()  # [n_a]
    acc_frac = hits / G  # [n_a]
    acc = acc_paper if cfg.acc_mode == "all_in_topk" else acc_frac
    return {
        "s_plus": s_plus,
        "s_minus": s_minus,
        "margin": margin,
        "acc_paper": acc_paper,
        "acc_frac": acc_frac,
        "reward": cfg.outcome_factor * acc * margin,
    }


class SimilarityBatch(NamedTuple):
    """The step's similarity matrix, rows and columns in canonical (pair_id, rollout) order."""

    query_keys: list[RolloutKey]  # [n_q] row keys
    target_keys: list[RolloutKey]  # [n_t] column keys
    sim: Tensor  # [n_q, n_t] float32, s(u_{i,g}, v_{j,h}) = u·v

    def view(self, side: str) -> tuple[list[RolloutKey], list[RolloutKey], Tensor]:
        """``(anchor_keys, candidate_keys, sim [n_anchor, n_cand])`` for the anchors of ``side``."""
        if side == "query":
            return self.query_keys, self.target_keys, self.sim
        if side == "target":
            return self.target_keys, self.query_keys, self.sim.T
        raise ValueError(f"side={side!r}; use 'query' or 'target'")

    @property
    def num_pairs(self) -> int:
        return len({k.pair_id for k in self.query_keys})


def _check_embeddings(emb: Any, n: int, what: str) -> Tensor:
    """A float32 [n, D] tensor of finite, unit-norm rows, or ValueError. Zero vectors are rejected (§4.9)."""
    if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != n or emb.shape[1] == 0:
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"{what} must be a tensor [n={n}, D]; got {shape}")
    emb = emb.detach().float().cpu()
    norms = emb.norm(dim=1)  # [n]
    bad = (~torch.isfinite(norms) | ((norms - 1).abs() > 1e-2)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{what} row {i} has norm {norms[i].item():.4g}; the Embedder must return finite unit-norm vectors "
            "(a failed embedding raises or invalidates its group: never a zero-vector stand-in, docs/method.md §4.9)"
        )
    return emb


def _canonical(keys: Sequence[RolloutKey]) -> list[int]:
    return sorted(range(len(keys)), key=lambda i: (keys[i].pair_id, keys[i].rollout))


def similarity_batch(
    query_emb: Tensor,
    target_emb: Tensor,
    query_keys: Sequence[RolloutKey],
    target_keys: Sequence[RolloutKey],
    G: int | None = None,
) -> SimilarityBatch:
    """Check the groups, sort both sides into canonical order and compute ``sim = U Vᵀ`` [n_q, n_t].

    Args:
        query_emb: [n_q, D] unit-norm embeddings of the query-side rollouts, row i for ``query_keys[i]``.
        target_emb: [n_t, D] the same for the target side.
    """
    if any(k.side != "query" for k in query_keys) or any(k.side != "target" for k in target_keys):
        raise ValueError("query_keys must all have side 'query' and target_keys side 'target'")
    check_groups([*query_keys, *target_keys], G)
    u = _check_embeddings(query_emb, len(query_keys), "query embeddings")  # [n_q, D]
    v = _check_embeddings(target_emb, len(target_keys), "target embeddings")  # [n_t, D]
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"query and target embeddings differ in dimension: {u.shape[1]} vs {v.shape[1]}")
    qo, to = _canonical(query_keys), _canonical(target_keys)
    return SimilarityBatch([query_keys[i] for i in qo], [target_keys[i] for i in to], u[qo] @ v[to].T)


def outcome_from_similarities(
    batch: SimilarityBatch, G: int, cfg: RewardConfig
) -> dict[RolloutKey, OutcomeTerms | None]:
    """Outcome terms for every rollout of both sides (symmetric, docs/method.md §4.4); None for all when B < 2."""
    if batch.num_pairs < 2:
        return {k: None for k in (*batch.query_keys, *batch.target_keys)}
    out: dict[RolloutKey, OutcomeTerms | None] = {}
    for side in SIDES:
        anchors, cands, sim = batch.view(side)
        terms = outcome_terms(sim, [k.pair_id for k in anchors], [k.pair_id for k in cands], G, cfg)
        columns = [terms[name].tolist() for name in OutcomeTerms._fields]
        for key, values in zip(anchors, zip(*columns, strict=True), strict=True):
            out[key] = OutcomeTerms(*values)
    return out


def outcome_rewards(
    query_emb: Tensor,
    target_emb: Tensor,
    query_keys: Sequence[RolloutKey],
    target_keys: Sequence[RolloutKey],
    cfg: RewardConfig,
    G: int | None = None,
) -> dict[RolloutKey, OutcomeTerms | None]:
    """Outcome terms of every rollout, keyed: query-side anchors vs all target rollouts and the mirror (§4.4, §4.6).

    Args:
        query_emb: [B*G, D] unit-norm embeddings, row i for ``query_keys[i]`` (any order).
        target_emb: [B*G, D] the same for the target side.
        cfg: the reward config; ``G=None`` takes ``G`` from the keys.

    Returns:
        ``{key: OutcomeTerms}`` for all ``2·B·G`` keys; every value is None when ``B < 2`` (no negatives: the caller
        drops the batch and counts it). Use :func:`scatter` to put ``.reward`` into trajectory order.

    >>> u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # pairs a, b; G = 1; targets equal their queries
    >>> ks = [RolloutKey("a", "query", 0), RolloutKey("b", "query", 0)]
    >>> kt = [RolloutKey("a", "target", 0), RolloutKey("b", "target", 0)]
    >>> out = outcome_rewards(u, u, ks, kt, RewardConfig())
    >>> out[ks[0]].reward, out[kt[1]].margin, out[kt[1]].acc_paper
    (1.0, 1.0, 1.0)
    """
    batch = similarity_batch(query_emb, target_emb, query_keys, target_keys, G)
    G = G if G is not None else sum(1 for k in batch.query_keys if k.pair_id == batch.query_keys[0].pair_id)
    return outcome_from_similarities(batch, G, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Process reward (docs/method.md §4.7)
# ----------------------------------------------------------------------------------------------------------------


def build_discriminator_candidates(
    anchor_key: RolloutKey,
    sims_row: Sequence[float] | Tensor,
    cand_keys: Sequence[RolloutKey],
    G: int,
    m_neg: int,
    rng_seed: int | str,
    shuffle: bool = True,
) -> tuple[list[RolloutKey], list[int]]:
    """The Discriminator's candidates for one anchor, in prompt order, and the 0-based positions of the positives.

    Candidates: the ``G`` rollouts of the other side of the anchor's pair (positives, by rollout index), then, for
    each other pair, its rollout most similar to the anchor (ties: the lower rollout index), keeping the ``m_neg``
    pairs with the highest such similarity (ties: the smaller pair id), or all of them if fewer. With ``shuffle`` the
    list is shuffled by ``random.Random(derive_seed(rng_seed, pair_id, side, rollout))``: deterministic per
    (step seed, anchor key), independent of the batch order. Without it the positives come first (reference code).

    Args:
        anchor_key: the anchor rollout.
        sims_row: [n_cand] similarity of the anchor to each of ``cand_keys``.
        cand_keys: every rollout of the other side in the step batch.
        rng_seed: the step's seed, e.g. ``derive_seed(run_seed, step)``.

    >>> a = RolloutKey("p0", "query", 0)
    >>> cands = [RolloutKey(p, "target", h) for p in ("p0", "p1", "p2") for h in (0, 1)]
    >>> keys, pos = build_discriminator_candidates(a, [.9, .8, .1, .6, .7, .2], cands, 2, 1, 0, shuffle=False)
    >>> [(k.pair_id, k.rollout) for k in keys], pos
    ([('p0', 0), ('p0', 1), ('p2', 0)], [0, 1])
    """
    sims = [float(s) for s in (sims_row.tolist() if isinstance(sims_row, Tensor) else sims_row)]
    if len(sims) != len(cand_keys):
        raise ValueError(f"{len(sims)} similarities for {len(cand_keys)} candidates")
    if not all(math.isfinite(s) for s in sims):
        raise ValueError(f"similarities of anchor {anchor_key} hold NaN or inf")
    other = _OTHER_SIDE[anchor_key.side]
    if any(k.side != other for k in cand_keys):
        raise ValueError(f"candidates of a {anchor_key.side}-side anchor must all be {other}-side rollouts")
    positives = sorted((k for k in cand_keys if k.pair_id == anchor_key.pair_id), key=lambda k: k.rollout)
    if len(positives) != G:
        raise ValueError(f"anchor {anchor_key}: {len(positives)} positive candidates, expected G={G}")
    best: dict[str, tuple[float, RolloutKey]] = {}
    for key, s in zip(cand_keys, sims, strict=True):
        if key.pair_id == anchor_key.pair_id:
            continue
        cur = best.get(key.pair_id)
        if cur is None or s > cur[0] or (s == cur[0] and key.rollout < cur[1].rollout):
            best[key.pair_id] = (s, key)
    ranked = sorted(best.values(), key=lambda sk: (-sk[0], sk[1].pair_id))
    ordered = positives + [key for _, key in ranked[:m_neg]]
    if shuffle:
        seed = derive_seed(rng_seed, anchor_key.pair_id, anchor_key.side, anchor_key.rollout)
        random.Random(seed).shuffle(ordered)
    return ordered, [i for i, k in enumerate(ordered) if k.pair_id == anchor_key.pair_id]


_CHOICE_RE = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?")


def parse_choice(reply: str, n: int) -> int | None:
    """The Discriminator's choice: the first integer of ``reply`` (1-based, as numbered in the prompt) → 0-based.

    None when there is no number, the first number is not an integer (``2.5``) or it is outside ``1..n``: the
    caller counts it as wrong (reward 0) and logs it (docs/method.md §4.7).

    >>> parse_choice("Candidate 3.", 4), parse_choice("5", 4), parse_choice("-1", 4), parse_choice("none", 4)
    (2, None, None, None)
    """
    m = _CHOICE_RE.search(reply)
    if m is None or "." in m.group():
        return None
    k = int(m.group())
    return k - 1 if 1 <= k <= n else None


# ----------------------------------------------------------------------------------------------------------------
# Stateful rewards: the frozen models are injected callables
# ----------------------------------------------------------------------------------------------------------------

# embed(side, completions, columns) -> [n, D] unit-norm float: the frozen Embedder on one side's rollouts; columns
# holds the dataset columns of those same rows (text, media, ...) so it can build each item with the one builder.
EmbedFn = Callable[[Side, list[str], dict[str, list[Any]]], Tensor]
# discriminator(prompts) -> replies, one per prompt, same order (greedy, ~10 new tokens; batched by the callee).
DiscriminatorFn = Callable[[list[str]], list[str]]

_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "completion_ids", "environments")


def _columns(n: int, columns: Mapping[str, Any]) -> dict[str, list[Any]]:
    out = {}
    for name, values in columns.items():
        if name in _TRL_EXTRAS:
            continue
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != n:
            raise ValueError(f"column {name!r} must be a list with one value per completion ({n})")
        out[name] = list(values)
    return out


def _group_size(keys: Sequence[RolloutKey], num_generations: int | None) -> int:
    check_groups(keys, num_generations)
    return num_generations if num_generations is not None else sum(1 for k in keys if k[:2] == keys[0][:2])


def _fingerprint(keys: Sequence[RolloutKey], texts: Sequence[str]) -> str:
    payload = json.dumps([[*k, t] for k, t in zip(keys, texts, strict=True)], ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class RolloutScorer:
    """The frozen Embedder on a rollout batch: embeds each side once (batched) and returns its SimilarityBatch.

    The last batch is cached by a hash of its keys and completions, so the outcome and process rewards of one step
    share one embedding pass. Picklable when ``embed`` is (the cache is not pickled).
    """

    def __init__(self, embed: EmbedFn) -> None:
        self.embed = embed
        self._cache: tuple[str, SimilarityBatch] | None = None
        self.calls = 0  # embedding passes made (one per side per new batch)

    def __call__(
        self, keys: Sequence[RolloutKey], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
    ) -> SimilarityBatch:
        fp = _fingerprint(keys, completions)
        if self._cache is not None and self._cache[0] == fp:
            return self._cache[1]
        embs, side_keys = {}, {}
        for side in SIDES:
            rows = [i for i, k in enumerate(keys) if k.side == side]
            cols = {name: [values[i] for i in rows] for name, values in columns.items()}
            embs[side] = self.embed(side, [completions[i] for i in rows], cols)
            side_keys[side] = [keys[i] for i in rows]
            self.calls += 1
        batch = similarity_batch(embs["query"], embs["target"], side_keys["query"], side_keys["target"])
        self._cache = (fp, batch)
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}


def _side_means(values: Mapping[RolloutKey, float], prefix: str) -> dict[str, float]:
    stats = {}
    for side in SIDES:
        vals = [v for k, v in values.items() if k.side == side]
        if vals:
            stats[f"{prefix}/{side}"] = sum(vals) / len(vals)
    return stats


class _ScoredReward:
    """A reward over the scorer's similarity batch, called in TRL's reward-function signature:
    ``reward(prompts, completions, pair_id=..., side=..., [rollout=...], **columns) -> list``. A subclass computes
    its values per rollout key in :meth:`_rewards`; ``required`` names the columns it needs besides the keys."""

    scorer: RolloutScorer
    num_generations: int | None
    last_stats: dict[str, float]
    required: tuple[str, ...] = ()

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        pair_id: Sequence[Any],
        side: Sequence[str],
        rollout: Sequence[int] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        missing = [name for name in self.required if name not in columns]
        if missing:
            raise ValueError(f"the {type(self).__name__} needs the column(s) {missing}")
        keys = rollout_keys(pair_id, side, rollout)
        G = _group_size(keys, self.num_generations)
        texts = [completion_text(c) for c in completions]
        batch = self.scorer(
            keys, texts, {"pair_id": list(pair_id), "side": list(side), **_columns(len(keys), columns)}
        )
        out = self._rewards(batch, keys, G, texts, columns)
        _log(self.last_stats, log_metric)
        return scatter(out, keys)

    def _rewards(
        self, batch: SimilarityBatch, keys: list[RolloutKey], G: int, texts: list[str], columns: Mapping[str, Any]
    ) -> Mapping[RolloutKey, float | None]:
        raise NotImplementedError


def _log(stats: Mapping[str, float], log_metric: Callable[[str, float], None] | None) -> None:
    if log_metric is not None:
        for name, value in stats.items():
            log_metric(name, value)


class OutcomeReward(_ScoredReward):
    """``R_out`` (docs/method.md §4.6) as a TRL reward: ``reward(prompts, completions, pair_id, side, ...) -> list``.

    Symmetric over the whole batch: each query-side rollout is ranked against all target-side rollouts and vice
    versa. A batch with fewer than 2 pairs gets None for every rollout and counts in ``counts["batches_below_2"]``.
    ``last_stats`` holds the step's means per side (``reward/outcome/{s_plus,s_minus,margin,acc_paper,acc_frac,
    reward}/{query,target}``); they also go to TRL's ``log_metric`` when it is passed.

    >>> embed = lambda side, texts, columns: torch.tensor([[1.0, 0.0] if "red" in t else [0.0, 1.0] for t in texts])
    >>> reward = OutcomeReward(RolloutScorer(embed), RewardConfig())
    >>> reward(prompts=[""] * 4, completions=["red", "blue", "a red cube", "blue"],
    ...        pair_id=["a", "b", "a", "b"], side=["query", "query", "target", "target"])
    [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, scorer: RolloutScorer, cfg: RewardConfig, *, num_generations: int | None = None) -> None:
        self.scorer = scorer
        self.cfg = cfg
        self.num_generations = num_generations
        self.counts: Counter[str] = Counter()
        self.last_stats: dict[str, float] = {}
        self.last_terms: dict[RolloutKey, OutcomeTerms | None] = {}
        self.__name__ = "outcome"  # TRL's name for the reward column: rewards/outcome/mean

    def score(self, batch: SimilarityBatch, G: int) -> dict[RolloutKey, OutcomeTerms | None]:
        """Outcome terms per key for a scored batch; updates ``counts`` and ``last_stats``."""
        terms = outcome_from_similarities(batch, G, self.cfg)
        self.counts["batches"] += 1
        self.last_stats = {}
        if batch.num_pairs < 2:
            self.counts["batches_below_2"] += 1
            self.counts["rollouts_not_applicable"] += len(terms)
        else:
            for name in OutcomeTerms._fields:
                values = {k: getattr(t, name) for k, t in terms.items() if t is not None}
                self.last_stats.update(_side_means(values, f"reward/outcome/{name}"))
        self.last_terms = terms
        return terms

    def _rewards(
        self, batch: SimilarityBatch, keys: list[RolloutKey], G: int, texts: list[str], columns: Mapping[str, Any]
    ) -> dict[RolloutKey, float | None]:
        return {k: None if t is None else t.reward for k, t in self.score(batch, G).items()}


class ProcessReward(_ScoredReward):
    """``R_proc`` (docs/method.md §4.7) as a TRL reward; the Discriminator is an injected ``prompts -> replies``
    callable.

    For every anchor rollout (both sides): candidates from :func:`build_discriminator_candidates` (shuffled per
    anchor with a seed from ``(seed, step, pair, side, rollout)``), a prompt from
    :func:`embedrl.prompts.render_discriminator` (target-side anchors: each candidate block also carries the
    candidate query's ``input_text``), **one** batched Discriminator call for the whole step, then
    :func:`parse_choice`. Reward: ``1[choice ∈ positives]`` (``binary``) or ``m · 1[...]`` (``margin``, m the
    anchor's outcome margin); an unparseable or out-of-range reply is wrong (0) and counted in
    ``counts["parse_failures"]``. Fewer than 2 pairs: None for every rollout. The step is TRL's
    ``trainer_state.global_step`` when given, else the number of earlier calls.

    >>> embed = lambda side, texts, columns: torch.tensor([[1.0, 0.0] if "red" in t else [0.0, 1.0] for t in texts])
    >>> def discriminator(prompts):  # toy: the candidate whose reasoning equals the anchor's
    ...     return [re.search(r"Candidate (\\d+)[^\\n]*: " + p.split("Anchor reasoning: ")[1].split("\\n")[0] + "\\n",
    ...                       p).group(1) for p in prompts]
    >>> reward = ProcessReward(discriminator, RolloutScorer(embed), RewardConfig())
    >>> reward(prompts=[""] * 4, completions=["red", "blue", "red", "blue"], pair_id=["a", "b", "a", "b"],
    ...        side=["query", "query", "target", "target"], input_text=["find red", "find blue", "", ""])
    [1.0, 1.0, 1.0, 1.0]
    >>> reward.last_stats["reward/process/chance"]
    0.5
    """

    required = ("input_text",)  # each rollout's textual input, shown to the Discriminator

    def __init__(
        self,
        discriminator: DiscriminatorFn,
        scorer: RolloutScorer,
        cfg: RewardConfig,
        *,
        num_generations: int | None = None,
        seed: int = 0,
    ) -> None:
        self.discriminator = discriminator
        self.scorer = scorer
        self.cfg = cfg
        self.num_generations = num_generations
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.last_stats: dict[str, float] = {}
        # per anchor: (candidate keys in prompt order, positive positions, parsed choice or None)
        self.last_choices: dict[RolloutKey, tuple[list[RolloutKey], list[int], int | None]] = {}
        self.__name__ = "process"

    def score(
        self,
        batch: SimilarityBatch,
        texts: Mapping[RolloutKey, str],
        inputs: Mapping[RolloutKey, str],
        G: int,
        step: int,
    ) -> dict[RolloutKey, float | None]:
        """Process reward per key of a scored batch. ``texts``: each rollout's T-CoT; ``inputs``: its textual input."""
        keys = [*batch.query_keys, *batch.target_keys]
        self.counts["batches"] += 1
        self.last_stats, self.last_choices = {}, {}
        if batch.num_pairs < 2:
            self.counts["batches_below_2"] += 1
            self.counts["rollouts_not_applicable"] += len(keys)
            return dict.fromkeys(keys)
        margins = None
        if self.cfg.process_value == "margin":
            margins = {k: t.margin for k, t in outcome_from_similarities(batch, G, self.cfg).items() if t is not None}
        step_seed = derive_seed(self.seed, step)
        prompts, plans = [], []
        for side in SIDES:
            anchors, cands, sim = batch.view(side)
            for a, row in zip(anchors, sim, strict=True):
                order, positions = build_discriminator_candidates(
                    a, row, cands, G, self.cfg.m_neg, step_seed, self.cfg.shuffle_candidates
                )
                cand_inputs = [inputs[c] for c in order] if side == "target" else None
                prompts.append(render_discriminator(inputs[a], texts[a], [texts[c] for c in order], cand_inputs))
                plans.append((a, order, positions))
        replies = self.discriminator(prompts)
        if not isinstance(replies, Sequence) or len(replies) != len(prompts):
            n_rep = len(replies) if isinstance(replies, Sequence) else type(replies).__name__
            raise ValueError(f"the Discriminator returned {n_rep} replies for {len(prompts)} prompts; need one each")
        out: dict[RolloutKey, float | None] = {}
        correct: dict[RolloutKey, float] = {}
        for (a, order, positions), reply in zip(plans, replies, strict=True):
            choice = parse_choice(str(reply), len(order))
            self.counts["discriminator_calls"] += 1
            if choice is None:
                self.counts["parse_failures"] += 1
            hit = choice is not None and choice in positions
            self.counts["discriminator_correct"] += hit
            correct[a] = float(hit)
            out[a] = (margins[a] if margins is not None else 1.0) if hit else 0.0
            self.last_choices[a] = (order, positions, choice)
        n_neg = min(self.cfg.m_neg, batch.num_pairs - 1)
        self.last_stats = {
            **_side_means(correct, "reward/process/accuracy"),
            **_side_means(out, "reward/process/reward"),
            "reward/process/chance": G / (G + n_neg),
            "reward/process/parse_failures": float(sum(c is None for _, _, c in self.last_choices.values())),
        }
        return out

    def _rewards(
        self, batch: SimilarityBatch, keys: list[RolloutKey], G: int, texts: list[str], columns: Mapping[str, Any]
    ) -> dict[RolloutKey, float | None]:
        trainer_state = columns.get("trainer_state")
        step = trainer_state.global_step if trainer_state is not None else self.counts["batches"]
        inputs = dict(zip(keys, columns["input_text"], strict=True))
        return self.score(batch, dict(zip(keys, texts, strict=True)), inputs, G, step)


# ----------------------------------------------------------------------------------------------------------------
# Total reward (docs/method.md §4.8) and the reward table
# ----------------------------------------------------------------------------------------------------------------


def total_reward(components: Mapping[str, Sequence[float | None]], cfg: RewardConfig) -> list[float | None]:
    """``R = w_format·R_fmt + w_process·R_proc + w_outcome·R_out`` per rollout (docs/method.md §4.8).

    ``components`` maps ``format``, ``process``, ``outcome`` to per-rollout lists (same order). A component whose
    weight is 0 is ignored (and may be absent); in any other, None or NaN makes the rollout's total None (not
    applicable). Weights are not renormalised.

    >>> total = total_reward({"format": [1.0, 1.0], "process": [1.0, None], "outcome": [0.5, 0.5]}, RewardConfig())
    >>> [None if r is None else round(r, 6) for r in total]  # 0.05·1 + 0.8·1 + 0.2·0.5
    [0.95, None]
    """
    weights = cfg.weights
    unknown = sorted(set(components) - set(weights))
    if unknown:
        raise ValueError(f"unknown reward component(s) {unknown}; use {sorted(weights)}")
    missing = [name for name, w in weights.items() if w != 0 and name not in components]
    if missing:
        raise ValueError(f"component(s) {missing} have non-zero weight but no values")
    lengths = {name: len(values) for name, values in components.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward components differ in length: {lengths}")
    if not lengths:
        raise ValueError("no reward components given")
    n = next(iter(lengths.values()))
    used = [(w, components[name]) for name, w in weights.items() if w != 0]
    out: list[float | None] = []
    for i in range(n):
        values = [values[i] for _, values in used]
        if any(v is None or math.isnan(v) for v in values):
            out.append(None)
        else:
            out.append(sum(w * v for (w, _), v in zip(used, values, strict=True)))
    return out


# Name -> reward (principle 9). format_reward is a function; the others are classes built with their models.


def build_reward_funcs(
    cfg: RewardConfig,
    embed: EmbedFn,
    discriminator: DiscriminatorFn,
    *,
    num_generations: int | None = None,
    seed: int = 0,
) -> tuple[list[Callable[..., list[float | None]]], list[float]]:
    """``(reward_funcs, reward_weights)`` for TRL's ``GRPOTrainer`` / ``GRPOConfig``: format, process, outcome.

    The outcome and process rewards share one :class:`RolloutScorer`, so each step embeds its rollouts once.
    """
    scorer = RolloutScorer(embed)
    funcs: list[Callable[..., list[float | None]]] = [
        partial(
            format_reward,
            requires_cue=cfg.format_requires_cue,
            strict_outside_tags=cfg.format_strict_outside_tags,
        ),
        ProcessReward(discriminator, scorer, cfg, num_generations=num_generations, seed=seed),
        OutcomeReward(scorer, cfg, num_generations=num_generations),
    ]
    return funcs, [cfg.w_format, cfg.w_process, cfg.w_outcome]
