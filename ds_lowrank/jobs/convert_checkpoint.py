#!/usr/bin/env python
"""Consolidate a DeepSpeed checkpoint of a ds_lowrank optimizer, to resume it at any world size,
or convert it for DeepSpeed's own Adam.

    python tools/convert_checkpoint.py runs/130m-ldadam_zero2/checkpoints consolidated/step1000 [--tag step1000]
    python tools/convert_checkpoint.py runs/130m-ldadam_zero2/checkpoints adam/ --to adam

reads every rank's files of the checkpoint (any ZeRO stage, and any tensor-parallel size of a
Megatron run, whose shards are joined into whole parameters, fused weights' state block by block;
the tag defaults to the one in ``latest``) and writes each parameter's fp32 weight and optimizer state as one process holds
them: DeepSpeed's universal-checkpoint layout (``zero/<name>/fp32.pt`` and the AdamW state of the
dense parameters) beside ``lowrank/<name>/`` for the low-rank state.  Training continues from it
at any world size and ZeRO stage with ``ds_lowrank.checkpoint.resume`` (``launch/pretrain.py
--resume_from``).

``--to adam`` writes a universal checkpoint of DeepSpeed's Adam instead: LDAdam's and GaLore's
moments carried out of their subspace (exact for the momentum, an estimate for the second
moment; see ds_lowrank/checkpoint/adam.py), loaded by a DeepSpeed AdamW run at any world size with
``"checkpoint": {"load_universal": true}``.  The other way, a universal checkpoint of DeepSpeed's
Adam (``python -m deepspeed.checkpoint.ds_to_universal``) starts LDAdam or GaLore directly through
``--resume_from``.  Nothing is written unless everything was read.

The input's files are checked against the checksums ``launch/pretrain.py`` writes with each
checkpoint (``checksums.json``): a missing, truncated or corrupted file stops the conversion with
its name.  A checkpoint without checksums (saved before them, or by ``engine.save_checkpoint``
in another script) is converted with a warning.  The output carries its own ``checksums.json``.
"""

from __future__ import annotations

import argparse
import sys
import warnings


from ds_lowrank.checkpoint import CheckpointError, consolidate, save, save_adam_universal
from ds_lowrank.checkpoint.integrity import UnverifiedCheckpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir", help="the folder given to engine.save_checkpoint")
    ap.add_argument("out", help="the folder to write (must not exist, unless --overwrite)")
    ap.add_argument("--tag", default=None, help="the checkpoint's tag (default: the one in 'latest')")
    ap.add_argument("--to", choices=("consolidated", "adam"), default="consolidated",
                    help="consolidated: for ds_lowrank at any world size (default); adam: a universal "
                         "checkpoint of DeepSpeed's Adam")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnverifiedCheckpoint)
            c = consolidate(args.checkpoint_dir, args.tag)
        for w in caught:
            if issubclass(w.category, UnverifiedCheckpoint):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        (save_adam_universal if args.to == "adam" else save)(c, args.out, overwrite=args.overwrite)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    numel = sum(w.numel() for w in c.weights.values())
    print(f"{c.optimizer} at step {c.global_steps}: {len(c.weights)} parameters ({numel:,} elements), "
          f"state of {len(c.states) + len(c.shard_states)}, written to {args.out}" + (" for DeepSpeed's Adam" if args.to == "adam" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
