"""The ``embedrl`` command line: parse arguments, build a stage config, call one library function.

Subcommands are registered explicitly in :func:`build_parser`. Each command imports its stage inside its function:
the stages import torch, transformers and TRL, and importing them all takes about 7 s against 0.1 s for this module
alone (measured side by side on the 2-core machine), so ``embedrl --help`` and a mistyped option answer at once.
This is the one module that imports lazily for that reason; the library imports at module top.

A user's mistake (:class:`~embedrl.config.UserError`: a bad config value, a malformed data file, a wrong path) is
printed on one line as ``embedrl: error: ...`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedrl import __version__
from embedrl.config import (
    AnnotateConfig,
    BackbonePretrainConfig,
    ConvertConfig,
    EmbedderTrainConfig,
    EvalConfig,
    FilterConfig,
    GRPOTrainConfig,
    IndexConfig,
    MMEBEvalConfig,
    ReasonerTrainConfig,
    ServeConfig,
    TinyBackboneConfig,
    UserError,
    UVRBEvalConfig,
    WorldConfig,
    config_fields,
    load_config,
)

logger = logging.getLogger("embedrl")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add ``--config FILE`` and one ``--key value`` option per config field (dotted for nested sections).

    Values are read as YAML (``--seed 3``, ``--teacher.wrong_box 0.1``) and validated by the config class; a
    list-valued key takes comma-separated values (``--tasks a,b``) or a YAML list (``--tasks '[a, b]'``).
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML file with config keys (optional)")
    group = parser.add_argument_group(f"{cls.__name__} keys (override the YAML)")
    for name, help_text, default in config_fields(cls):
        if name in skip:
            continue
        suffix = f" (default: {default!r})" if default not in (None, "") else ""
        group.add_argument(
            f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar="V", help=help_text + suffix
        )
    for name in getattr(cls, "REMOVED_KEYS", {}):  # accepted here, refused with their reason by the config class
        group.add_argument(f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The stage config ``cls`` from ``--config`` and the ``--key value`` overrides (see :func:`load_config`); a
    stage that runs models gets its torch CPU thread count set here, once (:func:`configure_stage_threads`)."""
    overrides = {k.removeprefix("cfg:"): v for k, v in vars(args).items() if k.startswith("cfg:")}
    cfg = load_config(cls, args.config, overrides)
    configure_stage_threads(cfg)
    return cfg


def configure_stage_threads(cfg: Any) -> None:
    """Apply a stage config's ``threads`` on its ``device`` (``annotator``/``judge`` sections for annotate and filter)
    with :func:`embedrl.models.loading.configure_threads`; a stage without models (no ``threads`` key) is left
    alone."""
    section = next((c for c in (cfg, getattr(cfg, "annotator", None), getattr(cfg, "judge", None))
                    if hasattr(c, "threads")), None)  # fmt: skip
    if section is None:
        return
    from embedrl.models.loading import configure_threads

    configure_threads(section.threads, getattr(section, "device", "cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def cmd_backbone_tiny(args: argparse.Namespace) -> int:
    from embedrl.backbones.tiny import build_tiny_backbone

    cfg = config_from_args(TinyBackboneConfig, args)
    out = build_tiny_backbone(cfg)
    print(f"wrote tiny {cfg.family} checkpoint to {out}")
    return 0


def cmd_backbone_pretrain(args: argparse.Namespace) -> int:
    from embedrl.world.pretrain import PERCEPTION_FILE, pretrain_backbone

    cfg = config_from_args(BackbonePretrainConfig, args)
    out = pretrain_backbone(cfg)
    scores = json.loads((out / PERCEPTION_FILE).read_text())["exact_match"]
    print(f"wrote pretrained checkpoint to {out}")
    print("held-out accuracy: " + ", ".join(f"{task} {acc:.2f}" for task, acc in scores.items()))
    return 0


def cmd_world_generate(args: argparse.Namespace) -> int:
    from embedrl.world.generate import generate_world

    cfg = config_from_args(WorldConfig, args)
    out = generate_world(cfg)
    print(f"wrote {cfg.size} world (seed {cfg.seed}) to {out}")
    return 0


def cmd_world_stats(args: argparse.Namespace) -> int:
    from embedrl.world.generate import world_stats

    stats = world_stats(args.dir, contact_sheet=not args.no_contact_sheet)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        from embedrl.world.generate import format_world_stats

        print(format_world_stats(stats))
    return 0


def cmd_train_embedder(args: argparse.Namespace) -> int:
    from embedrl.train.embedder import train_embedder

    cfg = config_from_args(EmbedderTrainConfig, args)
    final = train_embedder(cfg)
    print(f"trained Embedder written to {final}")
    return 0


def cmd_eval_summarize(args: argparse.Namespace) -> int:
    """Aggregate a leaderboard file: MMEB-V2's (78 datasets -> 13 sub-groups, 3 modalities and All), or the
    ``leaderboard.json`` of ``embedrl eval world`` (tasks -> modalities and All)."""
    from embedrl.eval.scores import format_summary, summarize

    summary = summarize(args.scorefile)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary).rstrip("\n"))
    return 0


