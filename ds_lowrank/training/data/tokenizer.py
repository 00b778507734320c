"""Tokenizers of a dataset: a byte-level BPE trained on the corpus, or a local Hugging Face one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .format import DataError, load_metadata

EOS_TOKEN = "<|endoftext|>"
# A byte-level BPE vocabulary holds every byte plus the end-of-document token.
MIN_BPE_VOCAB = 257


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, length: int | None = None):
    """A byte-level BPE tokenizer trained on ``documents``, as a Hugging Face fast tokenizer.

    Its only special token is the end-of-document token ``<|endoftext|>`` (id 0).  A small
    corpus may give fewer than ``vocab_size`` entries.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer: it "
                        f"needs at least {MIN_BPE_VOCAB} (256 bytes and the end-of-document token)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)


def load_hf_tokenizer(path: str | Path):
    """A Hugging Face tokenizer saved in a local directory (never downloaded)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist; pass a local directory written "
                        f"by save_pretrained(), or leave out --tokenizer to train a BPE tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load a tokenizer from {path}: {err}") from None


def eos_token_id(tokenizer) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has no end-of-sequence (or separator) token to mark where a "
                    "document ends; add one (tokenizer.add_special_tokens({'eos_token': ...}) and "
                    "save it) or train a tokenizer instead")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the tokenizer's model_max_length are expected here.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def load_tokenizer(data_dir: str | Path):
    """The tokenizer a dataset was prepared with."""
    return load_hf_tokenizer(Path(data_dir) / load_metadata(data_dir)["tokenizer"]["dir"])
