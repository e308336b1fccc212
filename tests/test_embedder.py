"""The Embedder (docs/method.md §3.1–3.3): <emb> pooling, the encode path, save/load, LoRA merge, modes and
evidence."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image

from embedrl import prompts
from embedrl.backbones import ADAPTERS, PixelBudget, add_emb_token, load_backbone
from embedrl.backbones.adapters import BUDGET_CONFIG_KEY
from embedrl.data.schema import Item
from embedrl.models import Embedder, pool_last_emb, truncate_text
from embedrl.models.embedder import EMBEDDER_CONFIG_FILENAME

PROMPT_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# Small pixel budget: 1-4 visual tokens per image and per frame, whatever the tiny checkpoint records.
SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)

IMAGE_TCOT = (
    '<thinking>A red square at the top left. {"bbox_2d": [[0, 0, 500, 500], [500, 500, 1000, 1000]]}</thinking>'
    "<rethink>The square is red.</rethink><answer>A red square.</answer>"
)
VIDEO_TCOT = (
    '<thinking>Frame 3 shows the end. {"key_frames": [3, 1]}</thinking>'
    "<rethink>It ends blue.</rethink><answer>A shape turning blue.</answer>"
)
TEXT_TCOT = (
    '<thinking>The caption names kites. {"text_keywords": ["kite", "red"]}</thinking>'
    "<rethink>Two red kites.</rethink><answer>Two red kites in the sky.</answer>"
)


def noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mixed_items() -> list[Item]:
    """Text, image, multi-image and video items of different lengths, with and without T-CoTs."""
    frames = tuple(noise_image(10 + i, 48) for i in range(4))
    return [
        Item(id="t1", text="two red kites", tcot=TEXT_TCOT),
        Item(id="i1", text="a square", images=(noise_image(1),), tcot=IMAGE_TCOT),
        Item(id="t2", instruction="Find an image for the caption:", text="a blue circle " * 8, tcot=TEXT_TCOT),
        Item(id="v1", text="what happens?", frames=frames, tcot=VIDEO_TCOT),
        Item(id="i2", images=(noise_image(2, 96), noise_image(3)), tcot=IMAGE_TCOT),
        Item(id="t3", text=f"an {prompts.EMB_TOKEN} inside the text", tcot=TEXT_TCOT),
    ]


@pytest.fixture
def embedder(tiny_backbone_dir, torch_device, torch_dtype) -> Embedder:
    return Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), device=torch_device, dtype=torch_dtype, budget=SMALL)


def atol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


# ---------------------------------------------------------------------------------------------------------------
# pool_last_emb on hand-built tensors
# ---------------------------------------------------------------------------------------------------------------

EMB, PAD = 7, 0
HIDDEN = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # hidden[b, t] is unique per position


def test_pool_left_padding() -> None:
    ids = torch.tensor([[PAD, PAD, 5, 6, EMB, 2], [4, 5, 6, 3, EMB, 2]])
    mask = (ids != PAD).long()
    pooled, missing = pool_last_emb(HIDDEN, ids, EMB, mask)
    assert torch.equal(pooled, HIDDEN[:, 4]) and missing.tolist() == [False, False]


def test_pool_right_padding() -> None:
    ids = torch.tensor([[5, 6, EMB, 2, PAD, PAD], [4, 5, 6, 3, EMB, 2]])
    pooled, missing = pool_last_emb(HIDDEN, ids, EMB, (ids != PAD).long())
    assert torch.equal(pooled[0], HIDDEN[0, 2]) and torch.equal(pooled[1], HIDDEN[1, 4])
    assert not missing.any()


def test_pool_takes_the_last_emb_when_the_text_has_one_too() -> None:
    ids = torch.tensor([[EMB, 5, EMB, 6, EMB, 2], [PAD, 4, EMB, 3, EMB, 2]])
    pooled, _ = pool_last_emb(HIDDEN, ids, EMB, (ids != PAD).long())
    assert torch.equal(pooled, HIDDEN[:, 4])


def test_pool_falls_back_to_the_last_real_token_and_flags_it() -> None:
    ids = torch.tensor([[5, 6, 3, 2, PAD, PAD], [PAD, 4, 5, 6, EMB, 2]])
    pooled, missing = pool_last_emb(HIDDEN, ids, EMB, (ids != PAD).long())
    assert missing.tolist() == [True, False]
    assert torch.equal(pooled[0], HIDDEN[0, 3]) and torch.equal(pooled[1], HIDDEN[1, 4])
    pooled, missing = pool_last_emb(HIDDEN, ids, EMB)  # no mask: the final position
    assert torch.equal(pooled[0], HIDDEN[0, 5]) and missing.tolist() == [True, False]


def test_pool_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"hidden \[B, T, D\]"):
        pool_last_emb(HIDDEN, torch.zeros(2, 5, dtype=torch.long), EMB)


# ---------------------------------------------------------------------------------------------------------------
# Encode path
# ---------------------------------------------------------------------------------------------------------------


def test_encode_returns_unit_float32_rows_of_the_hidden_size(embedder: Embedder) -> None:
    vectors = embedder.encode(mixed_items(), batch_size=4)
    hidden = embedder.model.config.get_text_config().hidden_size
    assert embedder.dim == hidden
    assert vectors.shape == (6, hidden) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.missing_emb_count == 0
    assert embedder.encode([]).shape == (0, hidden)


def test_encode_keeps_input_order_and_matches_one_by_one(embedder: Embedder, torch_dtype) -> None:
    items = mixed_items()
    batched = embedder.encode(items, batch_size=4)
    perm = list(range(len(items)))
    random.Random(0).shuffle(perm)
    shuffled = embedder.encode([items[i] for i in perm], batch_size=3)
    np.testing.assert_allclose(shuffled, batched[perm], atol=atol(torch_dtype))
    one_by_one = np.stack([embedder.encode([item])[0] for item in items])
    np.testing.assert_allclose(batched, one_by_one, atol=atol(torch_dtype))
    assert len({tuple(np.round(v, 4)) for v in batched}) == len(items)  # distinct items, distinct vectors


def test_base_model_path_equals_full_model_hidden_states(embedder: Embedder, torch_dtype) -> None:
    """embed_batch (no LM head) == the causal LM's last hidden state at the last <emb>, also with <emb> in text."""
    inputs = embedder.collate(mixed_items())
    emb_id = embedder.emb_token_id
    assert int((inputs["input_ids"][5] == emb_id).sum()) == 2  # t3 has <emb> in its text
    with torch.no_grad():
        ours = embedder.embed_batch(inputs)
        full = embedder.model(**inputs, output_hidden_states=True, use_cache=False)
    ids = inputs["input_ids"]
    positions = [int(torch.nonzero(row == emb_id).max()) for row in ids]
    assert all(ids[b, p + 1] == embedder.processor.tokenizer.convert_tokens_to_ids(prompts.IM_END)
               for b, p in enumerate(positions))  # fmt: skip
    expected = torch.stack([full.hidden_states[-1][b, p] for b, p in enumerate(positions)]).float()
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(ours, expected, atol=atol(torch_dtype), rtol=0)


