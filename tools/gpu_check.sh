#!/usr/bin/env bash
# The GPU measurements of the README's Speed section, in one command on one GPU (about 8 minutes on
# an H100/H200; never run by the tests). Each part writes its output under $OUT_DIR (default
# gpu_check/), and a part that fails does not stop the ones after it:
#
#   bash tools/gpu_check.sh                  # every part
#   bash tools/gpu_check.sh bench            # parts 1-3 (optimizer steps, no DeepSpeed needed)
#   bash tools/gpu_check.sh pretrain         # parts 4-5 (launch/pretrain.py, needs DeepSpeed)
#
# 1. MicroAdam compiled (torch.compile, the default on CUDA) against the same step eager: the state
#    (window, 4-bit codes, bucket statistics) bitwise equal after 12 steps with the same gradients.
# 2. One step of every optimizer against fused AdamW on the $MODEL (1b) shapes, rank $RANK (256),
#    each in the device's default precision (proj_precision "auto": TF32 on CUDA), galore-torch
#    beside GaLore (--peers, when galore-torch is installed): tools/bench_optimizer.py.
# 3. LDAdam with proj_precision float32, tf32 and bfloat16, and MicroAdam compiled and eager, on
#    the same shapes, each against fused AdamW in its run.
# 4. launch/pretrain.py on one GPU at $PRETRAIN_MODEL (350m), ZeRO-2, bf16: the shipped AdamW
#    config against the shipped LDAdam config at rank $RANK, $PRETRAIN_STEPS steps each
#    (seq_len $SEQ_LEN); tokens/s after the first 10 steps from tools/plot_runs.py --summary.
# 5. The effect of proj_precision on training: $QUALITY_MODEL (60m) for $QUALITY_STEPS steps with
#    the LDAdam config at float32, tf32 and bfloat16, same seed and data; the losses side by side.
#
# Dry run on a CPU (small sizes, parts 2-5 only):
#   DEVICE=cpu MODEL=tiny PRETRAIN_MODEL=tiny QUALITY_MODEL=tiny RANK=32 SEQ_LEN=128 \
#     PRETRAIN_STEPS=15 QUALITY_STEPS=15 STEPS=2 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PARTS="${1:-all}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
MODEL="${MODEL:-1b}"
RANK="${RANK:-256}"
STEPS="${STEPS:-20}"
PRETRAIN_MODEL="${PRETRAIN_MODEL:-350m}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-60}"
SEQ_LEN="${SEQ_LEN:-1024}"
QUALITY_MODEL="${QUALITY_MODEL:-60m}"
QUALITY_STEPS="${QUALITY_STEPS:-300}"
OUT_DIR="${OUT_DIR:-gpu_check}"
PORT="${PORT:-29651}"
mkdir -p "$OUT_DIR"
FAILED=()

part() {   # part NAME COMMAND...: runs COMMAND, its output also in $OUT_DIR/NAME.log
    local name="$1"; shift
    echo "=== $name"
    local started=$SECONDS
    if "$@" 2>&1 | tee "$OUT_DIR/$name.log"; then
        echo "=== $name: done in $((SECONDS - started)) s"
    else
        echo "=== $name: FAILED after $((SECONDS - started)) s (see $OUT_DIR/$name.log)"
        FAILED+=("$name")
    fi
}

config() {   # config SHIPPED OUT [KEY=VALUE ...]: the shipped config with its optimizer params changed
    "$PY" - "$@" <<'EOF'
import json, sys
shipped, out, *changes = sys.argv[1:]
config = json.load(open(shipped))
for change in changes:
    key, value = change.split("=", 1)
    config["optimizer"]["params"][key] = json.loads(value) if value[:1].isdigit() else value
json.dump(config, open(out, "w"), indent=2)
EOF
}

pretrain() {   # pretrain CONFIG RUN_DIR MODEL STEPS: one run of launch/pretrain.py on one device
    rm -rf "$2"
    DS_ACCELERATOR="$([ "$DEVICE" = cpu ] && echo cpu || echo cuda)" \
        "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$PORT" launch/pretrain.py \
        --deepspeed_config "$1" --out_dir "$2" --model "$3" --max_steps "$4" --seq_len "$SEQ_LEN" \
        --eval_interval "$4" --save_interval 0
}

