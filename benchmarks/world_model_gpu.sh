#!/usr/bin/env bash
# The GPU checks of benchmarks/world_model.py in one run (a lent H100 / H200): bf16 and fp32 train steps,
# tokens/s and MFU of tiny / small / the UWM reference setting / base, SDPA pinned to the math kernel
# against torch's choice (flash), and base at batch 128. Writes JSON to $OUT (default: bench-gpu/).
set -u
OUT=${OUT:-bench-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
B="python3 benchmarks/world_model.py --device cuda --repeats 10"
$B --precision bf16 --configs tiny-uwm,small-uwm,small-dust,uwm-reference,uwm-reference-dust,base-uwm,base-dust --out $OUT/bf16.json > $OUT/bf16.log 2>&1; tail -c 300 $OUT/bf16.log
$B --precision fp32 --configs small-uwm,uwm-reference,base-uwm,base-dust --out $OUT/fp32.json > $OUT/fp32.log 2>&1; tail -c 300 $OUT/fp32.log
$B --precision bf16 --configs base-uwm,base-dust --sdpa math --out $OUT/bf16_math.json > /dev/null 2>&1
$B --precision bf16 --configs base-uwm,base-dust --batch 128 --out $OUT/bf16_b128.json > /dev/null 2>&1
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
for f in sorted(os.listdir(out)):
    if f.endswith(".json"):
        d = json.load(open(f"{out}/{f}"))
        for k, r in d["results"].items():
            print(f, k, r["batch"], r["train_step_ms"], r["train_tokens_per_s"], r.get("mfu"), r.get("max_memory_GiB"), r["sample_ms_batch1"])
PY
