"""The generation engine (embedrl.models.generation): the decoding loop that drops finished rows, bucketed batches,
the vLLM request builder, engine settings and CPU threads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from embedrl.backbones import PixelBudget, instruct_backbone, load_processor
from embedrl.cli import main
from embedrl.config import ConfigError, EvalConfig, ServeConfig
from embedrl.data.schema import Item
from embedrl.eval.cache import TCoTCache
from embedrl.eval.evaluator import TaskStats
from embedrl.eval.pipeline import EmbedPipeline, reasoner_fingerprint
from embedrl.models.chat import ChatModel, ChatParams, Conversation
from embedrl.models.generation import (
    DecodeStats,
    EngineSettings,
    HFGenerator,
    VLLMUnavailableError,
    bucket_order,
    decode_dropping_finished,
    generate_completions,
    vllm_request,
    vllm_sampling,
)
from embedrl.models.loading import DEFAULT_CPU_THREADS, configure_threads
from embedrl.models.reasoner import Decoding, Reasoner, ReasonerPrompt, build_reasoner_prompt

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="module")
def reasoners(tiny_backbone_dir) -> dict[str, Reasoner]:
    return {f: Reasoner.from_pretrained(tiny_backbone_dir(f), compact_prompts=True) for f in FAMILIES}


@pytest.fixture(scope="module")
def instruct() -> Reasoner:
    """The shipped instruct-stage tiny Qwen3-VL: it writes real T-CoTs that end with an end token."""
    return Reasoner.from_pretrained(instruct_backbone())


def _image(size: tuple[int, int], shade: int = 0) -> Image.Image:
    return Image.new("RGB", size, (40 + shade, 120, 200 - shade))


def _chat(text: str, sizes: tuple[tuple[int, int], ...] = ()) -> ReasonerPrompt:
    images = [_image(size, 30 * k) for k, size in enumerate(sizes)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return ReasonerPrompt([{"role": "user", "content": content}], images, None, 0)


CHATS = (
    _chat("describe the red square", ((64, 48),)),
    _chat("a short question"),
    _chat("two pictures, compare them", ((96, 64), (40, 80))),
    _chat("hi"),
)


def _generate(reasoner: Reasoner, inputs, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return reasoner.model.generate(**inputs, max_new_tokens=24, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_finished_rows_gives_generates_tokens(reasoners: dict[str, Reasoner], family: str) -> None:
    reasoner = reasoners[family]
    inputs = reasoner.chat_inputs(CHATS)  # image and text prompts, left-padded
    vocab = reasoner.model.config.get_text_config().vocab_size
    eos = list(range(3, vocab, 5))  # many stop ids: the random tiny model's rows end at different steps
    greedy = {"do_sample": False, "eos_token_id": eos}
    stats = DecodeStats()
    expected = _generate(reasoner, inputs, **greedy)  # HF's own loop
    got = _generate(reasoner, inputs, custom_generate=decode_dropping_finished, decode_stats=stats, **greedy)
    assert torch.equal(got, expected)
    assert stats.stopped_early >= 2 and stats.row_steps < stats.batch_row_steps  # rows were really dropped
    assert stats.rows == 4 and stats.prompt_tokens == int(inputs["attention_mask"].sum())

    sampled = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.1,
               "num_return_sequences": 2, "eos_token_id": eos}  # fmt: skip
    torch.manual_seed(7)
    expected = _generate(reasoner, inputs, **sampled)
    after_hf = torch.rand(1)  # the RNG state generate left behind
    torch.manual_seed(7)
    got = _generate(reasoner, inputs, custom_generate=decode_dropping_finished, **sampled)
    assert torch.equal(got, expected) and torch.equal(torch.rand(1), after_hf)


def test_completions_are_the_same_with_and_without_dropping(instruct: Reasoner) -> None:
    items = [Item(f"q{i}", text, "Find the matching picture.") for i, text in
             enumerate(["a red circle", "two blue squares above a green triangle", "a kite"])]  # fmt: skip
    inputs = instruct.chat_inputs([build_reasoner_prompt(it, "query", "image", compact=True) for it in items])
    stats = DecodeStats()
    kwargs = {"do_sample": False, "max_new_tokens": 120}
    kept = generate_completions(instruct.model, instruct.processor, inputs, drop_finished=False, **kwargs)
    dropped = generate_completions(instruct.model, instruct.processor, inputs, stats=stats, **kwargs)
    assert dropped.tokens == kept.tokens and dropped.texts == kept.texts
    assert not any(dropped.truncated) and stats.new_tokens == sum(map(len, dropped.tokens))
    assert len({len(t) for t in dropped.tokens}) > 1 and stats.saved_share > 0  # rows of several lengths


def test_a_processor_that_may_couple_rows_is_refused(reasoners: dict[str, Reasoner]) -> None:
    reasoner = reasoners["qwen3-vl"]
    inputs = reasoner.chat_inputs(CHATS[:2])
    with pytest.raises(ValueError, match=r"PrefixConstrainedLogitsProcessor.*drop_finished=False"):
        _generate(reasoner, inputs, custom_generate=decode_dropping_finished,
                  prefix_allowed_tokens_fn=lambda batch_id, ids: [1, 2])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Lengths and buckets
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_length_is_the_processors_token_count(reasoners: dict[str, Reasoner], family: str) -> None:
    reasoner = reasoners[family]
    chats = [*CHATS, _chat("big and thin images", ((300, 200), (20, 500), (640, 480)))]
    generator = reasoner.hf_generator()
    expected = [reasoner.chat_inputs([c])["input_ids"].shape[1] for c in chats]
    assert generator.lengths(chats) == expected
    assert len(set(expected)) == len(expected)


def test_bucket_order_groups_then_sorts_by_length() -> None:
    groups = ["text", "image", "text", "image", "text"]
    lengths = [30, 90, 10, 80, 30]
    assert bucket_order(groups, lengths) == [3, 1, 2, 0, 4]  # image (80, 90), then text (10, 30, 30 by index)


def test_reasoner_batches_are_sorted_and_results_come_back_in_input_order(instruct: Reasoner) -> None:
    items = [
        Item("t1", "a very long description of a scene with many shapes of many colours and sizes", "Find it."),
        Item("i1", images=(_image((64, 64)),), instruction="Describe the image."),
        Item("t2", "a kite", "Find it."),
        Item("i2", images=(_image((64, 64), 60), _image((32, 32))), instruction="Compare the images."),
        Item("t3", "three red dots", "Find it."),
    ]
    decoding = Decoding(max_new_tokens=24, greedy=True)
    batches = list(instruct.generate_batches(items, "query", "image", decoding=decoding, batch_size=2))
    order = [i for batch, _ in batches for i in batch]
    lengths = instruct.prompt_lengths(items, "query", "image")
    assert order == bucket_order([it.modality for it in items], lengths) == [1, 3, 2, 4, 0]
    together = instruct.generate(items, "query", "image", decoding=decoding, batch_size=2)
    alone = [instruct.generate([it], "query", "image", decoding=decoding)[0] for it in items]
    assert [g[0].text for g in together] == [g[0].text for g in alone]  # input order; batching changes nothing
    assert {g[0].family for g in together} == {"image_based", "text_to_image_retrieval"}


def test_pipeline_generates_a_task_in_sorted_batches_with_one_cache_append_each(
    instruct: Reasoner, tmp_path: Path
) -> None:
    items = [Item(f"x{i}", "word " * (7 - i), "Find it.") for i in range(5)]  # longest prompt first
    decoding = Decoding(max_new_tokens=12, greedy=True)
    pipeline = EmbedPipeline(object(), instruct, decoding=decoding, reasoner_id="r", reasoner_batch_size=2)  # type: ignore[arg-type]
    cache, appends = TCoTCache(tmp_path / "tcots.jsonl"), []
    add = cache.add
    cache.add = lambda entries: (appends.append([key.item_id for key, _, _ in entries]), add(entries))  # type: ignore[method-assign]
    stats = TaskStats("local", 5, 0)
    texts = pipeline.generate(items, "query", "image", cache=cache, stats=stats)
    assert appends == [["x4", "x3"], ["x2", "x1"], ["x0"]]  # shortest prompts first, one append per batch
    expected = instruct.generate(items, "query", "image", decoding=decoding)
    assert texts == [g[0].text for g in expected]  # back in input order
    again = TaskStats("local", 5, 0)
    assert pipeline.generate(items, "query", "image", cache=TCoTCache(tmp_path / "tcots.jsonl"), stats=again) == texts
    assert (stats.tcots_generated, again.tcots_generated, again.tcots_cached) == (5, 0, 5)  # a rerun resumes


def test_chat_model_sorts_long_micro_batches_and_keeps_request_order(instruct: Reasoner) -> None:
    chat = ChatModel.from_reasoner(instruct)
    chat.generator = HFGenerator(instruct.model, instruct.processor, chat.processor_kwargs,
                                 EngineSettings(batch_size=2))  # fmt: skip
    texts = ["Say one word.", "Write a long, detailed sentence about a red square next to a blue circle.", "Hi."]
    convs = [Conversation([{"role": "user", "content": [{"type": "text", "text": t}]}]) for t in texts]
    params = ChatParams(max_tokens=12, temperature=0.0)
    batched = chat.generate(convs, params)
    alone = [chat.generate([c], params)[0] for c in convs]
    assert [o[0].text for o in batched] == [o[0].text for o in alone]
    assert [o[0].prompt_tokens for o in batched] == [o[0].prompt_tokens for o in alone]
    assert batched[1][0].prompt_tokens > batched[0][0].prompt_tokens


# ----------------------------------------------------------------------------------------------------------------
# vLLM: requests as pure data; the backend without vLLM installed
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_request_gives_the_hf_paths_token_ids(reasoners: dict[str, Reasoner], family: str) -> None:
    tiny = reasoners[family]
    token = tiny.adapter.factor**2  # pixels of one visual token
    budget = PixelBudget(4 * token, 12 * token, 4 * token, 12 * token)  # not the checkpoint's processor defaults
    reasoner = Reasoner(tiny.model, tiny.processor, compact_prompts=True, budget=budget)
    item = Item("q", "the tall one", "Find the object.", images=(_image((400, 300)), _image((30, 200))))
    prompt = build_reasoner_prompt(item, "query", "image", compact=True)
    image_size = reasoner.processor_kwargs["images_kwargs"]["size"]
    request = vllm_request(reasoner.processor, prompt, image_size)
    assert set(request) == {"prompt", "multi_modal_data", "mm_processor_kwargs"}
    # What vLLM runs: its tokenizer on the prompt, the checkpoint's HF processor on the images with the kwargs.
    images = request["multi_modal_data"]["image"]
    vllm_ids = reasoner.processor(
        text=[request["prompt"]], images=images, return_tensors="pt", **request["mm_processor_kwargs"]
    )["input_ids"]
    assert torch.equal(vllm_ids, reasoner.chat_inputs([prompt])["input_ids"])
    unbudgeted = reasoner.processor(text=[request["prompt"]], images=images, return_tensors="pt")["input_ids"]
    assert unbudgeted.shape[1] > vllm_ids.shape[1]  # without the kwargs vLLM would see the processor's defaults
    assert "mm_processor_kwargs" not in vllm_request(reasoner.processor, CHATS[1], image_size)  # text only


def test_vllm_sampling_mirrors_the_hf_decoding() -> None:
    greedy = vllm_sampling(greedy=True, temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3, n=1, eos_ids=[5, 6])
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["repetition_penalty"]) == (
        0.0,
        1.0,
        -1,
        1.0,
    )
    assert greedy["max_tokens"] == 64 and greedy["stop_token_ids"] == [5, 6] and greedy["seed"] == 3

    class Config:
        repetition_penalty = 1.05

    sampled = vllm_sampling(greedy=False, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=None, n=4, eos_ids=[5],
                            generation_config=Config())  # fmt: skip
    assert (sampled["temperature"], sampled["top_p"], sampled["n"], sampled["repetition_penalty"]) == (
        0.7,
        0.9,
        4,
        1.05,
    )


def test_vllm_reasoner_holds_no_hf_model_and_says_how_to_get_vllm(
    tiny_backbone_dir, reasoners, embedder_dir, tmp_path: Path, capsys
) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the error path is not reachable")
    path = tiny_backbone_dir("qwen2.5-vl")
    vllm = EngineSettings(backend="vllm")
    with pytest.raises(ImportError, match=r"pip install 'embedrl\[gpu\]'"):  # at load time, before any work
        Reasoner.from_pretrained(path, engine=vllm)
    config, processor = load_processor(path)  # what from_pretrained reads with vLLM installed: no weights
    reasoner = Reasoner(None, processor, engine=vllm, config=config, checkpoint=path, compact_prompts=True)
    assert reasoner.model is None and reasoner.backend == "vllm"
    assert reasoner.budget == reasoners["qwen2.5-vl"].budget  # the same pixel budget as the HF path
    with pytest.raises(VLLMUnavailableError, match="not installed"):
        reasoner.generate([Item("q", "a kite", "Find it.")], "query")
    with pytest.raises(ValueError, match="holds no HF model"):
        reasoner.chat_inputs(CHATS[:1])
    assert reasoner_fingerprint(reasoner).startswith(path.name + "@")  # the checkpoint's files, hashed
    (tmp_path / "corpus.jsonl").write_text('{"id": "a", "text": "a red kite"}\n')
    argv = ["index", "build", "--model", str(embedder_dir), "--corpus", str(tmp_path / "corpus.jsonl"), "--out",
            str(tmp_path / "index"), "--reasoner", str(path), "--backend", "vllm"]  # fmt: skip
    assert main(argv) == 2
    assert "embedrl: error: backend vllm needs vLLM" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Settings: engine, compile, threads
# ----------------------------------------------------------------------------------------------------------------


def test_compile_is_refused_off_cuda(reasoners: dict[str, Reasoner]) -> None:
    reasoner = reasoners["qwen3-vl"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        HFGenerator(reasoner.model, reasoner.processor, reasoner.processor_kwargs, EngineSettings(compile=True))
    with pytest.raises(ConfigError, match=r"compile=true .* needs a CUDA device"):
        EvalConfig(world="w", embedder="e", out="o", compile=True)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        ServeConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="backend"):
        EngineSettings(backend="tgi")  # type: ignore[arg-type]


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads() == DEFAULT_CPU_THREADS == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_threads() == 2 == torch.get_num_threads()
        assert configure_threads(1) == 1 == torch.get_num_threads()  # the config's value wins
        assert configure_threads(3, "cuda:0") is None and torch.get_num_threads() == 1  # not a CPU run
        monkeypatch.setenv("OMP_NUM_THREADS", "two")
        with pytest.raises(ConfigError, match="OMP_NUM_THREADS='two'"):
            configure_threads()
        with pytest.raises(ConfigError, match="threads=-1"):
            configure_threads(-1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
def test_static_cache_compile_matches_the_dropping_loop_on_cuda(tiny_backbone_dir) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), device="cuda", compact_prompts=True)
    kwargs = {"do_sample": False, "max_new_tokens": 16}
    compiled = HFGenerator(reasoner.model, reasoner.processor, reasoner.processor_kwargs,
                           EngineSettings(compile=True)).generate(CHATS, kwargs)  # fmt: skip
    dropping = reasoner.hf_generator().generate(CHATS, kwargs)
    assert compiled.tokens == dropping.tokens
