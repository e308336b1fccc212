"""The contrastive loss of the Embedder: symmetric InfoNCE, plain and cached (GradCache), one implementation each.

Training, evaluation and tests all import these functions; nothing else in embedrl computes a contrastive loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x`` [n_local, D] from every process, keeping gradients. Returns ([n_local * world, D], rank).

    Without an initialised process group this is the identity with rank 0. Every process must pass the same
    ``n_local``; the gathered rows are ordered by rank.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x, 0
    # Imported here: torch builds without distributed support lack the module (and never reach this line).
    import torch.distributed.nn.functional as dist_fn

    gathered = dist_fn.all_gather(x)  # world x [n_local, D], differentiable
    return torch.cat(gathered, dim=0), torch.distributed.get_rank()


def info_nce(q: Tensor, t: Tensor, temperature: float = 0.02, gather: bool = True) -> dict[str, Tensor]:
    """Symmetric InfoNCE (the CLIP loss), also known as in-batch-negatives contrastive loss.

    ``S = Q Tᵀ / τ`` (logit scale ``1 / τ``, fixed), ``L = ½ [CE(S, y) + CE(Sᵀ, y)]`` with ``y`` the diagonal.
    Across processes each rank scores its local rows against all gathered columns (labels offset by
    ``rank * n_local``), so averaging the per-rank losses gives the global-batch loss (docs/method.md §3.4).

    Args:
        q: query embeddings [n_local, D], unit-norm.
        t: target embeddings [n_local, D], unit-norm; row i is the positive of q[i].
        temperature: τ; 0.02 by default (logit scale 50).
        gather: gather in-batch negatives across processes (with gradients) when a process group is up.

    Returns:
        ``loss`` (scalar), ``loss_q2t``, ``loss_t2q`` and ``accuracy`` (in-batch top-1, both directions), the last
        three detached.

    Example:
        >>> q = torch.eye(3); out = info_nce(q, q, temperature=1.0)
        >>> round(out["accuracy"].item(), 2)
        1.0
    """
    if q.shape != t.shape or q.dim() != 2:
        raise ValueError(f"q and t must both be [n, D]; got {tuple(q.shape)} and {tuple(t.shape)}")
    n_local = q.shape[0]
    all_q, rank = gather_with_grad(q) if gather else (q, 0)  # [N, D]
    all_t, _ = gather_with_grad(t) if gather else (t, 0)  # [N, D]
    labels = torch.arange(n_local, device=q.device) + rank * n_local  # [n_local]
    logits_q2t = q @ all_t.T / temperature  # [n_local, N]
    logits_t2q = t @ all_q.T / temperature  # [n_local, N]
    loss_q2t = F.cross_entropy(logits_q2t, labels)
    loss_t2q = F.cross_entropy(logits_t2q, labels)
    accuracy = ((logits_q2t.argmax(1) == labels).float().mean() + (logits_t2q.argmax(1) == labels).float().mean()) / 2
    return {
        "loss": (loss_q2t + loss_t2q) / 2,
        "loss_q2t": loss_q2t.detach(),
        "loss_t2q": loss_t2q.detach(),
        "accuracy": accuracy.detach(),
    }


class _RngReplay:
    """Captures the CPU (and CUDA) RNG state so a second forward pass draws the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


def cached_info_nce(
    encode: Callable[[Any], Tensor],
    query_chunks: Sequence[Any],
    target_chunks: Sequence[Any],
    temperature: float = 0.02,
    gather: bool = True,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> dict[str, Tensor]:
    """GradCache version of :func:`info_nce`: same loss, same gradients, memory of one chunk's activations.

    1. Embed every chunk without a graph, remembering each chunk's RNG state.
    2. Compute the loss on the detached embeddings and backpropagate to them only.
    3. Re-run each chunk with a graph (same RNG state, so dropout matches) and backpropagate
       ``<embedding, cached gradient>``, which accumulates exactly the plain loss's parameter gradients.

    **Calls backward itself**: after it returns, the parameters' ``.grad`` hold the gradients; do not call
    ``loss.backward()`` again. Returns the same dict as :func:`info_nce`, all detached.

    Args:
        encode: maps one chunk of model inputs to unit-norm embeddings [chunk, D] (with gradients when enabled).
        query_chunks, target_chunks: the local batch split into chunks, row order preserved.
        backward: runs step 3's backward of each chunk's surrogate ``<embedding, cached gradient>`` (a training
            loop passes ``accelerator.backward``, which scales for gradient accumulation and mixed precision).
    """
    states: dict[str, list[_RngReplay]] = {"q": [], "t": []}
    sizes: dict[str, list[int]] = {"q": [], "t": []}
    reps: dict[str, Tensor] = {}
    for side, chunks in (("q", query_chunks), ("t", target_chunks)):
        outs = []
        for chunk in chunks:
            states[side].append(_RngReplay())
            with torch.no_grad():
                outs.append(encode(chunk))  # [chunk, D]
            sizes[side].append(outs[-1].shape[0])
        reps[side] = torch.cat(outs).detach().requires_grad_(True)  # [n_local, D]
    out = info_nce(reps["q"], reps["t"], temperature=temperature, gather=gather)
    out["loss"].backward()
    for side, chunks in (("q", query_chunks), ("t", target_chunks)):
        grads = reps[side].grad.split(sizes[side])
        for chunk, state, grad in zip(chunks, states[side], grads, strict=True):
            with state:
                emb = encode(chunk)  # [chunk, D], with graph
            backward(torch.sum(emb * grad))
    return {k: v.detach() for k, v in out.items()}
