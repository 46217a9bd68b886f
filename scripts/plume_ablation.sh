#!/usr/bin/env bash
# PLUME's curriculum ablation as one command: for every start model and run seed, train the curriculum
# arm and the fully latent arm (plume.curriculum=false) with the same budget, score both on the same
# fresh test queries (`rime eval --per-query`), then compare them paired per seed and across seeds,
# with the start model as the group (`rime compare --groups`): pairs fine-tuned from one checkpoint are
# not independent. A single Hit@1 pair says little here: the training seed moves it more than the
# test queries do (README, PLUME section).
#
#   bash scripts/plume_ablation.sh NAME START[,START...] SEED[,SEED...] [rime train args...]
#   e.g. bash scripts/plume_ablation.sh ref runs/ref-s0/final,runs/ref-s1/final 0,1,2
#
# START is anything model.spec takes (a saved embedder folder, hf:<local path>, a zoo name). Extra
# arguments go to every `rime train` (e.g. --set learners.precision=bf16 on a GPU). Environment:
#   CONFIG        training config of both arms (default configs/plume-referring.yaml)
#   TEST_DATA     fresh test queries (default data/synth-ref-test1000; generated when missing)
#   TEST_QUERIES  queries per task scored, and generated (default 1000)
#   TASKS         tasks of generated test data and of the eval (default referring)
#   RUNS_DIR      where the training runs go (default runs)
#   OUT           reports, logs and the comparison (default runs/ablations/NAME)
#   PAIR, METRIC  what is compared (default latent->latent, hit@1)
#   ZERO_STEP_CONTROL  1 (default): also score each curriculum arm's latent mode with no latent step
#                 (`rime eval --latent-steps 0`) and compare it paired with the same model at its own K
#                 (B = K steps, A = 0 steps) into $OUT/latent_steps.json: whether the curriculum's gain
#                 comes from the latent steps or from a better prefix pass (on the chain control it was
#                 the latter, README); always latent->latent. 0 skips it.
#   PARALLEL      arms trained and scored at once (default 1). On GPUs, join one Ray cluster
#                 (`ray start --head`, a profile's --sets give cluster.address=auto) so Ray places
#                 the arms side by side; an arm whose placement waits past cluster.placement_timeout_s
#                 fails with Ray's free resources in its log. Without a cluster each arm starts its own
#                 local Ray, which does not share the machine's GPUs out between arms.
#   SUBMIT        a Ray dashboard address (http://HEAD:8265): every arm trains as a Ray job
#                 (`rime submit --follow`; `rime jobs list` shows them) instead of a local driver.
#                 Extra arguments then go to `rime submit` (e.g. --profile clusters/profiles/1gpu.yaml).
#                 RUNS_DIR is made absolute (a path on the cluster). With MLFLOW_TRACKING_URI an
#                 http(s) server (forwarded to the jobs), each arm's eval here scores the model its job
#                 logged there (the `models:/` URI in the job's log; tracking.log_model, on by default):
#                 no storage shared with the cluster is needed. Otherwise the evals read
#                 RUNS_DIR/<run>/final here, so it must be storage both see (the head's disk when the
#                 script runs there). The address is checked before any arm starts. Stopping the
#                 script does not stop a submitted arm: `rime jobs stop ID --address SUBMIT`.
# Re-running skips every arm whose report exists, so an interrupted ablation continues. After a failed
# arm no new arm starts; the ones running finish (and are kept for the re-run), then the script exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '9,10p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
NAME=$1; STARTS=$2; SEEDS=$3; shift 3
RIME=${RIME:-.venv/bin/rime}
CONFIG=${CONFIG:-configs/plume-referring.yaml}
TEST_DATA=${TEST_DATA:-data/synth-ref-test1000}
TEST_QUERIES=${TEST_QUERIES:-1000}
TASKS=${TASKS:-referring}
RUNS_DIR=${RUNS_DIR:-runs}
OUT=${OUT:-runs/ablations/$NAME}
PAIR=${PAIR:-latent->latent}
METRIC=${METRIC:-hit@1}
PARALLEL=${PARALLEL:-1}
SUBMIT=${SUBMIT:-}
ZERO_STEP_CONTROL=${ZERO_STEP_CONTROL:-1}

