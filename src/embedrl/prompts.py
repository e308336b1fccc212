"""Every prompt template, special token and pixel budget of embedrl, in one module.

Nothing else in the package spells a special token, a T-CoT tag or a prompt sentence: it imports it from here.
Golden-string tests (``tests/test_prompts.py``) pin each template.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------------------------------------------

# The Qwen2/2.5/3 special tokens, in the order the released tokenizers number them (151643 onwards). A tiny
# tokenizer built by embedrl lists them first, in this order, so their relative order matches the real vocabulary.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The Embedder's pooling token. It is added by ``embedrl.backbones.add_emb_token`` (never part of a base tokenizer)
# and its id is stored in the model config under ``EMB_CONFIG_KEY``.
EMB_TOKEN = "<emb>"
EMB_CONFIG_KEY = "emb_token_ids"

# T-CoT grammar tags (method.md §2.1). Tiny tokenizers carry them as single added tokens so a tiny Reasoner emits
# each in one step; real Qwen tokenizers split them into ordinary BPE pieces, which changes nothing else.
THINKING_OPEN, THINKING_CLOSE = "<thinking>", "</thinking>"
RETHINK_OPEN, RETHINK_CLOSE = "<rethink>", "</rethink>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TCOT_TAGS: tuple[str, ...] = (THINKING_OPEN, THINKING_CLOSE, RETHINK_OPEN, RETHINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Cue keys of the JSON object inside <thinking> (method.md §2.2).
CUE_KEYWORDS = "text_keywords"
CUE_BOXES = "bbox_2d"
CUE_FRAMES = "key_frames"
CUE_KEYS: tuple[str, ...] = (CUE_KEYWORDS, CUE_BOXES, CUE_FRAMES)

# ----------------------------------------------------------------------------------------------------------------
# Chat template of the tiny backbones (real checkpoints bring their own)
# ----------------------------------------------------------------------------------------------------------------

# Renders ``<|im_start|>{role}\n{content}<|im_end|>\n`` per turn. Content is a string or a list of parts:
# {"type": "text", "text": ...}, {"type": "image"} -> vision-start, image-pad, vision-end; {"type": "video"} likewise.
# No default system turn is inserted. ``add_generation_prompt`` opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ----------------------------------------------------------------------------------------------------------------
# Pixel budgets (method.md §3.2). Real Qwen3-VL budgets, in pixels; tiny backbones use their own processor sizes.
# ----------------------------------------------------------------------------------------------------------------

IMAGE_MIN_PIXELS = 128 * 32 * 32
IMAGE_MAX_PIXELS = 768 * 32 * 32
FRAME_MIN_PIXELS = 128 * 32 * 32
FRAME_MAX_PIXELS = 300 * 32 * 32
VIDEO_NUM_FRAMES = 8

# Evidence crop limits (method.md §2.4).
MIN_CROP_SIDE_PX = 10
MAX_CROP_ASPECT = 50.0
MAX_CROPS = 8
