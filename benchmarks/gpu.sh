#!/usr/bin/env bash
# The GPU checks and numbers of docs/benchmarks.md, on one CUDA machine, from a checkout (no install:
# torch, timm, scipy, matplotlib, tqdm and pyyaml must be importable):  bash benchmarks/gpu.sh OUT_DIR
set -uo pipefail
out=${1:-gpu-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L; $py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
# 1. the suite's CUDA paths: attention kernels on CUDA, optimize, compile, the zoo and the training engine
$py -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_optimize_precision.py tests/test_fast.py \
    tests/test_compile.py tests/test_mixers.py 2>&1 | tail -5
# 2. cost on the GPU: the four MS-S models, bf16 (autocast/weights, auto) and fp32, inference and training
for dt in bf16 fp32; do
  $py -m spach bench spach_ms_s_patch4_224_{conv,attn,mlp,hybrid} --device cuda --dtype $dt --mode both \
      --batch-size 64 --json "$out/bench_$dt.json" 2>&1 | grep -v Warning
done
$py -m spach bench spach_ms_s_patch4_224_{conv,attn,mlp,hybrid} --device cuda --dtype bf16 --protocol swin \
    --batch-size 64 --json "$out/bench_swin.json" 2>&1 | grep -v Warning
# 3. a battle on the GPU (the built-in tiny set), and the paper preset's GPU hours timed on this GPU
$py -m spach battle --preset tiny --output "$out/tiny" 2>&1 | tail -3
$py -m spach battle --preset paper --data /nonexistent --dry-run 2>&1 | tail -30
# 5. which attention kernel the GPU picks per shape (inference and training, bf16 and fp32)
$py benchmarks/attention_kernels.py --device cuda 2>&1 | tail -40
