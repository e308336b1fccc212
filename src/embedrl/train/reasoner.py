"""Cold start of a from-scratch Reasoner (docs/method.md §1.2 stage 6) on TRL's ``SFTTrainer``: ``train_reasoner``.

Supervised fine-tuning on the teacher's T-CoTs of both sides of every training pair, with the same family prompts
the Reasoner is later sampled with, plus listwise-discrimination examples so the same checkpoint can serve as the
Discriminator. Real instruct checkpoints skip this stage (the paper has none): their prompts alone elicit the format.

How it maps onto ``SFTTrainer`` (docs/rl.md, "Cold start"):

- **Data.** One dataset row per example (:class:`SFTExample`: the item or discrimination record as JSON, the answer),
  so images and frames are read per batch, not all at start-up.
- **Tokens.** :class:`ReasonerSFTCollator` (ours, not TRL's vision collator) builds each prompt with
  :func:`~embedrl.models.reasoner.build_reasoner_prompt`, renders prompt and answer with :meth:`Reasoner.chat_inputs`
  (chat template, the checkpoint's pixel budget), the method that renders the prompt at generation time, and labels
  the answer and its ``<|im_end|>`` only. TRL's collator gives the same input ids for the tiny backbones but
  also supervises the template's newline after ``<|im_end|>``, passes no pixel budget (it relies on the processor's
  saved sizes) and truncates silently; a too-long example stops the run here instead.
- **Loss.** The token mean over every label of an optimiser step (all micro-batches and processes). On CUDA it is
  ``SFTTrainer``'s own (TRL's fused LM head); on the CPU :class:`ColdStartTrainer` computes it from the logits of the
  answer span only, since TRL's head scores every position there.
- **Training.** LoRA (peft, merged into the saved Reasoner) or full fine-tuning, bf16 autocast, gradient accumulation
  (``batch_size`` is global: ``micro_batch_size`` x processes x accumulation), multi-process through accelerate
  (``accelerate launch -m embedrl.cli train-reasoner ...``), checkpoints in ``out/checkpoints`` every
  ``save_every`` steps and ``resume_from_checkpoint``. ``check_run_dir`` refuses to resume a run with another config.
- **Logging.** ``out/metrics.jsonl`` gets one line per step (``step``, ``train/loss``, ``train/lr``,
  ``train/examples_per_s``, plus TRL's ``train/grad_norm``, ``train/mean_token_accuracy``, ``train/entropy``,
  ``train/num_tokens``, ``epoch``); the progress bar shows the loss; ``report_to`` trackers get TRL's scalars
  (tensorboard under ``out/runs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from embedrl.backbones import write_reasoner_settings
from embedrl.config import ConfigError, ReasonerTrainConfig, check_run_dir, save_config, truncate_metrics
from embedrl.data.schema import DataError, Item, Modality, read_jsonl_lines, read_pairs
from embedrl.models.cards import write_model_card
from embedrl.models.loading import load_reasoner
from embedrl.models.reasoner import Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.prompts import IM_END, Side, join_task_text, render_discriminator
from embedrl.train.embedder import lora_target_modules
from embedrl.train.tracking import PROJECT, RUNS_DIR

__all__ = [
    "CHECKPOINT_DIR",
    "FINAL_DIR",
    "METRICS_FILE",
    "ColdStartLog",
    "ColdStartTrainer",
    "ReasonerSFTCollator",
    "SFTExample",
    "build_trainer",
    "discrimination_examples",
    "load_cold_start_model",
    "tcot_examples",
    "train_reasoner",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
# Settings that change memory or logging only, not what the run computes: a resume may change them.
COLD_START_RESUME_FREE_KEYS = ("report_to", "gradient_checkpointing", "threads")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """One supervised example as JSON-ready fields (a dataset row); :meth:`prompt` builds its chat and loads its media.

    Attributes:
        kind: ``query``, ``target`` or ``discrimination``.
        answer: the assistant text to imitate (a T-CoT, or the 1-based number of the right candidate).
        record: JSON of the item (T-CoT examples) or of the discrimination record.
        target_modality: the pair's target modality (routes a text query's family; ignored on the target side).
    """

    kind: str
    answer: str
    record: str
    target_modality: str = ""

    def prompt(self, compact: bool) -> ReasonerPrompt:
        """The Reasoner's user turn for this example: the family prompt the Reasoner is sampled with (media loaded
        now), or the Discriminator's listwise prompt."""
        if self.kind == "discrimination":
            return discrimination_prompt(json.loads(self.record))
        item = Item.from_record(json.loads(self.record))
        side = cast(Side, self.kind)
        return build_reasoner_prompt(item, side, cast(Modality | None, self.target_modality or None), compact=compact)


