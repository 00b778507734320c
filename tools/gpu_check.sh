#!/usr/bin/env bash
# MicroAdam on a GPU, in one command (a few minutes on one H100/H200; never run by the tests):
#
#   bash tools/gpu_check.sh                 # Llama-1B shapes, 20 timed steps
#   MODEL=350m STEPS=10 bash tools/gpu_check.sh
#
# 1. MicroAdam compiled (torch.compile; the default on CUDA) against the same step eager, on
#    CUDA: the state (window, 4-bit codes, bucket statistics) must be bitwise equal after a few
#    steps with the same gradients, and the updates within a few ulps.
# 2. The step time of fused AdamW, MicroAdam compiled and MicroAdam eager on the preset's
#    parameters, interleaved in one run (tools/bench_optimizer.py --compiled); the table shows
#    each one's ratio to fused AdamW, and `recompiles_timed` in the JSON must be 0.
# Needs torch (with Triton) and transformers; not deepspeed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODEL="${MODEL:-1b}"
STEPS="${STEPS:-20}"
OUT="${OUT:-gpu_check_microadam.json}"

python - <<'EOF'
import torch
from ds_lowrank import MicroAdam

assert torch.cuda.is_available(), "tools/gpu_check.sh needs a CUDA device"
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

python tools/bench_optimizer.py --model "$MODEL" --optimizer microadam --compiled --steps "$STEPS" --warmup 3 \
    --out "$OUT"