def cmd_eval_world(args: argparse.Namespace) -> int:
    """Evaluate an Embedder on the synthetic world's suite: score files, summary table, leaderboard JSON."""
    from embedrl.world.evaluate import evaluate_world

    cfg = config_from_args(EvalConfig, args)
    report = evaluate_world(cfg)
    print(report["markdown"].rstrip("\n"))
    files = report["files"]
    print(f"\nwrote {files['summary_md']}, {files['leaderboard']} and {files['scores']}/")
    return 0


def cmd_train_reasoner(args: argparse.Namespace) -> int:
    from embedrl.train.reasoner import train_reasoner

    cfg = config_from_args(ReasonerTrainConfig, args)
    final = train_reasoner(cfg)
    print(f"cold-started Reasoner written to {final}")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    """EG-RL on TRL's GRPOTrainer (one process, or each process of ``accelerate launch``/``torchrun``)."""
    from accelerate import PartialState

    from embedrl.train.grpo_trl import train_rl_trl

    cfg = config_from_args(GRPOTrainConfig, args)
    final = train_rl_trl(cfg)
    if PartialState().is_main_process:
        print(f"EG-RL Reasoner written to {final}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    """Build a FAISS index over a corpus JSONL through the full pipeline (resumes a killed build)."""
    from embedrl.serve.index import build_index

    cfg = config_from_args(IndexConfig, args)
    index = build_index(cfg)
    print(f"indexed {len(index)} items ({cfg.index_type}, mode {cfg.mode}) in {cfg.out}")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    """Embed the items of a corpus JSONL like the indexed ones and append them to the index."""
    from embedrl.serve.index import add_to_index, read_corpus

    index = add_to_index(args.index, read_corpus(args.corpus))
    print(f"{args.index} now holds {len(index)} items")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search an index for one query; print the query's T-CoT, its evidence and the top-k with scores."""
    from embedrl.data.schema import Item
    from embedrl.serve.index import Searcher

    query = Item(id="query", text=args.query, instruction=args.instruction, images=tuple(args.image),
                 frames=tuple(args.frame), tcot=args.tcot)  # fmt: skip
    searcher = Searcher.from_path(args.index, model=args.model, reasoner=args.reasoner)
    (result,) = searcher.search([query], k=args.k)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
        return 0
    print(f"query: {args.query!r} (mode {searcher.index.cfg.mode}, {len(query.images)} image(s), "
          f"{len(query.frames)} frame(s))")  # fmt: skip
    print(f"T-CoT: {result.tcot if result.tcot is not None else '(none: raw mode)'}")
    ev = result.evidence
    print(f"evidence: cue {ev['cue']} {ev['values']}; {ev['evidence_images']} evidence image(s)"
          + (f"; repairs: {'; '.join(ev['problems'])}" if ev["problems"] else ""))  # fmt: skip
    print(f"{'rank':>4}  {'score':>8}  id")
    for hit in result.hits:
        label = (hit.item.text or hit.item.instruction).replace("\n", " ")[:60]
        print(f"{hit.rank:>4}  {hit.score:>8.4f}  {hit.id}  {_media_paths(hit.item.to_record())}{label}")
    return 0


def _media_paths(record: dict[str, Any]) -> str:
    """An item's media as printed by ``search`` (the paths of ``--json``): ``image PATH``, ``images P1, P2`` or
    ``frames FIRST … LAST (N)``, followed by two spaces; empty for a text-only item."""
    images, frames = record["images"], record["frames"]
    parts = []
    if images:
        parts.append(("image " if len(images) == 1 else "images ") + ", ".join(images))
    if frames:
        parts.append(f"frames {frames[0]} … {frames[-1]} ({len(frames)})" if len(frames) > 1 else f"frame {frames[0]}")
    return "".join(part + "  " for part in parts)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve embeddings, chat completions and search over HTTP (OpenAI-compatible)."""
    from embedrl.serve.server import serve

    cfg = config_from_args(ServeConfig, args)
    serve(cfg)
    return 0


def _eval_benchmark(args: argparse.Namespace, cls: type, evaluate: Any) -> int:
    """The body of ``eval mmeb`` and ``eval uvrb``: config, evaluate, print the summary and the files written."""
    report = evaluate(config_from_args(cls, args))
    print(report["markdown"].rstrip("\n"))
    files = report["files"]
    written = [files[k] for k in ("summary_md", "leaderboard") if k in files]
    print(f"\nwrote {', '.join(written)}, {files['scores']}/ and {files['predictions']}/")
    return 0


def cmd_eval_mmeb(args: argparse.Namespace) -> int:
    """Evaluate on MMEB-V2 from the distributed layout: score files, predictions, summary, leaderboard JSON."""
    from embedrl.eval.mmeb import evaluate_mmeb

    return _eval_benchmark(args, MMEBEvalConfig, evaluate_mmeb)


def cmd_eval_import_tcots(args: argparse.Namespace) -> int:
    """Import the paper's published T-CoT files into a T-CoT file for ``eval mmeb --tcot_cache``."""
    from embedrl.eval.published import import_published_tcots

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    report = import_published_tcots(
        args.src, args.data, args.out, tasks=tasks, layout=args.layout, page_labels=args.page_labels,
        num_frames=args.num_frames, on_bad_row=args.on_bad_row,
    )  # fmt: skip
    print(report.markdown().rstrip("\n"))
    print(f"\nwrote {report.out} and {report.out.name}.report.json")
    return 0


def cmd_eval_uvrb(args: argparse.Namespace) -> int:
    """Evaluate on UVRB from the extracted layout: score files, predictions, UVRB-16 and UVRB-6."""
    from embedrl.eval.uvrb import evaluate_uvrb

    return _eval_benchmark(args, UVRBEvalConfig, evaluate_uvrb)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert MMEB-train, LLaVA-Hound, ViDoRe and VisRAG rows into pairs JSONL (one file per dataset)."""
    from embedrl.prep.convert import convert

    cfg = config_from_args(ConvertConfig, args)
    manifest = convert(cfg)
    for name, entry in manifest["datasets"].items():
        print(f"{name}: {entry['pairs']} pairs (of {entry['available']}) -> {entry['file']}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """Annotator T-CoTs for the queries and positives of pairs files (resumable; local model or OpenAI endpoint)."""
    from embedrl.prep.annotate import annotate

    cfg = config_from_args(AnnotateConfig, args)
    summary = annotate(cfg)
    for name, entry in summary["files"].items():
        print(f"{name}: {entry['pairs']} pairs, {entry['requests_sent']} requests sent, {entry['reused']} reused "
              f"-> {entry['out']}")  # fmt: skip
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    """Relevance judge over annotated pairs, then the contrastive set and the RL set."""
    from embedrl.prep.annotate import filter_pairs

    cfg = config_from_args(FilterConfig, args)
    summary = filter_pairs(cfg)
    print(json.dumps(summary["totals"], indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run every available stage of the method on the synthetic world (see :mod:`embedrl.demo`)."""
    from embedrl.demo import run_demo
    from embedrl.models.loading import configure_threads

    configure_threads()  # the demo runs every stage on CPU in this process: $OMP_NUM_THREADS, else 1
    run_demo(args.out, seed=args.seed, quick=args.quick, backbone=args.backbone)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's metrics.jsonl to PNG: one figure per metric group (see :mod:`embedrl.plots`)."""
    from embedrl.plots import plot_run

    written = plot_run(args.run, args.out, smooth=args.smooth)
    folder = next(iter(written.values())).parent
    print(f"wrote {len(written)} figures to {folder}: " + ", ".join(p.name for p in written.values()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An argument parser that takes options only as spelled in full (``--max_step`` is an error, not
    ``--max_steps``). Subparsers inherit the class (``add_subparsers`` defaults ``parser_class`` to it), so every
    subcommand parses the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="embedrl",
        description="Reasoning-driven multimodal embeddings (Embed-RL): build, train, evaluate and serve.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backbone = sub.add_parser("backbone", help="build or inspect backbones")
    backbone_sub = backbone.add_subparsers(dest="backbone_command", required=True, metavar="SUBCOMMAND")
    tiny = backbone_sub.add_parser(
        "tiny", help="write a tiny offline Qwen-VL checkpoint (real architecture, random weights, local tokenizer)"
    )
    add_config_arguments(tiny, TinyBackboneConfig)
    tiny.set_defaults(func=cmd_backbone_tiny)
    pretrain = backbone_sub.add_parser(
        "pretrain",
        help="pre-training of a tiny backbone on questions about world media and T-CoTs of world items (resumable)",
    )
    add_config_arguments(pretrain, BackbonePretrainConfig)
    pretrain.set_defaults(func=cmd_backbone_pretrain)

    world = sub.add_parser("world", help="the synthetic multimodal world (the embedded default data)")
    world_sub = world.add_subparsers(dest="world_command", required=True, metavar="SUBCOMMAND")
    generate = world_sub.add_parser("generate", help="generate training pairs, the RL split and the evaluation suite")
    add_config_arguments(generate, WorldConfig)
    generate.set_defaults(func=cmd_world_generate)
    stats = world_sub.add_parser("stats", help="counts per task and modality, and a contact-sheet PNG")
    stats.add_argument("dir", type=Path, help="a directory written by `embedrl world generate`")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.add_argument("--no-contact-sheet", action="store_true", help="skip writing contact_sheet.png")
    stats.set_defaults(func=cmd_world_stats)

    train_emb = sub.add_parser(
        "train-embedder", help="contrastive training of the Embedder (symmetric InfoNCE, same-dataset sub-batches)"
    )
    add_config_arguments(train_emb, EmbedderTrainConfig)
    train_emb.set_defaults(func=cmd_train_embedder)

    evaluate = sub.add_parser("eval", help="evaluation: score files and summaries")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    summarize = eval_sub.add_parser(
        "summarize", help="sub-group, modality and overall means of a leaderboard file (MMEB-V2 or eval world)"
    )
    summarize.add_argument(
        "scorefile", type=Path, help="a leaderboard JSON: a published MMEB-V2 score file or an `embedrl eval` output"
    )
    summarize.add_argument("--json", action="store_true", help="print the summary as JSON instead of Markdown")
    summarize.set_defaults(func=cmd_eval_summarize)
    world_eval = eval_sub.add_parser(
        "world", help="evaluate an Embedder on the synthetic world's tasks (teacher, oracle, Reasoner or no T-CoTs)"
    )
    add_config_arguments(world_eval, EvalConfig)
    world_eval.set_defaults(func=cmd_eval_world)
    mmeb_eval = eval_sub.add_parser(
        "mmeb", help="evaluate on MMEB-V2 from its distributed layout (--data DIR --model EMBEDDER [--reasoner DIR])"
    )
    add_config_arguments(mmeb_eval, MMEBEvalConfig)
    mmeb_eval.set_defaults(func=cmd_eval_mmeb)
    uvrb_eval = eval_sub.add_parser(
        "uvrb", help="evaluate on UVRB from its extracted layout (--data DIR --model EMBEDDER [--reasoner DIR])"
    )
    add_config_arguments(uvrb_eval, UVRBEvalConfig)
    uvrb_eval.set_defaults(func=cmd_eval_uvrb)
    imp = eval_sub.add_parser(
        "import-tcots",
        help="import the paper's published T-CoT files (Image/, Video/, VisDo/) for eval mmeb --tcot_cache FILE",
    )
    imp.add_argument("--src", type=Path, required=True, help="the release's folder (Image/, Video/, VisDo/)")
    imp.add_argument("--data", type=Path, required=True, help="the MMEB-V2 data root (docs/eval.md §5)")
    imp.add_argument("--out", type=Path, required=True, help="the T-CoT file to write (JSONL; other datasets kept)")
    imp.add_argument("--tasks", default="", help="score keys, comma-separated; '' = every dataset with files in --src")
    imp.add_argument(
        "--layout", default="reference", choices=("embedrl", "reference"),
        help="the item layout of the evaluation that reads the file (item ids depend on it)",
    )  # fmt: skip
    imp.add_argument("--page_labels", default="fixed", choices=("fixed", "old"), help="as for eval mmeb")
    imp.add_argument("--num_frames", type=int, default=8, help="as for eval mmeb")
    imp.add_argument("--on_bad_row", default="stop", choices=("stop", "skip"), help="as for eval mmeb")
    imp.set_defaults(func=cmd_eval_import_tcots)

    convert = sub.add_parser(
        "convert", help="MMEB-train, LLaVA-Hound, ViDoRe and VisRAG rows -> pairs JSONL with caps and weights"
    )
    add_config_arguments(convert, ConvertConfig)
    convert.set_defaults(func=cmd_convert)
    annotate = sub.add_parser("annotate", help="annotator T-CoTs for queries and positives (local model or endpoint)")
    add_config_arguments(annotate, AnnotateConfig)
    annotate.set_defaults(func=cmd_annotate)
    filter_ = sub.add_parser("filter", help="relevance judge, then split kept pairs into contrastive and RL sets")
    add_config_arguments(filter_, FilterConfig)
    filter_.set_defaults(func=cmd_filter)

    train_rsn = sub.add_parser(
        "train-reasoner",
        help="cold-start SFT of a from-scratch Reasoner on teacher T-CoTs and discrimination examples",
    )
    add_config_arguments(train_rsn, ReasonerTrainConfig)
    train_rsn.set_defaults(func=cmd_train_reasoner)

    rl = sub.add_parser(
        "rl", help="EG-RL: GRPO on the Reasoner with the frozen Embedder and Discriminator as reward models"
    )
    add_config_arguments(rl, GRPOTrainConfig)
    rl.set_defaults(func=cmd_rl)

    index = sub.add_parser("index", help="FAISS indexes over a corpus of items (full pipeline, resumable)")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    index_build = index_sub.add_parser("build", help="embed a corpus JSONL (T-CoTs made once, cached) and index it")
    add_config_arguments(index_build, IndexConfig)
    index_build.set_defaults(func=cmd_index_build)
    index_add = index_sub.add_parser("add", help="append the items of a corpus JSONL to an existing index")
    index_add.add_argument("--index", type=Path, required=True, help="an index directory from `embedrl index build`")
    index_add.add_argument("--corpus", type=Path, required=True, help="JSONL of new items (ids not yet indexed)")
    index_add.set_defaults(func=cmd_index_add)

    search = sub.add_parser("search", help="top-k of one query against an index, with the query's T-CoT and evidence")
    search.add_argument("query", help="the query text")
    search.add_argument("--index", type=Path, required=True, help="an index directory from `embedrl index build`")
    search.add_argument("--image", action="append", default=[], help="a query image (repeatable)")
    search.add_argument("--frame", action="append", default=[], help="a query video frame, in order (repeatable)")
    search.add_argument("--instruction", default="", help="the query's task instruction")
    search.add_argument("--tcot", default=None, help="use this T-CoT instead of generating one")
    search.add_argument("-k", "--k", type=int, default=10, help="results to print (default: 10)")
    search.add_argument("--model", default="", help="Embedder dir (default: the one recorded in the index)")
    search.add_argument("--reasoner", default="", help="Reasoner dir (default: the one recorded in the index)")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.set_defaults(func=cmd_search)

    serve = sub.add_parser("serve", help="OpenAI-compatible server: /v1/embeddings, /v1/chat/completions, /search")
    add_config_arguments(serve, ServeConfig)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="the whole method end to end on the synthetic world (what `make demo` runs)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world and the models (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster version")
    demo.add_argument(
        "--backbone",
        type=Path,
        default=None,
        help="start from this tiny backbone instead of the shipped instruct-stage one "
        "(e.g. the output of `embedrl backbone pretrain`, OUT/final)",
    )
    demo.set_defaults(func=cmd_demo)

    plot = sub.add_parser("plot", help="loss, reward and accuracy curves of a run's metrics.jsonl, as PNG files")
    plot.add_argument("run", type=Path, help="a training stage's output folder (holding metrics.jsonl), or the file")
    plot.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: RUN/plots)")
    plot.add_argument(
        "--smooth", type=int, default=None, help="moving-average window (default: a tenth of the steps; 0 = off)"
    )
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embedrl`` console script; returns the exit code so tests can call it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as err:  # a user's mistake: one line, no traceback
        print(f"embedrl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
