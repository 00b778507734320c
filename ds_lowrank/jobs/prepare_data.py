"""Tokenize text into a memory-mapped pretraining dataset (format: ds_lowrank.training.data).

Examples::

    python tools/prepare_data.py corpus/ --output data/corpus                 # *.txt, *.md, *.jsonl, ...
    python tools/prepare_data.py c4.jsonl.gz --text_key text --output data/c4 --vocab_size 32000
    python tools/prepare_data.py book.txt --doc_boundary blank_line --tokenizer tok/ --output data/book
    python tools/prepare_data.py --stdlib_docs --output data/stdlib              # offline default text
    python tools/prepare_data.py --hf_dataset wikitext --hf_config wikitext-2-raw-v1 --output data/wt2
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize text files, JSONL files, a Hugging Face dataset or the Python standard "
                    "library's docstrings into a dataset directory of memory-mapped token files "
                    "(train.bin/val.bin, document offsets, meta.json and the tokenizer).",
        epilog="Exactly one source: input paths, --hf_dataset or --stdlib_docs. Exits with status 1 "
               "and a message on bad input.")
    source = parser.add_argument_group("source")
    source.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="text files, JSONL files (*.jsonl, *.json, optionally .gz) or directories "
                             "of them, searched recursively")
    source.add_argument("--text_key", default="text", help="JSONL field / dataset column holding the text "
                                                            "(default: text)")
    source.add_argument("--doc_boundary", choices=("file", "blank_line", "line"), default="file",
                        help="what a document is in a text file (default: the whole file)")
    source.add_argument("--extensions", default=".txt,.text,.md,.rst,.jsonl,.txt.gz,.jsonl.gz",
                        help="comma-separated file name endings read from directories")
    source.add_argument("--hf_dataset", metavar="NAME",
                        help="a Hugging Face dataset by name (needs the datasets package and a network "
                             "or a local datasets cache)")
    source.add_argument("--hf_config", default=None, help="configuration of --hf_dataset")
    source.add_argument("--hf_split", default="train", help="split of --hf_dataset (default: train)")
    source.add_argument("--stdlib_docs", action="store_true",
                        help="the docstrings of this Python's standard library (offline)")
    source.add_argument("--max_documents", type=int, default=None,
                        help="stop after this many documents")

    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", metavar="DIR", default=None,
                     help="local Hugging Face tokenizer directory; without it a byte-level BPE "
                          "tokenizer is trained on the input")
    tok.add_argument("--vocab_size", type=int, default=None,
                     help="vocabulary size of the trained tokenizer (default: 4096, the tiny preset's)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR", help="dataset directory to create")
    out.add_argument("--val_fraction", type=float, default=0.01,
                     help="fraction of the documents held out for validation (default: 0.01; at least "
                          "one document when positive)")
    out.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default: 0)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    chosen = sum((bool(args.inputs), args.hf_dataset is not None, args.stdlib_docs))
    if chosen != 1:
        parser.error("give exactly one source: input paths, --hf_dataset NAME or --stdlib_docs")
    if args.tokenizer is not None and args.vocab_size is not None:
        parser.error("--vocab_size sets the size of a trained tokenizer; it cannot be combined with "
                     "--tokenizer")
    if args.vocab_size is None:
        args.vocab_size = 4096
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Imported after parsing so that --help answers without loading torch.
    from ds_lowrank.training import data

    try:
        if args.inputs:
            extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
            corpus = data.local_corpus(args.inputs, text_key=args.text_key, doc_boundary=args.doc_boundary,
                                       extensions=extensions)
            source = ", ".join(args.inputs)
        elif args.hf_dataset is not None:
            corpus = data.hf_corpus(args.hf_dataset, config=args.hf_config, split=args.hf_split,
                                    text_key=args.text_key)
            source = f"Hugging Face dataset {args.hf_dataset} ({args.hf_config or 'default'}, {args.hf_split})"
        else:
            corpus = data.stdlib_corpus()
            source = "docstrings of the Python standard library"
        data.prepare_dataset(corpus, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             val_fraction=args.val_fraction, seed=args.seed,
                             max_documents=args.max_documents, overwrite=args.overwrite, source=source)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