def tcot_examples(data: str | Path) -> list[SFTExample]:
    """Teacher T-CoTs of both sides of every pair (pairs without a T-CoT on a side skip that side).

    Raises:
        DataError: the file is malformed or a pair names a media file that does not exist.
    """
    examples = []
    for pair in read_pairs(data, check_media=True):
        for side, item in (("query", pair.query), ("target", pair.target)):
            if item.tcot:
                record = json.dumps(item.to_record())
                examples.append(SFTExample(side, item.tcot, record, pair.target.modality))
    return examples


def discrimination_examples(path: str | Path) -> list[SFTExample]:
    """Listwise selection (``embedrl.world.teacher.discrimination_example`` records): the prompt lists candidate
    T-CoTs, the answer is the 1-based number of the right one. Every record's prompt is built once here, so a
    malformed record stops the run before training.

    Raises:
        DataError: the file is missing or malformed, or a record lacks a field (file and line named).
    """
    examples = []
    for lineno, rec in read_jsonl_lines(path):
        try:
            discrimination_prompt(rec)
            examples.append(SFTExample("discrimination", str(int(rec["label"]) + 1), json.dumps(rec)))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"not a discrimination record ({path}, line {lineno}: {err!r}): see the fields of "
                "embedrl.world.teacher.discrimination_example"
            ) from None
    return examples


def discrimination_prompt(rec: dict[str, Any]) -> ReasonerPrompt:
    """The Discriminator's user turn for one discrimination record (text only)."""
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
    return ReasonerPrompt([{"role": "user", "content": [{"type": "text", "text": text}]}], [], None, 0)


# ----------------------------------------------------------------------------------------------------------------
# Collation: the Reasoner's chat tokens, labels on the assistant's tokens only
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReasonerSFTCollator:
    """Dataset rows (:class:`SFTExample` fields) -> left-padded processor tensors with ``labels``.

    Each row is its prompt followed by the assistant turn, rendered by :meth:`Reasoner.chat_inputs`, the method that
    renders the Reasoner's prompts for generation (chat template, pixel budget, left padding), so the prompt tokens
    are those the Reasoner is sampled from. Only the answer and the ``<|im_end|>`` that closes it are labelled; the
    prompt, the template's newline after ``<|im_end|>`` and the padding are ``-100``.

    Raises (on a batch):
        ValueError: a rendered example is longer than ``max_length``, or the answer's tokens in context differ from
            the answer tokenised alone (the label span would be wrong).
    """

    reasoner: Reasoner
    max_length: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [SFTExample(**row) for row in rows]
        chats = []
        for ex in examples:
            prompt = ex.prompt(self.reasoner.compact_prompts)
            answer = {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}
            chats.append(dataclasses.replace(prompt, messages=[*prompt.messages, answer]))
        inputs = self.reasoner.chat_inputs(chats, add_generation_prompt=False)
        ids = inputs["input_ids"]
        if ids.shape[1] > self.max_length:
            raise ValueError(
                f"a cold-start example is {ids.shape[1]} tokens long, over max_length={self.max_length}; raise "
                "max_length or shorten the prompts (compact_prompts: true)"
            )
        labels = torch.full_like(ids, IGNORE_INDEX)
        end = ids.shape[1] - 1  # left-padded: every row closes its turn with "<|im_end|>\n"; leave the newline out
        tokenizer = self.reasoner.processor.tokenizer
        for row, ex in enumerate(examples):
            answer = tokenizer(ex.answer + IM_END, add_special_tokens=False)["input_ids"]
            start = end - len(answer)
            if ids[row, start:end].tolist() != answer:
                raise ValueError(
                    f"the answer of a {ex.kind} example tokenises differently in context than alone, so its label "
                    f"span cannot be found: {ex.answer[:60]!r}"
                )
            labels[row, start:end] = ids[row, start:end]
        inputs["labels"] = labels
        return dict(inputs)


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