def test_embed_batch_keeps_gradients(embedder: Embedder) -> None:
    embedder.model.train()
    vectors = embedder.embed_batch(embedder.collate(mixed_items()[:3]))
    assert vectors.requires_grad and vectors.dtype == torch.float32
    vectors.sum().backward()
    lm_head = embedder.model.get_output_embeddings().weight
    assert lm_head.grad is None  # the LM head is never run
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embedder.model.model.parameters())


def test_encode_restores_each_training_flag(embedder: Embedder) -> None:
    embedder.model.train()
    embedder.model.model.visual.eval()
    before = {name: m.training for name, m in embedder.model.named_modules()}
    embedder.encode(mixed_items()[:2])
    assert {name: m.training for name, m in embedder.model.named_modules()} == before


def test_missing_emb_falls_back_and_is_counted(embedder: Embedder) -> None:
    inputs = embedder.collate(mixed_items()[:2])
    ids = inputs["input_ids"]
    ids[0][ids[0] == embedder.emb_token_id] = embedder.processor.tokenizer.convert_tokens_to_ids(prompts.IM_END)
    with torch.inference_mode():
        vectors = embedder.embed_batch(inputs)
    assert embedder.missing_emb_count == 1
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2))


def test_raw_text_is_cut_to_max_text_tokens(embedder: Embedder) -> None:
    tok = embedder.processor.tokenizer
    long = "the red kite flies over the green hill " * 100
    assert truncate_text(tok, "short text", 480) == "short text"
    cut = truncate_text(tok, long, 50)
    assert long.startswith(cut) and len(tok(cut, add_special_tokens=False)["input_ids"]) <= 50
    embedder.max_text_tokens = 50
    short = embedder.collate([Item(id="l", text=long)], mode="raw")["input_ids"].shape[1]
    embedder.max_text_tokens = 480
    assert short < embedder.collate([Item(id="l", text=long)], mode="raw")["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------------------------
# Modes and evidence
# ---------------------------------------------------------------------------------------------------------------


def test_raw_and_full_modes_differ_for_an_item_with_a_tcot(embedder: Embedder) -> None:
    item = mixed_items()[0]
    raw, full = embedder.encode([item], mode="raw"), embedder.encode([item], mode="full")
    assert np.abs(raw - full).max() > 1e-3
    np.testing.assert_array_equal(embedder.encode([item]), full)  # the default mode is full
    with pytest.raises(ValueError, match="has no T-CoT"):
        embedder.encode([Item(id="x", text="no tcot")])


def test_full_mode_adds_crop_images(embedder: Embedder) -> None:
    item = Item(id="i", text="a square", images=(noise_image(1, 128),), tcot=IMAGE_TCOT)
    image_pad = embedder.processor.tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    full = embedder.collate([item], mode="full")
    bare = embedder.collate([item], mode="no_evidence")
    assert full["image_grid_thw"].shape[0] == 3 and bare["image_grid_thw"].shape[0] == 1  # image + 2 crops
    assert int((full["input_ids"] == image_pad).sum()) > int((bare["input_ids"] == image_pad).sum())


def test_constructor_checks(tiny_backbone_dir) -> None:
    model, processor = load_backbone(tiny_backbone_dir("qwen3-vl"))
    with pytest.raises(ValueError, match="add_emb_token"):
        Embedder(model, processor)
    with pytest.raises(ValueError, match="mode="):
        Embedder(model, processor, mode="summary")


# ---------------------------------------------------------------------------------------------------------------
# Save / load, LoRA
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(embedder: Embedder, tmp_path, torch_device, torch_dtype) -> None:
    embedder.mode, embedder.max_text_tokens = "no_evidence", 300
    embedder.save(tmp_path / "emb")
    record = json.loads((tmp_path / "emb" / EMBEDDER_CONFIG_FILENAME).read_text())
    assert record["family"] == "qwen3-vl" and record["emb_token_id"] == embedder.emb_token_id
    config = json.loads((tmp_path / "emb" / "config.json").read_text())
    assert config[prompts.EMB_CONFIG_KEY] == [embedder.emb_token_id]
    loaded = Embedder.load(tmp_path / "emb", device=torch_device, dtype=torch_dtype)
    assert (loaded.mode, loaded.video_as, loaded.max_text_tokens, loaded.budget) == (
        "no_evidence",
        "video",
        300,
        SMALL,
    )
    items = mixed_items()
    np.testing.assert_allclose(loaded.encode(items), embedder.encode(items), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="from_backbone"):
        Embedder.load(tmp_path)


def test_lora_model_encodes_and_merged_save_matches(embedder: Embedder, tmp_path, torch_device, torch_dtype) -> None:
    items = mixed_items()
    base = embedder.encode(items)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_embedder = Embedder(get_peft_model(copy.deepcopy(embedder.model), config), embedder.processor, budget=SMALL)
    adapted = peft_embedder.encode(items)
    assert np.abs(adapted - base).max() > 1e-3  # the random adapters change the embeddings
    peft_embedder.save(tmp_path / "merged")
    assert isinstance(peft_embedder.model, PeftModel)  # merging happened on a copy
    merged = Embedder.load(tmp_path / "merged", device=torch_device, dtype=torch_dtype)
    assert not isinstance(merged.model, PeftModel)
    np.testing.assert_allclose(merged.encode(items), adapted, atol=atol(torch_dtype))
    with pytest.raises(ValueError, match="merge=False"):
        peft_embedder.save(tmp_path / "adapter", merge=False)


# ---------------------------------------------------------------------------------------------------------------
# Every family
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_every_family_encodes_text_image_and_video(tiny_backbone_dir, family, torch_device, torch_dtype) -> None:
    embedder = Embedder.from_backbone(tiny_backbone_dir(family), device=torch_device, dtype=torch_dtype, budget=SMALL)
    vectors = embedder.encode(mixed_items(), batch_size=6)
    assert vectors.shape == (6, embedder.dim) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.missing_emb_count == 0


def test_method_budget_and_frames_as_images(tiny_backbone_dir, torch_device, torch_dtype) -> None:
    """docs/method.md's pixel budget (>= 128 visual tokens per image) and video_as="frames" (one image per frame)."""
    path = tiny_backbone_dir("qwen3-vl")
    budget = ADAPTERS["qwen3-vl"].default_budget()
    embedder = Embedder.from_backbone(path, device=torch_device, dtype=torch_dtype, video_as="frames", budget=budget)
    item = mixed_items()[3]  # 4 frames, 2 of them key frames
    inputs = embedder.collate([item])
    assert "pixel_values_videos" not in inputs and inputs["image_grid_thw"].shape[0] == 4 + 2
    image_pad = embedder.processor.tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    assert int((inputs["input_ids"] == image_pad).sum()) >= 6 * 128
    vectors = embedder.encode([item])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_default_budget_is_the_checkpoints(tiny_backbone_dir) -> None:
    """A tiny checkpoint's recorded budget by default; docs/method.md's for a checkpoint that records none."""
    model, processor = load_backbone(tiny_backbone_dir("qwen3-vl"))
    add_emb_token(model, processor)
    recorded = getattr(model.config, BUDGET_CONFIG_KEY)
    assert Embedder(model, processor).budget == PixelBudget(**recorded)
    delattr(model.config, BUDGET_CONFIG_KEY)
    assert Embedder(model, processor).budget == ADAPTERS["qwen3-vl"].default_budget()


# ---------------------------------------------------------------------------------------------------------------
# encode takes what users pass (as_item), encode_query / encode_document, similarity, T-CoTs from a Reasoner
# ---------------------------------------------------------------------------------------------------------------


def test_as_item_reads_every_input_kind(tmp_path) -> None:
    from embedrl.models.embedder import as_item

    img, path, frames = noise_image(1), tmp_path / "kite.png", [noise_image(2), tmp_path / "f.png"]
    assert as_item("kite.png") == Item(id="kite.png", text="kite.png")  # a str is always text
    assert as_item(path, "q").images == (path,) and as_item(img, "q").images == (img,)
    assert as_item(frames, "v").frames == tuple(frames) and as_item(frames, "v").modality == "video"
    item = Item(id="mine", text="x", tcot=TEXT_TCOT)
    assert as_item(item, "ignored") is item
    record = as_item({"text": "t", "image": "a.png", "instruction": "Find:", "tcot": "c", "id": "d1"}, "w")
    assert record == Item(id="d1", text="t", instruction="Find:", images=("a.png",), tcot="c")
    assert as_item({"video": ["f1.png", "f2.png"]}, "w").frames == ("f1.png", "f2.png")
    assert as_item({"images": [img, path]}, "w").images == (img, path)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ({"txt": "a"}, ValueError, r"unknown key\(s\) \['txt'\]"),
        ({"image": "a.png", "images": ["b.png"]}, ValueError, "both 'image' and 'images'"),
        ({"instruction": "Find:"}, ValueError, "no content"),
        ({"video": "clip.mp4"}, TypeError, "a video is a list of frames"),
        ({"text": 3}, TypeError, r"\['text'\] must be a str"),
        ([noise_image(1), "f.png"], TypeError, r"\[1\] is 'f.png'.*a str is text: pass an image file as pathlib.Path"),
        ([], ValueError, "empty list"),
        (3.5, TypeError, "is a float"),
    ],
)
def test_as_item_refuses_with_a_message_that_names_the_input(value, error, match) -> None:
    from embedrl.models.embedder import as_item

    with pytest.raises(error, match=match):
        as_item(value, "inputs[4]")


