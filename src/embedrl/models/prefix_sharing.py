"""One forward pass over the part of a group of rows that they have in common (docs/rewards.md §2).

The EG-RL reward embeds the ``G`` rollouts of an item as the same item (system turn, images, text, video) followed by
different T-CoTs, so the ``G`` rows of a group start with the same tokens. :func:`hidden_at_emb` runs the language
model over that shared prefix once per group, copies its keys and values to the group's rows, and runs each row's own
suffix on top of them: causal attention makes the prefix's keys and values independent of what follows, so the
result equals a plain forward of the whole rows (float rounding apart).

What makes it exact for any batch, not just the reward's:

- the prefix is the longest run of tokens every row of the group starts with, cut back so that it never splits an
  image or a video and never holds a visual whose pixels or grid differ between the rows (equal token ids do not
  imply equal pixels); each row keeps at least one token of its own;
- positions come from the model's own ``get_rope_index`` over the whole rows laid out as ``[prefix | suffix]``, so
  multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) counts the prefix's visuals as the plain forward does;
- the vision tower runs once over the batch's visuals (through the Embedder's visual cache when attached), and each
  forward receives the features of its own visuals, in the order the model consumes them (models whose forward
  takes no precomputed features get the visuals' pixel rows instead).

Inference only: no gradients flow through the copied keys and values.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["hidden_at_emb", "shared_prefix_length"]

_KINDS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


@dataclass(frozen=True)
class _Visual:
    """One image or video of a row: where its placeholder tokens sit and where its pixel rows are."""

    kind: str  # "image" | "video"
    index: int  # its index among the batch's visuals of that kind (row order, then token order)
    first: int  # position of its first placeholder token in the row (padding removed)
    last: int  # position of its last placeholder token
    pixel_rows: tuple[int, int]  # [start, stop) in the batch's pixel_values / pixel_values_videos


def _row_visuals(
    ids: list[int], token_ids: Mapping[str, int], tokens_per: Mapping[str, list[int]], cursor: dict[str, int],
    pixel_start: Mapping[str, list[int]],
) -> list[_Visual]:  # fmt: skip
    """The visuals of one row in token order; ``cursor`` (per kind) advances over the batch's visuals."""
    visuals: list[_Visual] = []
    for kind, token in token_ids.items():
        positions = [i for i, t in enumerate(ids) if t == token]
        taken = 0
        while taken < len(positions):
            index = cursor[kind]
            if index >= len(tokens_per[kind]):
                raise ValueError(f"the batch has more {kind} placeholder tokens than {_KINDS[kind][1]} rows")
            n = tokens_per[kind][index]
            span = positions[taken : taken + n]
            if len(span) != n:
                raise ValueError(f"a row has {len(span)} placeholder tokens for a {kind} that needs {n}")
            rows = (pixel_start[kind][index], pixel_start[kind][index + 1])
            visuals.append(_Visual(kind, index, span[0], span[-1], rows))
            cursor[kind], taken = index + 1, taken + n
    return sorted(visuals, key=lambda v: v.first)


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token run every row starts with, at most the shortest row's length minus 1."""
    if not rows:
        raise ValueError("need at least one row")
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows[1:]):
        n += 1
    return max(n, 0)


def _safe_cut(cut: int, visuals: Sequence[Sequence[_Visual]], inputs: Mapping[str, Tensor]) -> int:
    """``cut`` moved back before the first visual it would split or that is not the same in every row."""
    for k, v in enumerate(visuals[0]):
        if v.first >= cut:
            break
        whole = v.last < cut
        same = all(len(row) > k and row[k].kind == v.kind and _same_visual(v, row[k], inputs) for row in visuals[1:])
        if not (whole and same):
            return v.first
    return cut


def _same_visual(a: _Visual, b: _Visual, inputs: Mapping[str, Tensor]) -> bool:
    pixels, grid = _KINDS[a.kind]
    if a.index == b.index:
        return True
    if not torch.equal(inputs[grid][a.index], inputs[grid][b.index]):
        return False
    return torch.equal(inputs[pixels][slice(*a.pixel_rows)], inputs[pixels][slice(*b.pixel_rows)])


