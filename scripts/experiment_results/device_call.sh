#!/bin/bash
# One call of the lent GPU for the experiments (plumbing, not the product). Run from the repository root there, with
# diffusers' wheel carried in .whl/ (see the device tool's README):
#
#   PHASE=start SHAPES_PLAN=<plan> DIGITS_PLAN=<plan> JOBS=6 CALL_S=560 bash scripts/experiment_results/device_call.sh
#   PHASE=wait CALL_S=540 bash scripts/experiment_results/device_call.sh     # the next call, on the same warm machine
#   PHASE=bench CALL_S=540 bash scripts/experiment_results/device_call.sh    # the attention probe and two step cases
#
# start: copies scripts/ to /tmp/code, starts NVIDIA's MPS daemon and both harnesses in new process sessions
# (setsid), so that they run on after the call while the machine stays warm (30 s between calls: start the next call
# at once). start and wait: every 2 min the runs' last logged steps; at CALL_S seconds or when both harnesses have
# ended, the teachers and judges (once, when trained: a later call of the same session can carry them back in) and the
# records, results.json and samples.png of each task into $OUT. Teachers are not kept between sessions (ignored files
# do not land), so each session's first call trains them again: about 210 s on an H100, both at once.
set -u
T0=$SECONDS
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L
if [ "$PHASE" = bench ]; then
  timeout 200 python3 scripts/bench_distill_step.py --suite attention --out "$OUT/bench_attention.json" 2>&1 | grep -v -i warn | tail -25
  echo "probe done at $((SECONDS - T0)) s"
  timeout $(( ${CALL_S:-540} - (SECONDS - T0) )) python3 scripts/bench_distill_step.py --suite levers --only 0 2 --warmup 1 \
    --repeats 3 --profile --out "$OUT/bench_levers.json" 2>&1 | grep -v -i warn | tail -25
  echo "levers done at $((SECONDS - T0)) s"
  exit 0
fi
if [ "$PHASE" = start ]; then
  rm -rf /tmp/code && mkdir -p /tmp/code && cp -r scripts /tmp/code/
  nvidia-cuda-mps-control -d && echo "MPS on"
  (cd /tmp/code && setsid nohup python3 scripts/experiment_onpolicy_vs_offpolicy.py --out /tmp/ex --plan "$SHAPES_PLAN" \
    --jobs "${JOBS:-6}" > /tmp/ex.log 2>&1 < /dev/null &)
  (cd /tmp/code && setsid nohup python3 scripts/experiment_onpolicy_vs_offpolicy.py --task digits-anywhere --out /tmp/dx \
    --plan "$DIGITS_PLAN" --jobs "${JOBS:-6}" > /tmp/dx.log 2>&1 < /dev/null &)
fi
progress() {
  for d in /tmp/ex /tmp/dx; do
    for m in "$d"/metrics/*/metrics.jsonl; do
      [ -f "$m" ] && echo "$(basename "$(dirname "$m")") step $(tail -1 "$m" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read()).get("step"))')"
    done
    ls "$d/records" 2>/dev/null | sed 's/^/  record: /'
  done
}
while [ $((SECONDS - T0)) -lt "${CALL_S:-560}" ]; do
  pgrep -f experiment_onpolicy_vs_offpolicy > /dev/null || { echo "both harnesses ended"; break; }
  sleep 20
  [ $(( (SECONDS - T0) % 120 )) -lt 20 ] && { echo "== $((SECONDS - T0)) s"; progress; }
done
echo "== collect at $((SECONDS - T0)) s"; progress
for d in ex dx; do
  tail -c 1500 "/tmp/$d.log" | grep -v -i warn
  teacher=$(ls -d /tmp/$d/*teacher_w* 2>/dev/null | head -1)
  if [ -n "$teacher" ] && [ -f "$teacher/transformer/diffusion_pytorch_model.safetensors" ] && [ ! -f "/tmp/$d-teacher-sent" ]; then
    tar czf "$OUT/$d-teacher.tgz" -C "/tmp/$d" "$(basename "$teacher")" $(cd "/tmp/$d" && ls ./*.pt 2>/dev/null) \
      && touch "/tmp/$d-teacher-sent"
  fi
  [ -d "/tmp/$d/records" ] && tar czf "$OUT/$d-records.tgz" -C "/tmp/$d" records $(cd "/tmp/$d" && ls results.json samples.png 2>/dev/null)
done
ls -la "$OUT"
