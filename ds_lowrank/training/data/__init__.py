"""Token datasets for causal-LM pretraining: preparation, a default corpus, and a reader.

A prepared dataset is one directory::

    <dir>/meta.json          what the files hold (below)
    <dir>/train.bin          the token ids of the training documents, back to back, each document
    <dir>/val.bin            followed by the end-of-document token; raw little-endian ``uint16`` when
                             the vocabulary has at most 65536 entries, else ``uint32``:
                             ``np.memmap(path, dtype=meta["dtype"], mode="r")``
    <dir>/train.idx          ``.npy`` int64 array of ``documents + 1`` offsets into the ``.bin``:
    <dir>/val.idx            document ``i`` is ``tokens[idx[i]:idx[i + 1]]``, its end token included;
                             ``np.load(path, mmap_mode="r")``
    <dir>/tokenizer/         a Hugging Face tokenizer: ``AutoTokenizer.from_pretrained(<dir>/tokenizer)``

``meta.json`` holds ``format``, ``version``, ``dtype``, ``vocab_size`` (the tokenizer's length),
``eos_token_id``, ``tokenizer`` (where it came from), ``splits`` (``{"train": {"tokens",
"documents"}, "val": {...}}``), ``documents``, ``val_fraction``, ``seed`` and ``source``.

The validation split is a set of whole documents, drawn with ``seed``; no validation document
is in the training split.  A directory is built under a temporary name next to its destination
and renamed into place once complete, so a dataset directory is never half-written; an existing
one is only replaced when asked to.

:func:`prepare_dataset` does the work from any re-iterable source of documents (text files,
JSONL, a Hugging Face dataset, the standard library's docstrings); ``tools/prepare_data.py`` is
its command line.  :func:`default_corpus` prepares, once per cache directory, a corpus from the
docstrings of the running Python's standard library, so a pretraining run needs no download.
:class:`TokenDataset` and :class:`ResumableSampler` read a prepared dataset for training.
"""

from .corpus import Corpus, hf_corpus, local_corpus, stdlib_corpus
from .format import FORMAT, FORMAT_VERSION, SPLITS, DataError, DatasetExistsError, load_metadata
from .prepare import default_corpus, prepare_dataset
from .reading import TokenDataset, read_offsets, read_tokens
from .sampler import ResumableSampler
from .tokenizer import load_hf_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = ["Corpus", "DataError", "DatasetExistsError", "FORMAT", "FORMAT_VERSION", "ResumableSampler",
           "SPLITS", "TokenDataset", "default_corpus", "hf_corpus", "load_hf_tokenizer", "load_metadata",
           "load_tokenizer", "local_corpus", "prepare_dataset", "read_offsets", "read_tokens",
           "stdlib_corpus", "train_bpe_tokenizer"]