class ColdStartLog(TrainerCallback):
    """One ``metrics.jsonl`` line per logged step (main process; TRL's keys under ``train/``), the step's throughput,
    and ``embedrl_reasoner.json`` in every checkpoint (so a full-fine-tuning checkpoint loads as a Reasoner)."""

    def __init__(self, out: Path, batch_size: int, reasoner: Reasoner) -> None:
        self.out, self.batch_size, self.reasoner = out, batch_size, reasoner
        self.last = time.perf_counter()
        self.examples_per_s = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.examples_per_s = self.batch_size / max(now - self.last, 1e-9)  # data, forward, backward and update
        self.last = now

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:  # (not the end-of-training summary)
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch")}
        record["train/loss"] = logs["loss"]
        record["train/lr"] = logs.get("learning_rate")
        record["train/examples_per_s"] = self.examples_per_s
        for key in ("grad_norm", "mean_token_accuracy", "entropy", "num_tokens"):
            if isinstance(logs.get(key), int | float):
                record[f"train/{key}"] = logs[key]
        with (self.out / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logger.debug("step %d: %s", state.global_step, record)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            decoding = dataclasses.asdict(self.reasoner.decoding)
            write_reasoner_settings(path, compact_prompts=self.reasoner.compact_prompts, decoding=decoding)


class LossProgress(ProgressCallback):
    """transformers' progress bar with the step's loss and learning rate on it instead of a printed dict per log, and
    the end-of-training summary as one log line."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # a resumed run's bar starts at its checkpoint's step
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train-reasoner",
                                     dynamic_ncols=True)  # fmt: skip
        self.current_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        elif "train_runtime" in logs:  # the end-of-training summary: one line under the closed bar
            self.training_bar.close()
            self.training_bar = None
            logger.info("cold start: %d steps in %.1f s, mean loss %.4f over this run's steps", state.global_step,
                        logs["train_runtime"], logs.get("train_loss", float("nan")))  # fmt: skip

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class ColdStartTrainer(SFTTrainer):
    """TRL's ``SFTTrainer``, with the training loss on the CPU taken from the logits of the answer span only.

    ``SFTTrainer``'s loss goes through TRL's fused LM head, which scores only the labelled positions on CUDA/XPU
    (Triton) but every position elsewhere, in chunks recomputed in backward: on the CPU that head took about 70 % of a
    tiny-backbone step (docs/experiments.md). The collator left-pads and ends every row with its answer, so a
    batch's labelled positions are its last columns: the model's own ``logits_to_keep`` returns just their logits and
    the loss is the same sum of label log-likelihoods over the step's label-token count (tested against TRL's loss and
    gradients). Other devices, and evaluation, use ``SFTTrainer.compute_loss`` unchanged.
    """

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if return_outputs or not model.training or self.accelerator.device.type != "cpu":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        first = int((labels != IGNORE_INDEX).any(0).nonzero()[0])  # the batch's first labelled column (never 0)
        kept = labels.shape[1] - first + 1  # the logits of columns first-1 .. L-1
        features = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        logits = model(**features, use_cache=False, logits_to_keep=kept).logits[:, :-1].float()
        target = labels[:, first:]  # what columns first-1 .. L-2 predict
        summed = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        mask = target != IGNORE_INDEX
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = summed / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the processes' gradients
        self._record_metrics(logits.detach(), target, mask, inputs["attention_mask"])
        return loss

    def _record_metrics(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """The per-step statistics ``SFTTrainer.compute_loss`` records (entropy, token accuracy, tokens seen)."""
        gather = self.accelerator.gather_for_metrics
        logp = torch.log_softmax(logits[mask], dim=-1)
        valid = gather(mask.sum()).sum()
        entropy = gather(-(logp.exp() * logp).sum()).sum()
        correct = gather((logp.argmax(-1) == target[mask]).sum()).sum()
        metrics = self._metrics["train"]
        metrics["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        self._total_train_tokens += gather(attention_mask.sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def check_cold_start_run_dir(cfg: ReasonerTrainConfig, state: PartialState) -> bool:
    """:func:`~embedrl.config.check_run_dir` of ``cfg.out`` on every process (the main one alone deletes a previous
    run when ``overwrite``); True to resume the run in it."""
    if cfg.overwrite and not state.is_main_process:
        resume = False
    else:
        leftovers = (CHECKPOINT_DIR, METRICS_FILE, FINAL_DIR, RUNS_DIR)
        resume = check_run_dir(cfg, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=leftovers,
                               free_keys=COLD_START_RESUME_FREE_KEYS)  # fmt: skip
    state.wait_for_everyone()  # every process has checked the folder before the main one writes into it
    return resume


def micro_batch_geometry(cfg: ReasonerTrainConfig, processes: int) -> tuple[int, int]:
    """``(per-process micro-batch, accumulation steps)`` giving ``cfg.batch_size`` examples per optimiser step."""
    micro = cfg.micro_batch_size or cfg.batch_size // processes
    if micro < 1 or cfg.batch_size % (micro * processes):
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size x processes = "
            f"{cfg.micro_batch_size or 'batch_size / processes'} x {processes}; change batch_size or micro_batch_size"
        )
    return micro, cfg.batch_size // (micro * processes)


def lora_config(model: torch.nn.Module, cfg: ReasonerTrainConfig) -> LoraConfig:
    """``cfg.lora`` as a peft config, on the layers the Embedder's LoRA would adapt (never the LM head)."""
    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_modules(model, cfg),  # type: ignore[arg-type]  # reads cfg.lora only
        bias="none",
    )


