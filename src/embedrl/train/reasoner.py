"""Cold start of a from-scratch Reasoner (docs/method.md §1.2 stage 6): ``train_reasoner(cfg)``.

Supervised fine-tuning on the teacher's T-CoTs of both sides of every training pair, with the same family prompts
the Reasoner is later sampled with, plus listwise-discrimination examples so the same checkpoint can serve as the
Discriminator. The loss covers the assistant's tokens only. Real instruct checkpoints skip this stage (the paper
has none): their prompts alone elicit the format.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrl.config import ReasonerTrainConfig, save_config
from embedrl.data.schema import read_jsonl, read_pairs
from embedrl.models.loading import load_reasoner
from embedrl.models.reasoner import Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.prompts import IM_END, join_task_text, render_discriminator

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class SFTExample:
    """One supervised example: a Reasoner prompt and the assistant text to imitate."""

    prompt: ReasonerPrompt
    answer: str
    kind: str  # "query", "target" or "discrimination"


def tcot_examples(data: str | Path, compact: bool) -> list[SFTExample]:
    """Teacher T-CoTs of both sides of every pair (pairs without a T-CoT on a side skip that side)."""
    examples = []
    for pair in read_pairs(data):
        target_modality = pair.target.modality
        for side, item in (("query", pair.query), ("target", pair.target)):
            if item.tcot:
                prompt = build_reasoner_prompt(item, side, target_modality, compact=compact)
                examples.append(SFTExample(prompt, item.tcot, side))
    return examples


def discrimination_examples(path: str | Path) -> list[SFTExample]:
    """Listwise selection: the prompt lists candidate T-CoTs, the answer is the 1-based number of the right one."""
    return [discrimination_sft(rec) for rec in read_jsonl(path)]


def discrimination_sft(rec: dict[str, Any]) -> SFTExample:
    """One discrimination record (``embedrl.world.teacher.discrimination_example``) as a supervised example."""
    anchor, candidates = rec["anchor"], rec["candidates"]
    inputs = None
    if rec["direction"] == "target_to_query":
        inputs = [join_task_text(c.get("instruction", ""), c.get("text", "")) for c in candidates]
    text = render_discriminator(
        join_task_text(anchor.get("instruction", ""), anchor.get("text", "")),
        anchor["tcot"],
        [c["tcot"] for c in candidates],
        inputs,
    )
    prompt = ReasonerPrompt([{"role": "user", "content": [{"type": "text", "text": text}]}], [], None, 0)
    return SFTExample(prompt, str(rec["label"] + 1), "discrimination")


def sft_batch(reasoner: Reasoner, batch: list[SFTExample], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs with labels on the assistant's tokens (answer + ``<|im_end|>``) only."""
    processor = reasoner.processor
    texts, images = [], []
    for ex in batch:
        messages = [*ex.prompt.messages, {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        images += ex.prompt.images
    kwargs = reasoner.adapter.processor_kwargs(reasoner.budget)
    inputs = processor(
        text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt", **kwargs
    )
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, ex in enumerate(batch):
        # The template closes the assistant turn with "<|im_end|>\n"; supervise the answer and <|im_end|>.
        n_answer = len(processor.tokenizer(ex.answer + IM_END, add_special_tokens=False)["input_ids"])
        end = int(lengths[row]) - 1  # drop the trailing newline
        labels[row, end - n_answer : end] = inputs["input_ids"][row, end - n_answer : end]
    if inputs["input_ids"].shape[1] > max_length:
        raise ValueError(
            f"a cold-start batch is {inputs['input_ids'].shape[1]} tokens long, over max_length={max_length}; "
            "raise max_length or shorten the prompts (compact_prompts: true)"
        )
    inputs["labels"] = labels
    return inputs.to(reasoner.model.device)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> Any:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``max_steps`` (stepped once per step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) * max(0.0, 1 - s / max_steps)
    )


def train_reasoner(cfg: ReasonerTrainConfig) -> Path:
    """Cold-start SFT; writes the Reasoner to ``cfg.out/final`` (with its prompt style in ``embedrl_reasoner.json``)
    and returns that path."""
    out = Path(cfg.out)
    save_config(cfg, out)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    # compact_prompts null = the backbone's (embedrl_reasoner.json); the final checkpoint records the style used.
    reasoner = load_reasoner(cfg.backbone, device=cfg.device, compact_prompts=cfg.compact_prompts)
    examples = tcot_examples(cfg.data, reasoner.compact_prompts)
    if cfg.discrimination_data:
        examples += discrimination_examples(cfg.discrimination_data)
    if not examples:
        raise ValueError(f"no teacher T-CoTs in {cfg.data}: annotate the pairs first")
    counts = {k: sum(e.kind == k for e in examples) for k in ("query", "target", "discrimination")}
    logger.info("cold start on %s examples for %d steps (compact prompts: %s)", counts, cfg.max_steps,
                reasoner.compact_prompts)  # fmt: skip
    model = reasoner.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_linear_decay(optimizer, cfg.warmup_steps, cfg.max_steps)
    order: list[int] = []
    with (out / METRICS_FILE).open("w") as log:
        for step in tqdm(range(1, cfg.max_steps + 1), desc="train-reasoner"):
            if len(order) < cfg.batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            batch = [examples[i] for i in order[: cfg.batch_size]]
            del order[: cfg.batch_size]
            start = time.perf_counter()
            loss = model(**sft_batch(reasoner, batch, cfg.max_length)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step,
                "train/loss": loss.item(),
                "train/lr": schedule.get_last_lr()[0],
                "train/examples_per_s": len(batch) / (time.perf_counter() - start),
            }
            log.write(json.dumps(record) + "\n")
    final = out / "final"
    model.eval()
    reasoner.save(final)
    save_config(cfg, final, filename="train_config.json")
    return final
