"""Figures on one NVIDIA GPU, offline, in a few minutes: what ``scripts/gpu_check.sh`` prints after its tests.

1. **Embedder training step** on a Qwen3-VL-2B-shaped model with random weights in bfloat16 (the published 2B text and
   vision sizes, 151,936 vocabulary rows; our offline tokenizer, so no hub): steps/s, tokens/s and MFU, with FLOPs
   counted as 6 · parameters · tokens (tokens: the language model's input positions, vision placeholders included)
   against the GPU's dense bf16 peak (``--peak_tflops``; 989 for an H100/H200 SXM).
2. **T-CoT generation** on the same model: tokens/s of HF ``generate`` at batch 16 and 64 (``min_new_tokens`` =
   ``max_new_tokens``, so random weights decode the same length on every row), and of vLLM on the same prompts when
   vLLM is installed (the Reasoner's ``vllm`` backend); the ratio vLLM / HF at batch 64.
3. **GRPO through TRL** with vLLM colocate on a tiny backbone: 3 steps of ``embedrl rl`` when TRL and vLLM are both
   installed (3 steps without vLLM when only TRL is).

Each section prints ``SKIP <why>`` rather than failing when what it needs is missing, and ``FAIL <error>`` when it
breaks; the exit status is 1 if any section failed.

    python scripts/gpu_figures.py                 # all sections
    python scripts/gpu_figures.py --only train    # train | generate | grpo
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig

from embedrl.backbones import ADAPTERS, INSTRUCT_BACKBONE_DIR, PERCEPTION_BACKBONE_DIR, add_emb_token
from embedrl.backbones.tiny import tiny_model_config, tiny_processor
from embedrl.backbones.tokenizer import build_tiny_tokenizer
from embedrl.config import TinyBackboneConfig
from embedrl.data.schema import Item
from embedrl.losses import info_nce
from embedrl.models.embedder import Embedder
from embedrl.models.generation import generate_completions
from embedrl.models.reasoner import Reasoner, build_reasoner_prompt

ROOT = Path(__file__).resolve().parents[1]
QWEN_VOCAB_ROWS = 151_936
IMAGE_PIXELS = 448 * 448  # 14 x 14 = 196 visual tokens per image after the 2 x 2 merge (patch 16)
TCOT = (
    '<thinking>the query asks for the red kite {"bbox_2d": [120, 80, 480, 400]}</thinking>'
    "<rethink>the box covers the kite and little else</rethink><answer>a red kite over a green hill</answer>"
)


def qwen3_vl_shaped(out: Path, shape: str, device: str) -> tuple[torch.nn.Module, object]:
    """A randomly initialised Qwen3-VL model and its (tiny-tokenizer) processor: ``2b`` has Qwen3-VL-2B's text and
    vision sizes and vocabulary rows; ``tiny`` is a few-MB stand-in that lets a CPU test run every section."""
    adapter = ADAPTERS["qwen3-vl"]
    if shape == "2b":
        sizes = {
            "hidden_size": 2048,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "intermediate_size": 6144,
            "vision_depth": 24,
            "vision_hidden_size": 1024,
            "vision_num_heads": 16,
        }
    else:
        sizes = {}  # TinyBackboneConfig's defaults
    pixels = IMAGE_PIXELS if shape == "2b" else 64 * 64
    cfg = TinyBackboneConfig(out=str(out), min_pixels=pixels, max_pixels=pixels, **sizes)
    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    config = tiny_model_config(adapter, cfg, tokenizer)
    if shape == "2b":
        config.text_config.vocab_size = QWEN_VOCAB_ROWS
        config.text_config.head_dim = 128
        config.text_config.rope_parameters["mrope_section"] = [24, 20, 20]
        config.vision_config.intermediate_size = 4096
        config.vision_config.num_position_embeddings = 2304
        config.vision_config.deepstack_visual_indexes = [5, 11, 17]
        config.tie_word_embeddings = True
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = adapter.model_class._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id)  # fmt: skip
    return model, tiny_processor(adapter, cfg, tokenizer)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))  # resized to the model's budget


def _sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def section_train(model: torch.nn.Module, processor: object, args: argparse.Namespace) -> None:
    add_emb_token(model, processor)
    embedder = Embedder(model, processor, mode="full")
    embedder.model.train()
    if hasattr(embedder.model, "gradient_checkpointing_enable") and args.checkpointing:
        embedder.model.gradient_checkpointing_enable()
    queries = [Item(id=f"q{i}", text=f"find the red kite number {i}", images=(_image(i),), tcot=TCOT)
               for i in range(args.train_batch)]  # fmt: skip
    targets = [Item(id=f"t{i}", text=f"a red kite over hill {i}", tcot=TCOT) for i in range(args.train_batch)]
    q_inputs, t_inputs = embedder.collate(queries), embedder.collate(targets)
    tokens = int(q_inputs["attention_mask"].sum() + t_inputs["attention_mask"].sum())
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")

    def step() -> float:
        loss = info_nce(embedder.embed_batch(q_inputs), embedder.embed_batch(t_inputs), gather=False)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    start = _sync_time()
    for _ in range(args.steps):
        step()
    seconds = (_sync_time() - start) / args.steps
    flops = 6 * params * tokens / seconds
    mfu = flops / (args.peak_tflops * 1e12)
    print(f"train: {params / 1e9:.2f} B parameters, {args.train_batch} pairs ({tokens} tokens) per step, "
          f"{1 / seconds:.2f} steps/s, {tokens / seconds:,.0f} tokens/s, {flops / 1e12:.0f} TFLOP/s, "
          f"MFU {mfu:.2f} (target >= 0.35: {'met' if mfu >= 0.35 else 'NOT met'}); peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if args.device == 'cuda' else 0:.1f} GiB")  # fmt: skip
    model.zero_grad(set_to_none=True)


def _prompts(n: int) -> list:
    items = [Item(id=f"g{i}", text=f"which kite is red? scene {i}", images=(_image(100 + i),)) for i in range(n)]
    return [build_reasoner_prompt(item, "query", "text", compact=True) for item in items]


def _hf_tokens_per_s(reasoner: Reasoner, batch: int, new_tokens: int) -> float:
    inputs = reasoner.chat_inputs(_prompts(batch))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    generate_completions(reasoner.model, reasoner.processor, inputs, **(kwargs | {"max_new_tokens": 8,
                         "min_new_tokens": 8}))  # fmt: skip
    start = _sync_time()
    out = generate_completions(reasoner.model, reasoner.processor, inputs, **kwargs)
    seconds = _sync_time() - start
    return sum(out.completion_tokens) / seconds


def section_generate(model: torch.nn.Module, processor: object, args: argparse.Namespace, ckpt: Path) -> None:
    model.eval()
    reasoner = Reasoner(model, processor, compact_prompts=True)
    hf = {}
    for batch in (16, 64):
        hf[batch] = _hf_tokens_per_s(reasoner, batch, args.new_tokens)
        print(f"generate: HF generate, batch {batch}: {hf[batch]:,.0f} tokens/s")
    if importlib.util.find_spec("vllm") is None:
        print("generate: SKIP vLLM (not installed on this machine: pip install 'embedrl[gpu]'); target vLLM >= 10x "
              "HF at batch 64 not measured")  # fmt: skip
        return
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    del reasoner
    from embedrl.models.generation import EngineSettings
    from embedrl.models.reasoner import Decoding

    vllm_reasoner = Reasoner.from_pretrained(ckpt, engine=EngineSettings(backend="vllm"), compact_prompts=True)
    prompts = [Item(id=f"g{i}", text=f"which kite is red? scene {i}", images=(_image(100 + i),)) for i in range(64)]
    decoding = Decoding(greedy=True, max_new_tokens=args.new_tokens)
    vllm_reasoner.generate(prompts[:4], "query", "text", decoding=decoding)  # start-up and warm-up
    start = time.perf_counter()
    out = vllm_reasoner.generate(prompts, "query", "text", decoding=decoding, batch_size=64)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(processor.tokenizer(g.text, add_special_tokens=False)["input_ids"]) for row in out for g in row)
    rate = n_tokens / seconds
    print(f"generate: vLLM, batch 64: {rate:,.0f} tokens/s ({n_tokens} tokens; random weights stop early, so "
          f"this undercounts); vLLM / HF = {rate / hf[64]:.1f}x (target >= 10x: "
          f"{'met' if rate >= 10 * hf[64] else 'NOT met'})")  # fmt: skip


def section_grpo(args: argparse.Namespace, work: Path) -> None:
    if importlib.util.find_spec("trl") is None:
        print("grpo: SKIP (TRL not installed on this machine)")
        return
    use_vllm = importlib.util.find_spec("vllm") is not None and args.device == "cuda"
    embedder_dir = work / "embedder"
    Embedder.from_backbone(PERCEPTION_BACKBONE_DIR).save(embedder_dir)
    env = os.environ | {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli = [sys.executable, "-m", "embedrl.cli"]
    world = work / "world"
    subprocess.run([*cli, "world", "generate", "--out", str(world), "--size", "tiny"], check=True, env=env)
    command = [
        *cli, "rl", "--config", str(ROOT / "configs" / "rl-tiny.yaml"), "--out", str(work / "rl"), "--max_steps", "3",
        "--device", args.device, "--reasoner", str(INSTRUCT_BACKBONE_DIR), "--embedder", str(embedder_dir),
        "--data", str(world / "rl.jsonl"),
    ]  # fmt: skip
    if use_vllm:
        command += ["--use_vllm", "true", "--vllm_mode", "colocate"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    what = "with vLLM colocate" if use_vllm else "without vLLM (not installed)"
    print(f"grpo: 3 TRL GRPO steps {what} in {time.perf_counter() - start:.1f} s")


def run(name: str, fn: Callable[[], None]) -> bool:
    try:
        fn()
        return True
    except Exception as err:  # a section's failure is reported, and the others still run
        traceback.print_exc()
        print(f"{name}: FAIL {type(err).__name__}: {err}")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--only", choices=("train", "generate", "grpo"), default=None)
    parser.add_argument("--train_batch", type=int, default=32, help="pairs per training step")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training step")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only with --shape tiny (the CPU test)")
    parser.add_argument("--shape", choices=("2b", "tiny"), default="2b", help="model shape of train and generate")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, shape {args.shape}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "train", "generate"):
            model, processor = qwen3_vl_shaped(work / "backbone", args.shape, args.device)
            if args.only in (None, "train"):
                ok &= run("train", lambda: section_train(model, processor, args))
            if args.only in (None, "generate"):
                ok &= run("generate", lambda: section_generate(model, processor, args, work / "ckpt"))
            del model
        if args.only in (None, "grpo"):
            ok &= run("grpo", lambda: section_grpo(args, work))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