def load_cold_start_model(cfg: ReasonerTrainConfig) -> Reasoner:
    """``cfg.backbone`` as the Reasoner the cold start trains, on the CPU (the Trainer places it): ``cfg.dtype``
    weights (the dtype they train in; ``bf16`` autocasts over them), the ``cfg.attn_implementation`` kernel, and the
    prompt style ``cfg.compact_prompts`` (null = the backbone's ``embedrl_reasoner.json``; the final checkpoint
    records the style used)."""
    return load_reasoner(cfg.backbone, dtype=cfg.dtype, compact_prompts=cfg.compact_prompts,
                         attn_implementation=cfg.attn_implementation)  # fmt: skip


def build_trainer(
    cfg: ReasonerTrainConfig, reasoner: Reasoner, examples: list[SFTExample], micro: int, accumulation: int
) -> ColdStartTrainer:
    """The cold start's trainer: ``reasoner``'s model (LoRA-wrapped by TRL when ``cfg.finetune`` is ``lora``) on
    ``examples``, ``micro`` examples per forward and process, ``accumulation`` micro-batches per optimiser step."""
    out = Path(cfg.out)
    model = reasoner.model
    model.requires_grad_(True)  # load_backbone returns the model in eval mode; full fine-tuning trains every weight
    args = SFTConfig(
        output_dir=str(out / CHECKPOINT_DIR),
        use_cpu=cfg.device == "cpu",
        bf16=cfg.bf16,
        seed=cfg.seed,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=1.0,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name of gradient checkpointing
        max_length=cfg.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # the collator renders and labels each batch
        remove_unused_columns=False,  # the collator reads every column of a row
        dataloader_drop_last=True,  # every step has batch_size examples
        logging_steps=1,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 1,
        save_total_limit=2,
        report_to=cfg.trackers or "none",
        run_name=f"train-reasoner-{out.resolve().name}",  # the trackers' run and project, as embedrl.train.tracking
        project=PROJECT,
        disable_tqdm=False,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer = ColdStartTrainer(
            model=model,
            args=args,
            data_collator=ReasonerSFTCollator(reasoner, cfg.max_length),
            train_dataset=Dataset.from_list([dataclasses.asdict(e) for e in examples]),
            processing_class=reasoner.processor,
            peft_config=lora_config(model, cfg) if cfg.finetune == "lora" else None,
            callbacks=[ColdStartLog(out, cfg.batch_size, reasoner)],
        )
    # Qwen-VL classes declare accepts_loss_kwargs=False, so the Trainer would not count the step's label tokens and
    # would average the micro-batches' (and DDP the processes') own token means. Counted, SFTTrainer's loss divides by
    # the step's token count over all micro-batches and processes: the token mean of the whole batch_size batch, the
    # same loss and gradient for any micro_batch_size and number of processes. (The model never sees the count.)
    trainer.model_accepts_loss_kwargs = True
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress())
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(out / RUNS_DIR)
    return trainer


