#!/usr/bin/env bash
# The GPU checks of benchmarks/world_model.py in one run (a lent H100 / H200): bf16 and fp32 train steps,
# tokens/s and MFU of tiny / small / the UWM reference setting / base, SDPA pinned to the math kernel
# against torch's choice (flash), base at batch 128, and train.compile / optim.impl (compiled + fused AdamW
# against eager, benchmarks/compile.py). Writes JSON to $OUT (default: bench-gpu/).
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
# issue 18 levers: train.compile and optim.impl. MFU with the model compiled and fused AdamW (the runtime's
# auto on CUDA); then eager (each AdamW kernel) vs compiled side by side in one run (compile.py ratios)
$B --precision bf16 --configs small-uwm,uwm-reference,base-uwm,base-dust --compile --optim-impl fused --out $OUT/bf16_compiled.json > $OUT/bf16_compiled.log 2>&1; tail -c 300 $OUT/bf16_compiled.log
$B --precision bf16 --configs base-uwm --batch 128 --compile --optim-impl fused --out $OUT/bf16_b128_compiled.json > /dev/null 2>&1
C="python3 benchmarks/compile.py --device cuda --precision bf16 --reps 20"
$C --configs tiny-decoder,small-decoder,tiny-uwm,small-uwm,uwm-reference,base-uwm,base-dust --out $OUT/compile_bf16.json > $OUT/compile_bf16.log 2>&1; tail -c 300 $OUT/compile_bf16.log
$C --configs small-uwm,uwm-reference --compile-mode reduce-overhead --out $OUT/compile_cudagraphs.json > /dev/null 2>&1
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
for f in sorted(os.listdir(out)):
    if f.endswith(".json"):
        d = json.load(open(f"{out}/{f}"))
        for k, r in d["results"].items():
            if d.get("benchmark") == "compile":
                print(f, k, r["batch"], {s: v["ms_per_step"] for s, v in r["settings"].items()}, "compiled_over_eager",
                      r["compiled_over_eager"], "compile_s", r["compile_s"], "fused_over_for_loop", r["fused_over_for_loop"])
            else:
                print(f, k, r["batch"], r["train_step_ms"], r["train_tokens_per_s"], r.get("mfu"), r.get("max_memory_GiB"), r["sample_ms_batch1"])
PY
