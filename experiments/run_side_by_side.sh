#!/bin/bash
# Runs several experiment sweeps side by side on one lent GPU until a deadline, then packs what they wrote.
#
#   bash experiments/run_side_by_side.sh DEADLINE_S NAME:EXPERIMENT[:EXTRA ARGS] ...
#   e.g. bash experiments/run_side_by_side.sh 500 "mqar_a:mqar:--models=attention,mamba" "joint_recall:joint_recall"
#
# The small recall and LM models leave most of an H100 idle when run one at a time (a d_model 64 MQAR job: ~80 s
# alone; six sweeps side by side finished about twice the work in the same time, 2026-12-06). Each NAME starts from
# the committed experiments/EXPERIMENT/results/full.json (finished jobs are skipped; an --models subset runs only
# its jobs), writes to SIDE_DIR/NAME, and is stopped at DEADLINE_S with SIGTERM (the running job saves its
# checkpoint and the sweep records it as preempted). Every 20 s and at the end everything (results,
# reports, plots, logs, nvidia-smi samples) is packed into $OUT/side.tgz (one file: a call returns at most 8).
# Merge parts of one experiment here with: python experiments/EXPERIMENT/run.py --size=full --merge=A.json,B.json
#
# SIDE_DIR (default /tmp/side) holds each NAME's results and log, SIDE_WORK (default /tmp/side_work) its checkpoints.
# Point both into an ignored folder of the checkout (e.g. .work/side, .work/side_work) and a second call on the same
# warm machine continues where the first stopped: a NAME whose full.json is already in SIDE_DIR starts from it, not
# from the committed one, and a preempted job resumes from its checkpoint in SIDE_WORK.
# Every 20 s (when it changed) and at the end the newest complete checkpoint of each unfinished job (with its
# config.json and logs) is packed into $OUT/work.tgz, smallest jobs first, up to 15 MB in all (the recall models' fit;
# a 15M-parameter LM's do not), so a call killed at its time limit still brings them back: a later session extracts
# it into an ignored folder, carries that folder and points SIDE_WORK at it to resume them.
#
# Needs the wheels of the GPU machine's missing packages in .whl/ (see experiments/README.md) and HYBRID_JAX_COMMIT
# set to the commit being run (the device's .git is stale). Keep the sum of the sweeps' memory under the card's:
# six sweeps held 77 of 80 GB and one evaluation ran out of memory.
set -u
deadline=$1
shift
if [ -d .whl ] && [ -z "${NOINSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
out=${OUT:-/tmp/side_out}
side=${SIDE_DIR:-/tmp/side}
work=${SIDE_WORK:-/tmp/side_work}
mkdir -p "$side" "$work" "$out"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > "$side/smi.csv" 2>&1 &
  smi=$!
fi
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  rest=${spec#*:}
  exp=${rest%%:*}
  extra=""
  [ "$rest" != "$exp" ] && extra=${rest#*:}
  mkdir -p "$side/$name"
  prev="experiments/$exp/results/${SIZE:-full}.json"
  if [ -f "$side/$name/log.txt" ]; then mv "$side/$name/log.txt" "$side/$name/log.$(date +%s).txt"; fi
  [ -f "$prev" ] && [ ! -f "$side/$name/${SIZE:-full}.json" ] && cp "$prev" "$side/$name/${SIZE:-full}.json"
  (
    timeout -k 20 "$deadline" python3 "experiments/$exp/run.py" --size="${SIZE:-full}" --out="$side/$name" \
      --workdir="$work/$name" --no-progress $extra > "$side/$name/log.txt" 2>&1
    echo "rc=$?" >> "$side/$name/log.txt"
  ) &
  pids+=($!)
done
pack() {  # everything in SIDE_DIR (results, reports, plots, logs, nvidia-smi samples) as one archive in $OUT
  tar czf "$out/side.tgz.tmp" --warning=no-file-changed -C "$side" . 2> /dev/null
  mv "$out/side.tgz.tmp" "$out/side.tgz"
}
pack_work() {  # the newest complete checkpoint of every unfinished job, smallest first, up to 15 MB, in $OUT/work.tgz
  (
    cd "$work" || exit 0
    for job in */*/; do
      job=${job%/}
      [ "$(basename "$job")" = jax_cache ] && continue
      step=$(for d in "$job"/checkpoints/*/; do [ -f "$d/commit_success.txt" ] && basename "$d"; done | sort -n | tail -1)
      [ -n "$step" ] || continue
      files=("$job/checkpoints/$step")
      for f in config.json metrics.jsonl eval.jsonl; do [ -f "$job/$f" ] && files+=("$job/$f"); done
      echo "$(du -skc "${files[@]}" | tail -1 | cut -f1) ${files[*]}"
    done | sort -n | awk '{ total += $1; if (total <= 15 * 1024) { $1 = ""; print substr($0, 2) } }' | tr ' ' '\n' > /tmp/side_keep.txt
    [ -s /tmp/side_keep.txt ] || exit 0
    # Only when the set of checkpoints changed: a finished job's directory is deleted, a running one writes a new step.
    cmp -s /tmp/side_keep.txt /tmp/side_keep.packed && [ -f "$out/work.tgz" ] && exit 0
    tar czf "$out/work.tgz.tmp" -T /tmp/side_keep.txt && mv "$out/work.tgz.tmp" "$out/work.tgz" &&
      cp /tmp/side_keep.txt /tmp/side_keep.packed &&
      echo "checkpoints of unfinished jobs: $out/work.tgz ($(grep -c /checkpoints/ /tmp/side_keep.txt) jobs)"
  )
}
# Packed every 20 s, not only at the end: a call killed at its time limit still returns the results so far and the
# newest checkpoints (finished jobs' work directories are deleted by the runner).
(while true; do sleep 20; pack; pack_work > /dev/null; done) &
packer=$!
wait "${pids[@]}"
kill "$packer" 2> /dev/null
[ -n "${smi:-}" ] && kill "$smi" 2> /dev/null
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name: $(tail -1 "$side/$name/log.txt")"
done
pack
rm -f /tmp/side_keep.packed "$out/work.tgz"  # the final archive holds exactly the jobs unfinished now
pack_work
