#!/usr/bin/env bash
# GPU check: the GPU tests and the benchmarks, in one run of under 10 minutes (the limits below).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh     # else ./gpu_results
#
# Runs the package from the working tree (PYTHONPATH=.), installs nothing, reaches
# no network. benchmarks.run times the training step first, eagerly (reference,
# triton) and replayed from a CUDA graph (triton-graph, reference-graph), in one
# process, then compiled (reference-compile-graph, reference-compile: each compiles
# the model). Writes $OUT/log (everything printed), $OUT/results.json and
# $OUT/bench.png (benchmarks.run), $OUT/long_sequence.json,
# $OUT/bench_kernels.json (when benchmarks/bench_kernels.py exists),
# $OUT/kernel_profile.json (device time per kernel, benchmarks.kernel_profile),
# $OUT/block_sums.json (the sums of block partials, kernel against torch, benchmarks.bench_block_sums),
# $OUT/launch_cost.json (the host's time a Triton launch of the step, benchmarks.launch_cost),
# $OUT/sharp_focus.json (the kernels' precision at sharp focus against the fp32 reference's, on the
# tensor cores themselves: benchmarks.sharp_focus, 1-ulp moves of a draw where two slots compete),
# $OUT/sass_model.json (warp-instructions the same tree's kernels issue at the large
# shape, benchmarks.sass_model: the measured times calibrate it) and ends with the
# key figures. Every part runs under `timeout`; one that fails or runs out of time is
# named at the end and the later parts still run; a limit of 0 skips a part. The
# limits below add up to 550 s
# (plus 3 s grace each: 580 s at worst), sized from the parts' times in the H100 and H200 logs (bench_kernels
# 11 - 31 s, kernel_profile 11 - 18, block_sums 13 - 16, sharp_focus 15 - 16, sass_model 11, launch_cost 7;
# the GPU tests 34 - 79 s without the two compiled-model tests of stop 37, which first ran at stop 38 and
# each compile a model from an empty cache; the runner's training-step compile, 90 - 100 s on the H200,
# needs T_RUN of about 200, two of them (reference-compile-graph, reference-compile) about 300, and the
# default's budget skips them);
# override them with T_TESTS, T_KERNELS,
# T_PROFILE, T_SUMS, T_LAUNCH, T_PRECISION, T_RUN, T_LONG, T_SASS, and pass extra runner arguments
# in RUN_ARGS, split at spaces, no quotes inside (for example
# RUN_ARGS="--providers reference,triton,triton-graph --filter train_step|paper").
# T_DIFF (default 0: skipped) runs benchmarks.differential on the kernels, both regimes, in fp32 against
# the float64 spec, at random shapes and edge values, drawing for 2/3 of T_DIFF (a draw of new shapes
# compiles kernels), into $OUT/differential.json; DIFF_SEED (default 0) picks other draws.
#
# SWEEP=1 also runs the block-size sweep (benchmarks.sweep_blocks --quick, after
# bench_kernels, whose compiled default kernels it reuses from Triton's cache),
# writing $OUT/sweep_blocks.json, under its own limit T_SWEEP (default 150 s; its
# --budget stops it 15 s before). That adds 153 s at worst: lower other limits (T_TESTS, T_RUN, T_LONG) to
# keep the total, and its 3 s of grace a part, under the machine's ten minutes.
#
# BASE=<commit> (or a FILE.tar from `git archive -o FILE.tar <commit>`, carried to a machine whose .git may
# lack the commit) also runs bench_kernels and kernel_profile from that commit's tree, after this
# tree's, into $OUT/base/ (their JSON, and the commit's hash in $OUT/base/commit; the log is $OUT/log): old
# and new kernels timed on one machine a minute apart, each beside its own reference rows, which should
# agree between the two runs. Limits T_KERNELS and T_PROFILE again (up to 176 s more). Several trees,
# BASE="a.tar b.tar" (split at blanks), each into $OUT/base-a, $OUT/base-b (a leading "base-" dropped; a
# second tree of one name is skipped), T_KERNELS + T_PROFILE each. BASE_SHAPES=large narrows the shapes
# the base trees time: `large` is the one shape both scripts name alike (the paper's is `paper` to
# bench_kernels, `paper-b32` to kernel_profile).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/log"
: > "$LOG"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # a stock image may have python3 alone
[ -n "$PY" ] || { echo "gpu_check: neither python nor python3 is on PATH; set PYTHON" >&2; exit 2; }
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # BASE runs elsewhere
T_TESTS="${T_TESTS:-160}"
T_KERNELS="${T_KERNELS:-45}"
T_PROFILE="${T_PROFILE:-30}"
T_SUMS="${T_SUMS:-25}"
T_RUN="${T_RUN:-115}"
T_LONG="${T_LONG:-60}"
T_SWEEP="${T_SWEEP:-150}"
T_SASS="${T_SASS:-25}"
T_LAUNCH="${T_LAUNCH:-15}"
T_PRECISION="${T_PRECISION:-30}"
T_DIFF="${T_DIFF:-0}"
START=$(date +%s)
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

part() {  # part NAME LIMIT_S COMMAND...; a limit of 0 skips the part
    local name=$1 limit=$2 t0 rc
    shift 2
    if [ "$limit" -eq 0 ]; then
        say "=== $name: skipped (limit 0)"
        return
    fi
    say "=== $name (limit ${limit} s): $*"
    t0=$(date +%s)
    timeout --kill-after=3 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    [ "$rc" -eq 124 ] && say "=== $name: TIMED OUT after ${limit} s"
    say "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
    SUMMARY+=("$name: exit $rc in $(( $(date +%s) - t0 )) s")
}

say "=== gpu_check.sh at $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
part device 45 "$PY" -c "
import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton: not importable:', e)
print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE (torch.cuda.is_available() is False)')
"

