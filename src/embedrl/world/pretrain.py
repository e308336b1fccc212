"""Perception pre-training of a tiny backbone: ``pretrain_backbone(cfg)`` (``embedrl backbone pretrain``).

A freshly built tiny Qwen-VL (``embedrl backbone tiny``) has random weights: it cannot tell a red circle from a blue
square, so every later stage would train a model that ignores its pixels (measured: the demo's Reasoner wrote the
same T-CoT for 50 different images). Real users start from a pretrained MLLM; this stage is the tiny analogue. It
trains the whole model with the language-modelling loss on short questions about freshly sampled world media:

==========  =============================================================  ===========================================
task        input → answer                                                 what it teaches
==========  =============================================================  ===========================================
``crop``    one enlarged object → ``small red striped circle``             attributes of one object (crops, evidence)
``cell``    scene + ``What is at [250, 500, 500, 750]?`` → its phrase      box → the object in it
``find``    scene + ``Where is the large red plain circle?`` → its box     object → its box (the ``bbox_2d`` cue)
``list``    scene → ``four objects: a large red ..., a small blue ...``    the scene description of image T-CoTs
``event``   8 frames → ``in frame 4 the green triangle vanishes; ...``     which frames differ, and how (video T-CoTs)
``page``    page → ``MARKET; stones 40, fish 86, lamps 62, trees 51``      reading headings and tables (documents)
``copy``    ``Repeat: the market page that lists trees 51`` → the text     restating a query's words exactly (keywords)
``tcot``    a world query or target + its family prompt → a teacher T-CoT  the Reasoner's job (an instruct stage)
``judge``   an anchor T-CoT + candidate T-CoTs → the matching number      the Discriminator's job (an instruct stage)
==========  =============================================================  ===========================================

The shipped checkpoints are two runs of this stage: perception (``configs/backbone_pretrain.yaml``, the first
seven tasks, from random weights) and instruct (``configs/backbone_pretrain-instruct.yaml``, mostly ``tcot`` with
``judge`` and perception replay, from the perception checkpoint), the tiny analogues of a pretrained and an
instruct MLLM.

Media are sampled from the world's generators with a seed stream disjoint from any world's (``seed`` here, not the
world seed), at a random difficulty between the training and the RL levels: the model learns to perceive the world,
not its evaluation sets. Each step's examples are a pure function of ``(seed, step)``, so a resumed run sees exactly
the examples the uninterrupted run would have. ``perception.json`` records greedy exact-match accuracy per task on
held-out media (a separate seed stream) next to the checkpoint; a ``tcot`` reply counts as right when its
``<answer>`` equals the teacher's.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from embedrl.backbones.tiny import BACKBONE_CONFIG_FILENAME
from embedrl.config import BackbonePretrainConfig, TeacherNoiseConfig, check_run_dir, save_config, truncate_metrics
from embedrl.data.schema import Item, Modality
from embedrl.models.cards import write_model_card
from embedrl.models.generation import generate_texts
from embedrl.models.loading import load_reasoner
from embedrl.models.reasoner import Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.prompts import IM_END
from embedrl.tcot import parse_tcot
from embedrl.train.reasoner import discrimination_prompt
from embedrl.train.tracking import RUNS_DIR, StageTrackers
from embedrl.world.scenes import (
    NUMBER_WORDS,
    Clip,
    Crop,
    Scene,
    render_clip,
    render_crop,
    render_media,
    render_page,
    render_scene,
)
from embedrl.world.tasks import (
    EVAL_LEVEL,
    RL_LEVEL,
    TRAIN_LEVEL,
    Example,
    Geometry,
    Side,
    frames_phrase,
    make_obj,
    name,
    random_attrs,
    random_event,
    random_page,
    sample_scene,
    sample_video_scene,
    shimmer,
)
from embedrl.world.tasks import TASKS as WORLD_TASKS
from embedrl.world.teacher import discrimination_example, write_tcot

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PERCEPTION_FILE = "perception.json"
STATE_FILE = "trainer_state.pt"
EVAL_SEED_OFFSET = 7_919_000  # held-out media: a seed stream no training step uses
COMPACT_PROMPTS = True  # the tcot task's prompt style, recorded in the checkpoint's embedrl_reasoner.json


@dataclass
class SFTExample:
    """One supervised pre-training example: a Reasoner prompt and the assistant text to imitate."""

    prompt: ReasonerPrompt
    answer: str
    kind: str


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


@dataclass(frozen=True)
class PerceptionExample:
    """Media, a question about them and the exact answer."""

    images: list[Image.Image]
    question: str
    answer: str
    task: str
    prompt: ReasonerPrompt | None = None  # the full user turn where it is not "media + question" (tcot, judge)

    def sft(self) -> SFTExample:
        prompt = self.prompt
        if prompt is None:
            content = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.question}]
            prompt = ReasonerPrompt([{"role": "user", "content": content}], self.images, None, 0)
        return SFTExample(prompt, self.answer, self.task)

    def correct(self, generated: str) -> bool:
        """Whether a generated reply counts as right: the same ``<answer>`` for T-CoTs (the teacher's noise touches
        the cue and the prose, never the answer), exact match otherwise."""
        if self.task == "tcot":
            return parse_tcot(generated).answer.casefold() == parse_tcot(self.answer).answer.casefold()
        return generated.strip() == self.answer


def _image(array: object) -> Image.Image:
    return Image.fromarray(array)  # type: ignore[arg-type]


def _scene(rng: random.Random, geo: Geometry) -> Scene:
    # Between the training level (3-5 objects, half near-copies) and the RL level (5-7, mostly near-copies).
    return sample_scene(rng, geo, rng.randint(2, 7), rng.choice((0.3, 0.6, 0.85)))


def crop_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    obj = make_obj(rng, random_attrs(rng), (0, 0), geo, jitter=False)
    return PerceptionExample([_image(render_crop(Crop.of(obj), geo.cell))], "Name the object.", obj.phrase(), "crop")


def cell_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    scene = _scene(rng, geo)
    obj = rng.choice(scene.objects)
    question = f"What is at {list(obj.box(geo.grid))}?"
    return PerceptionExample([_image(render_scene(scene, geo.cell))], question, obj.phrase(), "cell")


def find_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    scene = _scene(rng, geo)
    obj = rng.choice(scene.objects)
    question = f"Where is the {obj.phrase()}?"
    return PerceptionExample([_image(render_scene(scene, geo.cell))], question, str(list(obj.box(geo.grid))), "find")


def list_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    scene = _scene(rng, geo)
    listing = ", ".join(f"a {o.phrase()}" for o in scene.objects)  # reading order, as the teacher's T-CoTs
    answer = f"{NUMBER_WORDS[len(scene.objects)]} objects: {listing}"
    return PerceptionExample([_image(render_scene(scene, geo.cell))], "List the objects.", answer, "list")


def event_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    scene = sample_video_scene(rng, geo, rng.randint(2, geo.video_grid**2))
    n_events = min(rng.choice((1, 2)), len(scene.objects))
    half = geo.num_frames // n_events
    who = rng.sample(range(len(scene.objects)), n_events)
    events = tuple(random_event(rng, i, k * half, (k + 1) * half) for k, i in enumerate(who))
    clip = Clip(scene, events, shimmer(rng, geo))
    frames = [_image(f) for f in render_clip(clip, geo.cell)]
    told = [f"in {frames_phrase(e.frames)} the {name(scene.objects[e.index])} {e.kind}" for e in clip.ordered_events()]
    return PerceptionExample(frames, "What happens in the video?", "; ".join(told), "event")


def page_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    page = random_page(rng)
    answer = f"{page.topic.upper()}; " + ", ".join(f"{item} {value}" for item, value in page.table)
    return PerceptionExample([_image(render_page(page, geo.page_size))], "Read the page.", answer, "page")


def copy_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    spec = WORLD_TASKS[rng.choice(sorted(WORLD_TASKS))]
    example = spec.make(rng, geo, TRAIN_LEVEL, 2)
    texts = [side.text for side in (example.query, example.positive, *example.negatives) if side.text]
    text = rng.choice(texts) if texts else f"the {make_obj(rng, random_attrs(rng), (0, 0), geo).phrase()}"
    return PerceptionExample([], f"Repeat: {text}", text, "copy")


def _world_example(rng: random.Random, geo: Geometry, k: int) -> tuple[str, Example]:
    """A fresh example of a random world task at a random level (the pre-training seed stream, not a world's)."""
    task = rng.choice(sorted(WORLD_TASKS))
    return task, WORLD_TASKS[task].make(rng, geo, rng.choice((TRAIN_LEVEL, EVAL_LEVEL, RL_LEVEL)), k)


def _modality(side: Side) -> Modality:
    return "text" if side.media is None else "video" if isinstance(side.media, Clip) else "image"


def _side_item(side: Side, geo: Geometry, rng: random.Random) -> Item:
    """The side as an item with rendered media and a teacher T-CoT (the world's default teacher noise)."""
    images: list[Image.Image] = []
    if side.media is not None:
        pixels = render_media(side.media, geo.cell, geo.page_size)
        images = [_image(a) for a in (pixels if isinstance(pixels, list) else [pixels])]
    tcot = write_tcot(side.view, TeacherNoiseConfig(), rng).text
    video = _modality(side) == "video"
    return Item("", side.text, side.instruction, () if video else images, images if video else (), tcot)


def tcot_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    """The cold start's task on fresh world items: a query or a target, the family prompt → the teacher's T-CoT."""
    _, example = _world_example(rng, geo, 1)
    side, chosen = rng.choice((("query", example.query), ("target", example.positive)))
    item = _side_item(chosen, geo, rng)
    prompt = build_reasoner_prompt(item, side, _modality(example.positive), compact=COMPACT_PROMPTS)
    return PerceptionExample(list(prompt.images), "", item.tcot or "", "tcot", prompt)


def _brief(side: Side, rng: random.Random) -> dict[str, Any]:
    tcot = write_tcot(side.view, TeacherNoiseConfig(), rng).text
    return {"id": "", "text": side.text, "instruction": side.instruction, "tcot": tcot}


def judge_task(rng: random.Random, geo: Geometry) -> PerceptionExample:
    """The Discriminator's task (listwise choice among T-CoTs) on fresh world items, in either direction."""
    task, example = _world_example(rng, geo, 3)
    others: list[Example] = []
    if rng.random() < 0.5:
        # target -> query: other queries of the same task, none sharing the anchor's query or target.
        keys = {example.query.key, example.positive.key}
        others = [o for o in (WORLD_TASKS[task].make(rng, geo, TRAIN_LEVEL, 1) for _ in range(3))
                  if not {o.query.key, o.positive.key} & keys]  # fmt: skip
    if others:
        anchor, positive = _brief(example.positive, rng), _brief(example.query, rng)
        negatives = [_brief(o.query, rng) for o in others]
        rec = discrimination_example("", task, "target_to_query", anchor, positive, negatives, rng)
    else:
        anchor, positive = _brief(example.query, rng), _brief(example.positive, rng)
        negatives = [_brief(n, rng) for n in example.negatives]
        rec = discrimination_example("", task, "query_to_target", anchor, positive, negatives, rng)
    return PerceptionExample([], "", str(rec["label"] + 1), "judge", discrimination_prompt(rec))


TASKS: dict[str, Callable[[random.Random, Geometry], PerceptionExample]] = {
    "crop": crop_task,
    "cell": cell_task,
    "find": find_task,
    "list": list_task,
    "event": event_task,
    "page": page_task,
    "copy": copy_task,
    "tcot": tcot_task,
    "judge": judge_task,
}
# Generation budget of the held-out score: T-CoTs are long, every other answer is short.
EVAL_NEW_TOKENS = {"tcot": 256}  # the teacher's scene descriptions run to ~250 tokens


def step_examples(cfg: BackbonePretrainConfig, step: int, geo: Geometry) -> list[PerceptionExample]:
    """The examples of optimiser step ``step`` (1-based): a pure function of ``(cfg.seed, step)``."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    names, weights = zip(*sorted(cfg.task_weights.items()), strict=True)
    return [TASKS[task](rng, geo) for task in rng.choices(names, weights, k=cfg.batch_size)]


def evaluate_perception(
    reasoner: Reasoner, geo: Geometry, tasks: list[str], per_task: int, seed: int
) -> dict[str, float]:
    """Greedy accuracy per task on ``per_task`` held-out examples (:meth:`PerceptionExample.correct`)."""
    scores = {}
    for task in tasks:
        rng = random.Random(EVAL_SEED_OFFSET + seed * 101 + sorted(TASKS).index(task))
        examples = [TASKS[task](rng, geo) for _ in range(per_task)]
        hits = 0
        for start in range(0, per_task, 16):
            chunk = examples[start : start + 16]
            inputs = reasoner.chat_inputs([ex.sft().prompt for ex in chunk])
            texts = generate_texts(reasoner.model, reasoner.processor, inputs, do_sample=False,
                                   max_new_tokens=EVAL_NEW_TOKENS.get(task, 96))  # fmt: skip
            hits += sum(ex.correct(text) for ex, text in zip(chunk, texts, strict=True))
        scores[task] = round(hits / per_task, 4)
    return scores


def _save_state(out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict()}, tmp)  # fmt: skip
    tmp.replace(out / STATE_FILE)


def load_pretrain_model(cfg: BackbonePretrainConfig) -> Reasoner:
    """``cfg.backbone`` as the Reasoner the stage trains: on ``cfg.device``, with ``cfg.dtype`` weights (the dtype
    they train in) and the ``cfg.attn_implementation`` kernel."""
    return load_reasoner(cfg.backbone, dtype=cfg.dtype, device=cfg.device, compact_prompts=COMPACT_PROMPTS,
                         attn_implementation=cfg.attn_implementation)  # fmt: skip


def pretrain_backbone(cfg: BackbonePretrainConfig) -> Path:
    """Train ``cfg.backbone`` on the perception tasks; writes ``cfg.out/final`` (a backbone checkpoint, usable
    wherever a tiny backbone is) with ``perception.json``, and returns that path. Resumes from ``cfg.out`` when a
    ``trainer_state.pt`` of an unfinished run is there (and ``cfg.resume``); refuses a used ``cfg.out`` whose run
    differs unless ``cfg.overwrite`` (:func:`~embedrl.config.check_run_dir`)."""
    out = Path(cfg.out)
    resume = check_run_dir(
        cfg, out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=(STATE_FILE, METRICS_FILE, "final", RUNS_DIR)
    )
    save_config(cfg, out)
    (out / (STATE_FILE + ".tmp")).unlink(missing_ok=True)  # a killed save's leftover
    torch.manual_seed(cfg.seed)
    geo = Geometry()
    reasoner = load_pretrain_model(cfg)
    model = reasoner.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_linear_decay(optimizer, cfg.warmup_steps, cfg.max_steps)
    first = 1
    if resume and (out / STATE_FILE).is_file():
        state = torch.load(out / STATE_FILE, map_location=cfg.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first = state["step"] + 1
        logger.info("resuming perception pre-training at step %d", first)
    metrics = out / METRICS_FILE
    truncate_metrics(metrics, first - 1)  # the steps after the saved state are logged again
    with metrics.open("a") as log, StageTrackers(cfg, out, "backbone-pretrain", first) as trackers:
        bar = tqdm(range(first, cfg.max_steps + 1), desc="backbone pretrain", initial=first - 1, total=cfg.max_steps)
        for step in bar:
            start = time.perf_counter()
            examples = step_examples(cfg, step, geo)
            loss = model(**sft_batch(reasoner, [ex.sft() for ex in examples], cfg.max_length)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            record = {"step": step, "train/loss": loss.item(), "train/lr": schedule.get_last_lr()[0],
                      "train/s": round(time.perf_counter() - start, 3)}  # fmt: skip
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                scores = evaluate_perception(reasoner, geo, sorted(cfg.task_weights), cfg.eval_examples // 2, cfg.seed)
                record.update({f"eval/{task}": acc for task, acc in scores.items()})
                logger.info("step %d perception %s", step, scores)
            log.write(json.dumps(record) + "\n")
            trackers.log(record)
            log.flush()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                _save_state(out, step, model, optimizer, schedule)

    final = out / "final"
    model.eval()
    reasoner.save(final)
    record = Path(cfg.backbone) / BACKBONE_CONFIG_FILENAME  # the tiny backbone's record (family, pixel budget)
    if record.is_file():
        shutil.copy2(record, final / BACKBONE_CONFIG_FILENAME)
    save_config(cfg, final, filename="pretrain_config.json")
    scores = evaluate_perception(reasoner, geo, sorted(cfg.task_weights), cfg.eval_examples, cfg.seed)
    (final / PERCEPTION_FILE).write_text(json.dumps({"exact_match": scores, "examples_per_task": cfg.eval_examples,
                                                     "steps": cfg.max_steps}, indent=2) + "\n")  # fmt: skip
    logger.info("perception after %d steps: %s", cfg.max_steps, scores)
    write_model_card(final, "backbone", base_model=cfg.backbone, config=cfg, results={"perception": scores})
    (out / STATE_FILE).unlink(missing_ok=True)
    return final