@pytest.fixture(scope="module")
def user_embedder(embedder_dir) -> Embedder:
    """The saved tiny Embedder (mode full), private to these tests: some attach a Reasoner."""
    return Embedder.load(embedder_dir)


def test_encode_takes_user_inputs_like_the_equivalent_items(user_embedder: Embedder, tmp_path) -> None:
    path = tmp_path / "kite.png"
    noise_image(5, 96).save(path)
    frames = [noise_image(10 + i, 48) for i in range(4)]
    inputs = ["two red kites", noise_image(1), path, frames, {"text": "a square", "image": noise_image(2)}]
    items = [
        Item(text="two red kites"),
        Item(images=(noise_image(1),)),
        Item(images=(path,)),
        Item(frames=tuple(frames)),
        Item(text="a square", images=(noise_image(2),)),
    ]
    vectors = user_embedder.encode(inputs, mode="raw", batch_size=2)
    np.testing.assert_allclose(vectors, user_embedder.encode(items, mode="raw"), atol=1e-5)
    assert vectors.shape == (5, user_embedder.dim) and vectors.dtype == np.float32
    one = user_embedder.encode("two red kites", mode="raw")  # one input: one vector
    assert one.shape == (user_embedder.dim,)
    np.testing.assert_allclose(one, vectors[0], atol=1e-5)
    assert user_embedder.encode(iter(items[:2]), mode="raw").shape == (2, user_embedder.dim)  # any iterable