part gpu-tests "$T_TESTS" "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider

if [ -f benchmarks/bench_kernels.py ]; then
    part bench_kernels "$T_KERNELS" "$PY" -m benchmarks.bench_kernels --out "$OUT"
else
    say "=== bench_kernels: benchmarks/bench_kernels.py not present, skipped"
fi

part kernel_profile "$T_PROFILE" "$PY" -m benchmarks.kernel_profile --device cuda --out "$OUT"

part block_sums "$T_SUMS" "$PY" -m benchmarks.bench_block_sums --device cuda --out "$OUT"

part launch_cost "$T_LAUNCH" "$PY" -m benchmarks.launch_cost --out "$OUT"

part sharp_focus "$T_PRECISION" "$PY" -m benchmarks.sharp_focus --device cuda --shape 2,11,6,1,1,3 --beta 300 \
    --g 1 --seeds 16 --jitter 1 --json "$OUT/sharp_focus.json"

part differential "$T_DIFF" "$PY" -m benchmarks.differential --device cuda --backends triton,triton-large \
    --dtype fp32 --seconds $(( T_DIFF * 2 / 3 + 1 )) --seed "${DIFF_SEED:-0}" --json "$OUT/differential.json"

read -ra BASES -d "" <<< "${BASE:-}" || true  # split at blanks and newlines
for base in ${BASES[@]+"${BASES[@]}"}; do
    # One base tree: $OUT/base (as before); several: $OUT/base-NAME, NAME the file's or commit's name.
    name="$(basename "$base" .tar)"
    BASE_OUT="$(cd "$OUT" && pwd)/base"
    [ "${#BASES[@]}" -gt 1 ] && BASE_OUT+="-${name#base-}"
    if [ -e "$BASE_OUT" ]; then
        say "=== BASE $base: $BASE_OUT exists (two trees of one name?); skipped"
        SUMMARY+=("base $base: $BASE_OUT exists; skipped")
        continue
    fi
    mkdir -p "$BASE_OUT"
    BASE_TREE="$(mktemp -d)"
    if [ -f "$base" ]; then  # a tree from `git archive -o FILE.tar REV`: the device's .git may lack REV
        tar -x -C "$BASE_TREE" -f "$base" && git get-tar-commit-id < "$base" > "$BASE_OUT/commit"
    else
        git archive "$base" | tar -x -C "$BASE_TREE" && git rev-parse "$base" > "$BASE_OUT/commit"
    fi
    if [ $? -eq 0 ]; then
        # From the base tree's folder: `python -m` puts the current folder first on the path.
        part "bench_kernels at $base" "$T_KERNELS" env -C "$BASE_TREE" PYTHONPATH=. \
            "$PY" -m benchmarks.bench_kernels ${BASE_SHAPES:+--shapes "$BASE_SHAPES"} --out "$BASE_OUT"
        part "kernel_profile at $base" "$T_PROFILE" env -C "$BASE_TREE" PYTHONPATH=. \
            "$PY" -m benchmarks.kernel_profile --device cuda ${BASE_SHAPES:+--shapes "$BASE_SHAPES"} --out "$BASE_OUT"
    else
        say "=== BASE $base: could not extract the base tree or its commit"
        SUMMARY+=("base $base: could not extract the base tree or its commit")
    fi
    rm -rf "$BASE_TREE"
done

if [ "${SWEEP:-0}" = 1 ]; then
    part sweep_blocks "$T_SWEEP" "$PY" -m benchmarks.sweep_blocks --quick --budget $(( T_SWEEP - 15 )) --out "$OUT"
fi

# Budgets a little under the limits, so that each writes its JSON and table itself.
# shellcheck disable=SC2086  # RUN_ARGS is a list of arguments
part benchmarks.run "$T_RUN" "$PY" -m benchmarks.run --device cuda --quick --budget $(( T_RUN - 25 )) --out "$OUT" ${RUN_ARGS:-}

part long_sequence "$T_LONG" "$PY" -m benchmarks.long_sequence --device cuda --gpu-large \
    --budget $(( T_LONG - 10 )) --out "$OUT"

# NCU=1: Nsight Compute's speed-of-light, occupancy, launch, warp-stall and memory sections of the passes over
# memory (large shape) and the on-chip kernels (paper size), one launch each, into $OUT/ncu.txt. Clocks left
# alone (--clock-control none, as the device notes ask). Limit T_NCU (default 90 s).
if [ "${NCU:-0}" = 1 ]; then
    part ncu "${T_NCU:-90}" ncu --clock-control none --log-file "$OUT/ncu.txt" \
        -k 'regex:_similarity_kernel|_read_write|_shift_sharpen_kernel|_mem_bwd_kernel|_onchip' \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis "$PY" -c "
import torch
from benchmarks import common
from benchmarks.shapes import OP_SHAPES
from fastntm import kernels
for name in ('large', 'paper-b32'):
    shape = OP_SHAPES[name]
    x = [t.requires_grad_() for t in common.op_inputs(shape, torch.device('cuda'))]
    out = kernels.memory_step(*x, shape.R)
    torch.autograd.backward(out, common.cotangents(out))
torch.cuda.synchronize()
print('ncu target done')
"
fi

part sass_model "$T_SASS" "$PY" -m benchmarks.sass_model --shape large --json "$OUT/sass_model.json"

say ""
say "=== key figures ($(( $(date +%s) - START )) s in all)"
"$PY" -m benchmarks.summary "$OUT" 2>&1 | tee -a "$LOG"
for line in "${SUMMARY[@]}"; do say "  $line"; done
say "log: $LOG"
for line in "${SUMMARY[@]}"; do
    case "$line" in *"exit 0 "*) ;; *) exit 1 ;; esac
done
exit 0