def _last(row: list[int], token: int) -> int:
    return len(row) - 1 - row[::-1].index(token)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the key/value cache (``cache`` in newer transformers, ``past_key_values`` before)."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _vision_features(model: torch.nn.Module, inputs: Mapping[str, Tensor]) -> dict[str, Any]:
    """The vision tower's output for every image and every video of the batch, one call per kind (through the
    Embedder's visual cache when it is attached)."""
    out: dict[str, Any] = {}
    for kind, (pixels, grid) in _KINDS.items():
        if pixels in inputs:
            method = model.get_image_features if kind == "image" else model.get_video_features
            out[kind] = method(inputs[pixels], inputs[grid], return_dict=True)
    return out


def _subset(output: Any, index: list[int]) -> Any:
    """A ``get_*_features`` output holding only the visuals at ``index`` (per-visual tuples; Qwen3-VL's deepstack
    features per layer)."""
    fields: dict[str, Any] = {"pooler_output": tuple(output.pooler_output[i] for i in index)}
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack is not None:
        fields["deepstack_features"] = [tuple(layer[i] for i in index) for layer in deepstack]
    return type(output)(**fields)


def hidden_at_emb(
    model: torch.nn.Module, inputs: Mapping[str, Tensor], groups: Sequence[Sequence[int]], emb_token_id: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Final hidden states of every row of a collated batch, computed with each group's common prefix run once.

    Args:
        model: the vision-language model without its LM head (e.g. ``Qwen3VLModel``).
        inputs: a left- or right-padded processor batch (``input_ids``, ``attention_mask``, ``mm_token_type_ids``
            and the pixel keys), as :meth:`~embedrl.models.Embedder.collate` returns it.
        groups: row indices of the batch, each row in exactly one group; rows of a group usually share a prefix
            (a group of one runs as a plain forward of its row).
        emb_token_id: the ``<emb>`` id (kept in every row's own part).

    Returns:
        ``(hidden [B, S, D], input_ids [B, S], attention_mask [B, S])`` of each row's own part (right-padded), in
        batch order, for :func:`~embedrl.models.embedder.pool_last_emb`.

    Raises:
        ValueError: the groups do not cover each row exactly once, or the placeholder tokens do not match the grids.
    """
    batch = inputs["input_ids"].shape[0]
    if sorted(i for g in groups for i in g) != list(range(batch)) or any(not g for g in groups):
        raise ValueError(f"groups must cover the {batch} rows exactly once, got {[list(g) for g in groups]}")
    device = inputs["input_ids"].device
    config = model.config
    merge = config.vision_config.spatial_merge_size**2
    token_ids = {"image": config.image_token_id, "video": config.video_token_id}
    tokens_per: dict[str, list[int]] = {}
    pixel_start: dict[str, list[int]] = {}
    for kind, (_, grid) in _KINDS.items():
        sizes = [int(g.prod()) for g in inputs[grid]] if grid in inputs else []
        tokens_per[kind] = [s // merge for s in sizes]
        pixel_start[kind] = [0, *torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()] if sizes else [0]

    mask = inputs["attention_mask"].bool()
    keep = [mask[r] for r in range(batch)]
    ids = [inputs["input_ids"][r][keep[r]].tolist() for r in range(batch)]
    if "mm_token_type_ids" in inputs:  # 0 text, 1 image, 2 video: what multimodal RoPE counts
        types = [inputs["mm_token_type_ids"][r][keep[r]].tolist() for r in range(batch)]
    else:
        kind_of = {token_ids["image"]: 1, token_ids["video"]: 2}
        types = [[kind_of.get(t, 0) for t in row] for row in ids]
    cursor = dict.fromkeys(_KINDS, 0)
    visuals = [_row_visuals(ids[r], token_ids, tokens_per, cursor, pixel_start) for r in range(batch)]

    cut_of_group = []
    for group in groups:
        cut = shared_prefix_length([ids[r] for r in group]) if len(group) > 1 else 0
        cut = min([cut] + [_last(ids[r], emb_token_id) for r in group if emb_token_id in ids[r]])
        cut_of_group.append(_safe_cut(cut, [visuals[r] for r in group], inputs))
    group_of = {r: gi for gi, group in enumerate(groups) for r in group}
    cut_of = [cut_of_group[group_of[r]] for r in range(batch)]
    width_p = max(cut_of_group)
    width_s = max(len(ids[r]) - cut_of[r] for r in range(batch))
    pad = 0

    # Every row laid out as [left-padded prefix | right-padded own part], for the model's positions.
    full_ids = torch.full((batch, width_p + width_s), pad, dtype=torch.long)
    full_mask = torch.zeros((batch, width_p + width_s), dtype=torch.long)
    full_types = torch.zeros_like(full_ids)
    for r in range(batch):
        c, n = cut_of[r], len(ids[r])
        full_ids[r, width_p - c : width_p + n - c] = torch.tensor(ids[r])
        full_mask[r, width_p - c : width_p + n - c] = 1
        full_types[r, width_p - c : width_p + n - c] = torch.tensor(types[r])

    def in_part(r: int, prefix: bool) -> list[_Visual]:
        return [v for v in visuals[r] if (v.first < cut_of[r]) == prefix]

    features = _vision_features(model, inputs) if _accepts(model, "mm_encoder_outputs") else None

    def visual_inputs(parts: list[list[_Visual]]) -> dict[str, Any]:
        """The listed visuals, in that order, as the forward takes them: their grids (and Qwen2.5-VL's seconds per
        grid) with their vision features when the model accepts precomputed ones, else with their pixel rows."""
        out: dict[str, Any] = {}
        for kind, (pixels, grid) in _KINDS.items():
            chosen = [v for part in parts for v in part if v.kind == kind]
            if not chosen:
                continue
            out[grid] = inputs[grid][[v.index for v in chosen]]
            if kind == "video" and "second_per_grid_ts" in inputs:
                out["second_per_grid_ts"] = inputs["second_per_grid_ts"][[v.index for v in chosen]]
            if features is None:
                out[pixels] = torch.cat([inputs[pixels][slice(*v.pixel_rows)] for v in chosen])
            else:
                out.setdefault("mm_encoder_outputs", {})[kind] = _subset(features[kind], [v.index for v in chosen])
        return out

    layout = visual_inputs([in_part(groups[group_of[r]][0], True) + in_part(r, False) for r in range(batch)])
    rope_kwargs = {k: layout[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in layout}
    position_ids, _ = model.get_rope_index(
        full_ids.to(device), mm_token_type_ids=full_types.to(device), attention_mask=full_mask.to(device),
        **rope_kwargs,
    )  # [3, B, P + S]  # fmt: skip
    cache_kw = _cache_keyword(model)
    full_mask = full_mask.to(device)

    cache = None
    if width_p:
        firsts = [group[0] for group in groups]
        prefix = {
            "input_ids": full_ids[firsts, :width_p].to(device),
            "attention_mask": full_mask[firsts, :width_p],
            "position_ids": position_ids[:, firsts, :width_p],
            "mm_token_type_ids": full_types[firsts, :width_p].to(device),
            **visual_inputs([in_part(r, True) for r in firsts]),
        }
        out = model(**prefix, use_cache=True, return_dict=True)
        cache = out.cache if "cache" in out else out.past_key_values
        cache.batch_select_indices(torch.tensor([group_of[r] for r in range(batch)], device=device))

    own = {
        "input_ids": full_ids[:, width_p:].to(device),
        "attention_mask": full_mask,
        "position_ids": position_ids[:, :, width_p:],
        "mm_token_type_ids": full_types[:, width_p:].to(device),
        **visual_inputs([in_part(r, False) for r in range(batch)]),
    }
    if cache is not None:
        own[cache_kw] = cache
    out = model(**own, use_cache=cache is not None, return_dict=True)
    return out.last_hidden_state, own["input_ids"], full_mask[:, width_p:]
