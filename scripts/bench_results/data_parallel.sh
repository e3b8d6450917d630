#!/bin/bash
# One GPU vs two: the main script on a random-weights SD3-medium (LoRA on shared weights, 1024x1024, batch 2 per GPU).
# Run from the repository root on a machine with 2 GPUs: OUT=some/folder scripts/bench_results/data_parallel.sh
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path
import experiment_onpolicy_vs_offpolicy as E, bench_distill_step as B
E.real_size_folder(B.load_distill(), 'sd3-medium', Path('/tmp/rs/random-sd3-medium'), Path('/tmp/rs'))"
ARGS="--TEACHER_ID=/tmp/rs/random-sd3-medium --STUDENT_ID=/tmp/rs/random-sd3-medium --USE_T5=false --BATCH_SIZE=2
 --GRAD_ACCUM_STEPS=1 --MAX_STEPS=14 --LOG_EVERY=1 --EVAL_EVERY=0 --HELDOUT_PROMPTS=2 --SAVE_SAMPLE_GRIDS=false
 --EXPORT_DIFFUSERS=false --CHECKPOINT_EVERY=1000 --CHECKPOINT_EVERY_MINUTES=0 --OUTPUT_ROOT=/tmp/rs --PROMPTS_JSONL=/tmp/rs/prompts.jsonl"
accelerate launch --num_processes 1 scripts/run_onpolicy_distill_colab.py $ARGS --RUN_NAME=gpu1 > $OUT/gpu1.log 2>&1
accelerate launch --multi_gpu --num_processes 2 scripts/run_onpolicy_distill_colab.py $ARGS --RUN_NAME=gpu2 > $OUT/gpu2.log 2>&1
for n in gpu1 gpu2; do cp /tmp/rs/metrics/$n/metrics.jsonl $OUT/$n.jsonl; python3 -c "
import json, statistics; rows = [json.loads(l) for l in open('/tmp/rs/metrics/$n/metrics.jsonl')][4:]
print('$n', 'sec/step', round(statistics.median(r['sec_per_step'] for r in rows), 3), 'img/s', round(statistics.median(r['images_per_sec'] for r in rows), 2), 'peak GiB', round(max(r['peak_mem_gb'] for r in rows), 1))"; done