[ -x "$RIME" ] || { echo "plume_ablation: $RIME not found; run bash scripts/setup.sh first (or set RIME)" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "plume_ablation: CONFIG=$CONFIG does not exist" >&2; exit 2; }
[[ $ZERO_STEP_CONTROL =~ ^[01]$ ]] || { echo "plume_ablation: ZERO_STEP_CONTROL=$ZERO_STEP_CONTROL must be 0 or 1" >&2; exit 2; }
[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || { echo "plume_ablation: PARALLEL=$PARALLEL must be a positive integer (arms run at once)" >&2; exit 2; }
IFS=, read -r -a start_list <<< "$STARTS"
IFS=, read -r -a seed_list <<< "$SEEDS"
for s in "${seed_list[@]}"; do
  [[ $s =~ ^[0-9]+$ ]] || { echo "plume_ablation: seed '$s' is not a non-negative integer (SEEDS=$SEEDS)" >&2; exit 2; }
done
for m in "${start_list[@]}"; do
  [[ -n $m && $m != *" "* ]] || { echo "plume_ablation: start model '$m' is empty or has a space (STARTS=$STARTS)" >&2; exit 2; }
done
if [ "$(printf '%s\n' "${start_list[@]}" | sort | uniq -d)" != "" ]; then
  echo "plume_ablation: a start model is listed twice (STARTS=$STARTS); list each once, runs from one" \
       "checkpoint are one group" >&2
  exit 2
fi
if [ $(( ${#start_list[@]} * ${#seed_list[@]} )) -lt 2 ]; then
  echo "plume_ablation: one start model and one seed give one pair, which cannot tell a seed's noise from" \
       "an effect; give at least 2 seeds (or 2 start models)" >&2
  exit 2
fi
if [ -n "$SUBMIT" ]; then
  RUNS_DIR=$(realpath -m "$RUNS_DIR")  # the job runs in a copy of the checkout: a relative dir would stay there
  "$RIME" jobs list --address "$SUBMIT" > /dev/null \
    || { echo "plume_ablation: SUBMIT=$SUBMIT is not a Ray dashboard that answers (see above); start one with" \
              "'ray start --head' or unset SUBMIT to train locally" >&2; exit 2; }
  echo "[ablation] arms train as Ray jobs on $SUBMIT, writing to $RUNS_DIR" >&2
fi
mkdir -p "$OUT/reports" "$OUT/logs"

if [ ! -f "$TEST_DATA/test/queries.parquet" ]; then
  echo "[ablation] generating $TEST_QUERIES test queries per task ($TASKS) in $TEST_DATA"
  "$RIME" data synth --out "$TEST_DATA" --train 0 --val 0 --test "$TEST_QUERIES" --tasks "$TASKS" > "$OUT/logs/test-data.log" 2>&1 \
    || { echo "plume_ablation: generating $TEST_DATA failed, see $OUT/logs/test-data.log" >&2; exit 1; }
fi

report_of() { echo "$OUT/reports/m$1-seed$2-$3.json"; }  # start_index seed arm
control_of() { echo "$OUT/reports/m$1-seed$2-cur-k0.json"; }  # start_index seed: the curriculum arm at K=0
needs_control() { [ "$ZERO_STEP_CONTROL" = 1 ] && [ "$1" = cur ]; }  # arm

score() {  # model report what log_name [rime eval args...]: score the model per query on TEST_DATA into report
  local model=$1 report=$2 what=$3 log="$OUT/logs/eval-$4.log"
  shift 4
  "$RIME" eval --model "$model" --data "$TEST_DATA" --split test --tasks "$TASKS" --max-queries-per-task "$TEST_QUERIES" \
    --per-query --mlflow none --out "$report.tmp" "$@" > "$log" 2>&1 \
    || { echo "plume_ablation: eval of $what failed, see $log" >&2; return 1; }
  mv "$report.tmp" "$report"
}

run_arm() {  # start_index start seed arm [rime train args...]: train and score the arm (what is missing)
  local i=$1 start=$2 seed=$3 arm=$4
  shift 4
  local run="$NAME-m$i-seed$seed-$arm" report control model
  report=$(report_of "$i" "$seed" "$arm")
  [ -f "$report" ] || train_and_score "$i" "$start" "$seed" "$arm" "$@" || return 1
  control=$(control_of "$i" "$seed")
  needs_control "$arm" && [ ! -f "$control" ] || return 0
  model=$(sed -n 's/^  "model": "\(.*\)",$/\1/p' "$report" | head -n 1)  # what the report scored (a path or models:/ URI)
  echo "[ablation] eval $run with 0 latent steps" >&2
  score "$model" "$control" "$run with 0 latent steps" "$run-k0" --query-mode latent --cand-mode latent --latent-steps 0
}

train_and_score() {  # start_index start seed arm [rime train args...]: train the arm, score it into its report
  local i=$1 start=$2 seed=$3 arm=$4
  shift 4
  local run="$NAME-m$i-seed$seed-$arm" report
  report=$(report_of "$i" "$seed" "$arm")
  local extra=()
  [ "$arm" = nocur ] && extra=(--set plume.curriculum=false --set plume.probe_queries_per_task=0)
  local train=(train "$CONFIG")
  if [ -n "$SUBMIT" ]; then
    train=(submit "$CONFIG" --address "$SUBMIT" --follow)
    if [ -e "$start" ]; then start=$(realpath "$start"); fi  # a local model folder: runs/ is not uploaded with the checkout
  fi
  echo "[ablation] train $run (model.spec=$start${SUBMIT:+, as a Ray job})" >&2
  "$RIME" "${train[@]}" --overwrite --set run.name="$run" --set run.seed="$seed" --set run.out_dir="$RUNS_DIR" \
    --set model.spec="$start" "${extra[@]}" "$@" > "$OUT/logs/$run.log" 2>&1 \
    || { echo "plume_ablation: training $run failed, see $OUT/logs/$run.log" >&2; return 1; }
  local model="$RUNS_DIR/$run/final" uri=""
  if [ -n "$SUBMIT" ] && [[ ${MLFLOW_TRACKING_URI:-} =~ ^https?:// ]]; then
    # the job logged its embedder to the tracking server this machine also sees: score that
    uri=$(sed -n 's/.*"model_uri": "\([^"]*\)".*/\1/p' "$OUT/logs/$run.log" | tail -n 1)
    if [ -n "$uri" ]; then
      model=$uri
    elif [ ! -d "$model" ]; then
      echo "plume_ablation: the job of $run logged no model (tracking.log_model=false?) and $model is not" \
           "visible here; keep tracking.log_model=true or put RUNS_DIR on shared storage" >&2
      return 1
    fi
  fi
  echo "[ablation] eval $run ($model) on $TEST_DATA" >&2
  score "$model" "$report" "$run" "$run" --query-mode disc,latent --cand-mode disc,latent || return 1
  echo "[ablation] scored $run" >&2
}

reports=(); controls=(); groups=(); todo=()
for i in "${!start_list[@]}"; do
  for seed in "${seed_list[@]}"; do
    for arm in nocur cur; do  # compare takes A B per pair: A = no curriculum, B = curriculum
      reports+=("$(report_of "$i" "$seed" "$arm")")
      if [ ! -f "${reports[-1]}" ] || { needs_control "$arm" && [ ! -f "$(control_of "$i" "$seed")" ]; }; then
        todo+=("$i $seed $arm")
      fi
    done
    controls+=("$(control_of "$i" "$seed")" "$(report_of "$i" "$seed" cur)")  # A = 0 latent steps, B = the model's K
    groups+=("${start_list[$i]}")
  done
done

# at most PARALLEL arms at once (PARALLEL=1: one after another); a failure stops new arms from starting.
# Polling with `wait PID` rather than `wait -n`: bash forgets an arm that ends outside `wait -n`.
pids=(); failed=0
wait_below() {  # N: wait until fewer than N arms run, counting the failed ones
  while [ ${#pids[@]} -ge "$1" ]; do
    local alive=() p
    for p in "${pids[@]}"; do
      if kill -0 "$p" 2>/dev/null; then alive+=("$p"); else wait "$p" || failed=$((failed + 1)); fi
    done
    pids=(${alive[@]+"${alive[@]}"})
    if [ ${#pids[@]} -ge "$1" ]; then sleep 2; fi
  done
}
for job in ${todo[@]+"${todo[@]}"}; do
  wait_below "$PARALLEL"
  [ "$failed" -eq 0 ] || break
  read -r i seed arm <<< "$job"
  run_arm "$i" "${start_list[$i]}" "$seed" "$arm" "$@" &
  pids+=($!)
done
wait_below 1
if [ "$failed" -gt 0 ]; then
  echo "plume_ablation: $failed arm(s) failed (logs above); the arms scored so far are kept, re-run to continue" >&2
  exit 1
fi

group_args=()
[ ${#start_list[@]} -gt 1 ] && group_args=(--groups "$(IFS=,; echo "${groups[*]}")")
"$RIME" compare "${reports[@]}" --pair "$PAIR" --metric "$METRIC" "${group_args[@]}" --json > "$OUT/compare.txt"
tail -n 1 "$OUT/compare.txt" > "$OUT/compare.json"
sed '$d' "$OUT/compare.txt"
echo "[ablation] B = curriculum, A = no curriculum; reports in $OUT/reports, comparison in $OUT/compare.json"
if [ "$ZERO_STEP_CONTROL" = 1 ]; then
  echo
  echo "[ablation] the latent steps' own share, in the curriculum arm: B = its K latent steps, A = 0 steps"
  "$RIME" compare "${controls[@]}" --pair "latent->latent" --metric "$METRIC" "${group_args[@]}" --json > "$OUT/latent_steps.txt"
  tail -n 1 "$OUT/latent_steps.txt" > "$OUT/latent_steps.json"
  sed '$d' "$OUT/latent_steps.txt"
  echo "[ablation] comparison in $OUT/latent_steps.json"
fi
