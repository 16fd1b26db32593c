#!/bin/bash
# Runs several experiment sweeps side by side on one lent GPU until a deadline, then packs what they wrote.
#
#   bash experiments/run_side_by_side.sh DEADLINE_S NAME:EXPERIMENT[:EXTRA ARGS] ...
#   e.g. bash experiments/run_side_by_side.sh 500 "mqar_a:mqar:--models=attention,mamba" "joint_recall:joint_recall"
#
# The small recall and LM models leave most of an H100 idle when run one at a time (a d_model 64 MQAR job: ~80 s
# alone; six sweeps side by side finished about twice the work in the same time, 2026-12-06). Each NAME starts from
# the committed experiments/EXPERIMENT/results/full.json (finished jobs are skipped; an --models subset runs only
# its jobs), writes to /tmp/side/NAME, and is stopped at DEADLINE_S with SIGTERM (the running job saves its
# checkpoint and the sweep records it as preempted). Every 20 s and at the end each NAME's full.json is copied to
# $OUT/NAME.json, and everything (reports, plots, logs, nvidia-smi samples) is packed into $OUT/side.tgz.
# Merge parts of one experiment here with: python experiments/EXPERIMENT/run.py --size=full --merge=A.json,B.json
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
mkdir -p /tmp/side "$out"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > /tmp/side/smi.csv 2>&1 &
  smi=$!
fi
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  rest=${spec#*:}
  exp=${rest%%:*}
  extra=""
  [ "$rest" != "$exp" ] && extra=${rest#*:}
  mkdir -p "/tmp/side/$name"
  prev="experiments/$exp/results/${SIZE:-full}.json"
  [ -f "$prev" ] && cp "$prev" "/tmp/side/$name/${SIZE:-full}.json"
  (
    timeout -k 20 "$deadline" python3 "experiments/$exp/run.py" --size="${SIZE:-full}" --out="/tmp/side/$name" \
      --workdir="/tmp/side_work/$name" --no-progress $extra > "/tmp/side/$name/log.txt" 2>&1
    echo "rc=$?" >> "/tmp/side/$name/log.txt"
  ) &
  pids+=($!)
done
copy() {
  for spec in "$@"; do
    name=${spec%%:*}
    [ -f "/tmp/side/$name/${SIZE:-full}.json" ] && cp "/tmp/side/$name/${SIZE:-full}.json" "$out/$name.json"
  done
}
(while true; do sleep 20; copy "$@"; done) &
copier=$!
wait "${pids[@]}"
kill "$copier" 2> /dev/null
[ -n "${smi:-}" ] && kill "$smi" 2> /dev/null
copy "$@"
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name: $(tail -1 "/tmp/side/$name/log.txt")"
done
tar czf "$out/side.tgz" -C /tmp/side .