microadam_equal() {
    "$PY" - <<'EOF'
import torch
from ds_lowrank import MicroAdam

assert torch.cuda.is_available(), "part 1 needs a CUDA device"
torch.manual_seed(0)
shapes = [(2048, 2048), (5632, 2048), (2048, 5632), (7, 1001)]
runs = []
for flag in (True, False):
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator("cuda").manual_seed(i)))
          for i, s in enumerate(shapes)]
    runs.append((ps, MicroAdam(ps, lr=1e-3, weight_decay=0.1, compiled=flag, block_size=4096)))
for step in range(12):      # past the window of 10
    gen = torch.Generator("cuda").manual_seed(step)
    grads = [torch.randn(s, device="cuda", generator=gen) * 1e-3 for s in shapes]
    for ps, opt in runs:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
(pc, oc), (pe, oe) = runs
worst = 0.0
for p, q in zip(pc, pe):
    for key, t in oc.state[p].items():
        assert torch.equal(t, oe.state[q][key]), f"{tuple(p.shape)}: {key} differs between compiled and eager"
    worst = max(worst, float(((p - q).abs() / (q.abs() + 1e-12)).max()))
print(f"compiled == eager on CUDA: state bitwise equal after 12 steps; weights within {worst:.2e} relative")
EOF
}

bench() {
    local peers=()
    # galore-torch's AdamW, loaded as the benchmark loads it (without bitsandbytes)
    "$PY" -c "import sys; sys.path.insert(0, 'tools'); import bench_optimizer as b; sys.exit(b.galore_torch_adamw() is None)" \
        2>/dev/null && peers=(--peers)
    "$PY" tools/bench_optimizer.py --device "$DEVICE" --model "$MODEL" --rank "$RANK" --optimizer all \
        "${peers[@]}" --steps "$STEPS" --out "$OUT_DIR/bench_all.json"
}

bench_variants() {
    "$PY" tools/bench_optimizer.py --device "$DEVICE" --model "$MODEL" --rank "$RANK" --optimizer ldadam \
        --proj_precision float32 tf32 bfloat16 --steps "$STEPS" --out "$OUT_DIR/bench_precision.json" &&
    "$PY" tools/bench_optimizer.py --device "$DEVICE" --model "$MODEL" --optimizer microadam --compiled \
        --steps "$STEPS" --out "$OUT_DIR/bench_microadam.json"
}

pretrain_speed() {
    config configs/ldadam_zero2.json "$OUT_DIR/ldadam_r$RANK.json" "rank=$RANK" &&
    pretrain configs/adamw_zero2.json "$OUT_DIR/runs/adamw" "$PRETRAIN_MODEL" "$PRETRAIN_STEPS" &&
    pretrain "$OUT_DIR/ldadam_r$RANK.json" "$OUT_DIR/runs/ldadam" "$PRETRAIN_MODEL" "$PRETRAIN_STEPS" &&
    "$PY" tools/plot_runs.py "$OUT_DIR/runs/adamw" "$OUT_DIR/runs/ldadam" --summary
}

precision_quality() {
    local runs=()
    for precision in float32 tf32 bfloat16; do
        config configs/ldadam_zero2.json "$OUT_DIR/ldadam_$precision.json" "rank=$RANK" \
            "proj_precision=$precision" || return 1
        pretrain "$OUT_DIR/ldadam_$precision.json" "$OUT_DIR/runs/quality_$precision" "$QUALITY_MODEL" \
            "$QUALITY_STEPS" || return 1
        runs+=("$OUT_DIR/runs/quality_$precision")
    done
    "$PY" tools/plot_runs.py "${runs[@]}" --summary
}

if [ "$PARTS" = all ] || [ "$PARTS" = bench ]; then
    [ "$DEVICE" = cpu ] || part 1_microadam_equal microadam_equal
    part 2_bench bench
    part 3_bench_variants bench_variants
fi
if [ "$PARTS" = all ] || [ "$PARTS" = pretrain ]; then
    part 4_pretrain_speed pretrain_speed
    part 5_precision_quality precision_quality
fi
rm -rf "$OUT_DIR/runs"/*/checkpoints
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
echo "every part passed; results in $OUT_DIR/"