def train_reasoner(cfg: ReasonerTrainConfig) -> Path:
    """Cold-start SFT with TRL's ``SFTTrainer``; writes the Reasoner to ``cfg.out/final`` (merged weights, processor,
    ``embedrl_reasoner.json`` with the prompt style used, ``train_config.json``) and returns that path.

    A previous run in ``cfg.out`` resumes from its latest checkpoint (same config; ``resume``), or is replaced
    (``overwrite``); anything else there is refused (:func:`~embedrl.config.check_run_dir`).
    """
    out = Path(cfg.out)
    state = PartialState(cpu=cfg.device == "cpu")
    resume = check_cold_start_run_dir(cfg, state)
    micro, accumulation = micro_batch_geometry(cfg, state.num_processes)
    examples = tcot_examples(cfg.data)
    if cfg.discrimination_data:
        examples += discrimination_examples(cfg.discrimination_data)
    if not examples:
        raise DataError(f"no teacher T-CoTs in {cfg.data}: annotate the pairs first")
    if len(examples) < cfg.batch_size:
        raise ConfigError(f"{len(examples)} examples cannot fill one batch of batch_size={cfg.batch_size}; lower it")
    if state.is_main_process:
        save_config(cfg, out)

    reasoner = load_cold_start_model(cfg)
    counts = {k: sum(e.kind == k for e in examples) for k in ("query", "target", "discrimination")}
    if state.is_main_process:
        logger.info(
            "cold start (TRL SFTTrainer, %s fine-tuning) on %s examples for %d steps: %d examples per step = %d x "
            "%d process(es) x %d accumulation; compact prompts: %s", cfg.finetune, counts, cfg.max_steps,
            cfg.batch_size, micro, state.num_processes, accumulation, reasoner.compact_prompts,
        )  # fmt: skip
    trainer = build_trainer(cfg, reasoner, examples, micro, accumulation)

    checkpoints = out / CHECKPOINT_DIR
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    if state.is_main_process:  # the steps after the checkpoint are logged again
        truncate_metrics(out / METRICS_FILE, int(Path(last).name.rsplit("-", 1)[1]) if last else 0)
    final = out / FINAL_DIR
    with _no_save_bars():  # one bar on the console: the training bar
        trainer.train(resume_from_checkpoint=last)
        if state.is_main_process:
            trained = trainer.model.merge_and_unload() if cfg.finetune == "lora" else trainer.model
            trained.eval()
            Reasoner(trained, reasoner.processor, compact_prompts=reasoner.compact_prompts,
                     decoding=reasoner.decoding).save(final)  # fmt: skip
            save_config(cfg, final, filename="train_config.json")
            write_model_card(final, "reasoner", base_model=cfg.backbone, config=cfg)
    state.wait_for_everyone()
    return final


@contextlib.contextmanager
def _no_save_bars() -> Iterator[None]:
    """transformers' own progress bars (``Writing model shards`` at every checkpoint) off for the block."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
