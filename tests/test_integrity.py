"""Damaged checkpoints are found, named, and skipped for the newest one that verifies.

One short 2-rank run of launch/pretrain.py saves two checkpoints (steps 2 and 4); each case
damages a copy of it.  Only the fallback resume launches again; the other cases call the
library and tools/convert_checkpoint.py in this process.
"""

import json
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest

from ds_lowrank.checkpoint import CheckpointError, IntegrityError, consolidate, integrity, load
from helpers import load_script
from test_pretrain import REPO, launch, ok, read_jsonl

OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
FLAGS = ["--seq_len", "32", "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "0", "--eval_iters", "1",
         "--save_interval", "2", "--log_interval", "2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 4-step run on 2 ranks (ZeRO-2, fp32) with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("integrity")
    config = json.loads((REPO / "configs" / "ldadam_zero2.json").read_text())
    config["bf16"]["enabled"] = False
    config["train_micro_batch_size_per_gpu"] = 4
    config["optimizer"]["params"]["rank"] = 16
    (root / "fp32.json").write_text(json.dumps(config))
    ok(launch(flags(root, root / "run"), cwd=root))
    return root


def flags(root, out):
    return ["--deepspeed_config", str(root / "fp32.json"), "--data_cache", str(root / "cache"), *FLAGS,
            "--out_dir", str(out)]


def copy_of(work, tmp_path):
    shutil.copytree(work / "run", tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints"


def scribble(path, n=4096, at=None):
    """Overwrite ``n`` bytes in the middle of ``path`` with random ones (the size is unchanged)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 if at is None else at)
        f.write(os.urandom(n))


def test_every_checkpoint_is_sealed(work):
    ckpt = work / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step4"
    for tag in ("step2", "step4"):
        manifest = json.loads((ckpt / tag / "checksums.json").read_text())
        assert manifest["tag"] == tag and manifest["global_steps"] == int(tag[4:])
        assert sorted(manifest["files"]) == [MODEL, OPTIM.format(0), OPTIM.format(1)]
        for name, entry in manifest["files"].items():
            assert entry["size"] == os.path.getsize(ckpt / tag / name)
            assert entry["sha256"] == integrity.file_digest(ckpt / tag / name)
        assert integrity.verify(ckpt / tag)


def test_corrupted_optimizer_file_is_named_and_the_run_resumes_from_the_previous_checkpoint(work, tmp_path):
    """4 KB of random bytes in rank 1's optimizer file of step 4: resume names the file, continues
    from step 2, moves step 4 aside, and trains steps 3-4 exactly as the run did."""
    out, ckpt = copy_of(work, tmp_path)
    bad = ckpt / "step4" / OPTIM.format(1)
    scribble(bad)
    proc = ok(launch([*flags(work, out), "--resume"], cwd=work))
    text = proc.stdout + proc.stderr
    assert f"{bad}: corrupted" in text
    assert f"continuing from {ckpt / 'step2'} instead" in text and "resume: step 2," in text
    assert f"moved aside (delete when no longer needed): {ckpt / 'step4.corrupt'}" in text
    assert read_jsonl(out / "losses.jsonl") == read_jsonl(work / "run" / "losses.jsonl")   # bit for bit
    assert (ckpt / "latest").read_text() == "step4" and integrity.verify(ckpt / "step4")
    kept = (ckpt / "step4.corrupt" / OPTIM.format(1)).read_bytes()        # the damaged file, kept
    assert kept != (work / "run" / "checkpoints" / "step4" / OPTIM.format(1)).read_bytes()


def test_truncated_file_is_named(work, tmp_path):
    out, ckpt = copy_of(work, tmp_path)
    os.truncate(ckpt / "step4" / MODEL, 1000)
    with pytest.raises(IntegrityError, match=rf"{ckpt / 'step4' / MODEL}: truncated, 1000 bytes of the \d+ written"):
        integrity.verify(ckpt / "step4")
    said = []
    assert integrity.resume_tag(ckpt, said.append) == "step2"
    assert f"{ckpt / 'step4' / MODEL}: truncated" in said[0] and "continuing from" in said[1]
    assert (ckpt / "latest").read_text() == "step2" and not (ckpt / "step4").exists()


def test_truncated_or_garbage_file_without_checksums_is_named_when_read(work, tmp_path):
    """A checkpoint from before checksums is read with a warning; a file that cannot be read is
    named rather than left to torch's error."""
    out, ckpt = copy_of(work, tmp_path)
    for tag in ("step2", "step4"):
        os.remove(ckpt / tag / "checksums.json")
    said = []
    assert integrity.resume_tag(ckpt, said.append) == "step4"             # resumes, unverified
    assert "no checksums.json" in said[0] and "not verified" in said[0]
    os.truncate(ckpt / "step4" / OPTIM.format(1), 3000)
    with pytest.warns(integrity.UnverifiedCheckpoint, match="cannot be verified"):
        with pytest.raises(CheckpointError, match=rf"{ckpt / 'step4' / OPTIM.format(1)} cannot be read .*truncated"):
            consolidate(ckpt)
    (ckpt / "step2" / MODEL).write_bytes(os.urandom(5000))
    with pytest.warns(integrity.UnverifiedCheckpoint):
        with pytest.raises(CheckpointError, match=rf"{ckpt / 'step2' / MODEL} cannot be read"):
            consolidate(ckpt, tag="step2")
    # what engine.load_checkpoint reads goes through its checkpoint engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    with integrity.naming_load_errors(engine):
        with pytest.raises(CheckpointError, match=rf"{ckpt / 'step4' / OPTIM.format(1)} cannot be read"):
            engine.checkpoint_engine.load(str(ckpt / "step4" / OPTIM.format(1)), map_location="cpu")
        assert "module" in engine.checkpoint_engine.load(str(ckpt / "step4" / MODEL), map_location="cpu")
    assert "load" not in vars(engine.checkpoint_engine)


@pytest.mark.parametrize("content,says", [(b"", "is empty"), (b"\xff\xfe\x00\x89PNG\r\n", "not text"),
                                          (b"step99", "names 'step99', but"), (b"a\nb/c", "is not a checkpoint tag")],
                         ids=["empty", "binary", "no-such-tag", "not-a-tag"])
def test_damaged_latest_is_named_and_the_newest_good_checkpoint_taken(work, tmp_path, content, says):
    out, ckpt = copy_of(work, tmp_path)
    (ckpt / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'latest'} .*{says}"):
        consolidate(ckpt)                               # before: UnicodeDecodeError, or a bare error
    said = []
    assert integrity.resume_tag(ckpt, said.append) == "step4"
    assert f"{ckpt / 'latest'}" in said[0] and says in said[0]
    assert (ckpt / "latest").read_text() == "step4" and (ckpt / "step2").is_dir()


def test_no_checkpoint_verifies(work, tmp_path):
    out, ckpt = copy_of(work, tmp_path)
    scribble(ckpt / "step4" / OPTIM.format(0))
    os.remove(ckpt / "step2" / OPTIM.format(1))
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies") as err:
        integrity.resume_tag(ckpt, print)
    msg = str(err.value)
    assert f"{ckpt / 'step4' / OPTIM.format(0)}: corrupted" in msg
    assert f"{ckpt / 'step2' / OPTIM.format(1)}: missing" in msg
    assert (ckpt / "step4").is_dir() and (ckpt / "latest").read_text() == "step4"     # nothing moved


def test_convert_checkpoint_refuses_a_corrupted_input_and_seals_its_output(work, tmp_path, capsys):
    convert = load_script(REPO / "tools" / "convert_checkpoint.py", "convert_checkpoint_script").main
    out, ckpt = copy_of(work, tmp_path)
    scribble(ckpt / "step2" / OPTIM.format(0))
    assert convert([str(ckpt), str(tmp_path / "whole"), "--tag", "step2"]) == 1
    assert f"error: {ckpt / 'step2' / OPTIM.format(0)}: corrupted" in capsys.readouterr().err
    assert not (tmp_path / "whole").exists() and not (tmp_path / "whole.tmp").exists()

    # a good input: the output is sealed, and reading it verifies it
    assert convert([str(ckpt), str(tmp_path / "whole")]) == 0
    assert integrity.verify(tmp_path / "whole")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(tmp_path / "whole").global_steps == 4
    bad = tmp_path / "whole" / "lowrank" / "model.layers.0.mlp.up_proj.weight" / "proj_exp_avg.pt"
    scribble(bad, n=64, at=os.path.getsize(bad) - 200)
    with pytest.raises(IntegrityError, match=rf"{bad}: corrupted"):
        load(tmp_path / "whole")
    assert convert([str(ckpt), str(tmp_path / "adam"), "--to", "adam"]) == 0
    assert integrity.verify(tmp_path / "adam" / "step4")


def test_a_failed_write_leaves_nothing_behind(work, tmp_path, monkeypatch):
    from ds_lowrank.checkpoint import save
    c = consolidate(work / "run" / "checkpoints")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(integrity, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(c, tmp_path / "whole")
    assert list(tmp_path.iterdir()) == []