def test_encode_tensor_and_unnormalised_outputs(user_embedder: Embedder) -> None:
    inputs = [{"text": "two red kites", "tcot": TEXT_TCOT}, {"image": noise_image(1), "tcot": IMAGE_TCOT}]
    unit = user_embedder.encode(inputs)
    raw = user_embedder.encode(inputs, normalize_embeddings=False)
    norms = np.linalg.norm(raw, axis=1)
    assert np.abs(norms - 1).min() > 1e-3  # the pooled hidden states, not unit vectors
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)
    tensor = user_embedder.encode(inputs, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.device == user_embedder.device
    np.testing.assert_allclose(tensor.cpu().numpy(), unit, atol=1e-6)


def test_query_and_document_instructions(user_embedder: Embedder) -> None:
    text = {"text": "two red kites", "tcot": TEXT_TCOT}
    own = {"text": "two red kites", "tcot": TEXT_TCOT, "instruction": "Find the kite photo:"}
    query, document, plain = (f([text, own]) for f in (user_embedder.encode_query, user_embedder.encode_document,
                                                         user_embedder.encode))  # fmt: skip
    np.testing.assert_allclose(query[0], user_embedder.encode(text, instruction=prompts.QUERY_INSTRUCTION), atol=1e-5)
    np.testing.assert_allclose(document[0], user_embedder.encode(text, instruction=prompts.DOCUMENT_INSTRUCTION),
                               atol=1e-5)  # fmt: skip
    assert np.abs(query[0] - document[0]).max() > 1e-3 and np.abs(query[0] - plain[0]).max() > 1e-3
    np.testing.assert_allclose(query[1], plain[1], atol=1e-5)  # an input's own instruction is kept
    np.testing.assert_allclose(document[1], plain[1], atol=1e-5)
    np.testing.assert_allclose(user_embedder.encode_query(text, instruction=""), plain[0], atol=1e-5)


def test_missing_tcot_error_says_how_to_fix(user_embedder: Embedder) -> None:
    with pytest.raises(ValueError, match=r"'inputs\[1\]' \(and 1 more\) has no T-CoT.*no Reasoner is attached"):
        user_embedder.encode_query([{"text": "a", "tcot": TEXT_TCOT}, "b", noise_image(1)])
    with pytest.raises(ValueError, match="mode='raw'"):
        user_embedder.encode("a red kite")
    assert user_embedder.encode("a red kite", mode="raw").shape == (user_embedder.dim,)
    with pytest.raises(TypeError, match="takes an embedrl Reasoner"):
        user_embedder.attach_reasoner(object())  # type: ignore[arg-type]


def test_reasoner_writes_missing_tcots_on_the_right_side(user_embedder: Embedder, tiny_backbone_dir) -> None:
    from embedrl.models.reasoner import Decoding, Reasoner

    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    reasoner.decoding = Decoding(greedy=True, max_new_tokens=12)
    assert user_embedder.attach_reasoner(reasoner) is user_embedder
    try:
        item = Item(id="q", text="a red kite")
        for encode, side, instruction in (
            (user_embedder.encode_query, "query", prompts.QUERY_INSTRUCTION),
            (user_embedder.encode_document, "target", prompts.DOCUMENT_INSTRUCTION),
        ):
            asked = Item(id="q", text="a red kite", instruction=instruction)
            (generation,) = reasoner.generate([asked], side)[0]
            expected = user_embedder.encode(asked.with_tcot(generation.text))
            np.testing.assert_allclose(encode(item), expected, atol=1e-5)
        with pytest.raises(ValueError, match="use encode_query or encode_document"):
            user_embedder.encode(item)
        np.testing.assert_allclose(user_embedder.encode(item, side="query", instruction=prompts.QUERY_INSTRUCTION),
                                   user_embedder.encode_query(item), atol=1e-5)  # fmt: skip
    finally:
        user_embedder.attach_reasoner(None)


def test_similarity_is_the_cosine_matrix_in_the_inputs_kind() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    scores = Embedder.similarity(a, b)
    assert isinstance(scores, np.ndarray) and scores.shape == (3, 4) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    np.testing.assert_allclose(Embedder.similarity(a[0], b), expected[:1], atol=1e-6)  # a vector is one row
    tensor = Embedder.similarity(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)
    with pytest.raises(TypeError, match="two numpy arrays or two torch tensors"):
        Embedder.similarity(a, torch.from_numpy(b))
    with pytest.raises(ValueError, match="vectors of size 8 and 5"):
        Embedder.similarity(a, b[:, :5])
    with pytest.raises(ValueError, match="zero vector"):
        Embedder.similarity(np.zeros(8), b)
