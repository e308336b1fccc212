"""The tiny backbones' tokenizer: a byte-level BPE trained locally and deterministically on embedrl's own corpus.

Layout of the vocabulary: the Qwen special tokens first, in Qwen's order (``prompts.QWEN_SPECIAL_TOKENS``, ids 0-25;
the BPE trainer puts them first), then the 256 byte tokens and the learned merges, then the T-CoT tags
(``prompts.TCOT_TAGS``) as added tokens that decoding keeps. ``<emb>`` is not part of it:
:func:`embedrl.backbones.add_emb_token` adds it to a loaded model. Ids differ from the real Qwen vocabulary, so every
id a model config needs is read back from the tokenizer, never assumed (docs/backbones.md, tiny backbones).

Example:
    >>> tok = build_tiny_tokenizer()
    >>> len(tok), tok.convert_ids_to_tokens(0), tok.padding_side
    (4096, '<|endoftext|>', 'left')
"""

from __future__ import annotations

from importlib import resources

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from embedrl import prompts

__all__ = ["CORPUS_RESOURCE", "build_tiny_tokenizer", "read_corpus"]

# English text written for embedrl (shapes, colours, positions, counts, frames, documents and generic prose).
CORPUS_RESOURCE = "tokenizer_corpus.txt"


def read_corpus() -> list[str]:
    """The training corpus as a list of paragraphs (blank-line separated), in file order."""
    text = resources.files("embedrl").joinpath("resources", CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


def build_tiny_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer; the same ``vocab_size`` gives the same files, byte for byte.

    Args:
        vocab_size: total number of tokens, special tokens and T-CoT tags included (``len(tokenizer)``).

    Returns:
        A ``PreTrainedTokenizerFast`` with eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding and embedrl's
        chat template (``prompts.CHAT_TEMPLATE``). It saves and reloads with ``AutoTokenizer``.

    Raises:
        ValueError: if ``vocab_size`` leaves no room for BPE merges or exceeds what the corpus can provide.
    """
    fixed = len(prompts.QWEN_SPECIAL_TOKENS) + len(prompts.TCOT_TAGS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < fixed + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the 256 byte tokens and {fixed} special tokens; "
            f"use vocab_size >= {fixed + len(alphabet)}"
        )
    bpe_size = vocab_size - len(prompts.TCOT_TAGS)  # the trainer's size counts the Qwen special tokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        special_tokens=list(prompts.QWEN_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(read_corpus(), trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the tokenizer corpus supports "
            f"(it yields {tok.get_vocab_size() + len(prompts.TCOT_TAGS)} tokens); use a smaller vocab_size"
        )
    # Non-special added tokens: never split, and kept by decode(skip_special_tokens=True).
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in prompts.TCOT_TAGS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=prompts.EOS_TOKEN,
        pad_token=prompts.PAD_TOKEN,
        padding_side="left",
        chat_template=prompts.CHAT_TEMPLATE,
    )
