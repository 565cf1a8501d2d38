#!/usr/bin/env bash
# Profiles the decode and prefill attention kernels with Nsight Compute (ncu) on the shapes that
# miss their targets, to name what limits them: per-kernel duration, DRAM bytes read against
# the bytes the shape must read (bytes re-read), DRAM throughput, achieved occupancy and its
# limiters, tensor-pipe activity, and the top warp stall reasons. One CSV per shape in $OUT and
# a table on stdout. ncu flushes the caches before each kernel replay (--cache-control all), so
# the DRAM bytes are those of a cold cache, as in the rotated benchmarks.
# Not run in CI (no GPU there).
#
# Usage: scripts/gpu-profile.sh --build-dir DIR [--decode REGEX...] [--prefill REGEX...]
#   --build-dir DIR  a build holding benchmarks/kvc_bench_decode and kvc_bench_prefill
#   --decode NAME    a decode benchmark name (bench_decode's decode/<key>), repeatable
#   --prefill NAME   a prefill benchmark name (bench_prefill's prefill/<key>), repeatable
#   --kernels N      kernels profiled per shape (default 6: a few launches of each kernel)
#   --source NAME    a prefill benchmark name: one launch of its attention kernel with warp-stall
#                    sampling per SASS instruction (SourceCounters), exported to
#                    $OUT/source-<name>.csv (ncu's source page), summarised by
#                    scripts/source-summary.py (stall reasons, opcodes, top instructions)
#   --source-store NAME  the same for the prepare kernel of a store-prefill benchmark
#                    (bench_prefill_store's prefill_store/<key>)
#   --source-kernel REGEX  the kernel of the --source profiles (default prefill_attention_kernel;
#                    e.g. prefill_plan_kernel)
#   --store NAME     a store-prefill benchmark name (prefill_store/<key>): the metrics above for
#                    every store-side kernel of its first timing (allocate, prepare, DMC scan or
#                    compact, commit), repeatable
#   --source-store-kernel REGEX  the kernel of the --source-store profiles (default
#                    prefill_prepare_kernel; e.g. prefill_commit_kernel)
# Output: $OUT/profile-<name>.csv ($OUT defaults to ./out); the table last.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
build_dir=""
decode=()
prefill=()
source=()
source_store=()
store=()
source_store_kernel=prefill_prepare_kernel
kernels=6
source_kernel=prefill_attention_kernel
while (($# > 0)); do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --decode) decode+=("${2:?--decode needs a name}"); shift ;;
    --prefill) prefill+=("${2:?--prefill needs a name}"); shift ;;
    --kernels) kernels=${2:?--kernels needs a number}; shift ;;
    --source) source+=("${2:?--source needs a name}"); shift ;;
    --source-store) source_store+=("${2:?--source-store needs a name}"); shift ;;
    --source-kernel) source_kernel=${2:?--source-kernel needs a regex}; shift ;;
    --store) store+=("${2:?--store needs a name}"); shift ;;
    --source-store-kernel)
      source_store_kernel=${2:?--source-store-kernel needs a regex}; shift ;;
    -h | --help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-profile: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n ${build_dir} ]] || { echo "gpu-profile: --build-dir is required" >&2; exit 2; }
command -v ncu > /dev/null || { echo "gpu-profile: ncu not found" >&2; exit 2; }
out=${OUT:-out}
mkdir -p "${out}"

metrics=(
  gpu__time_duration.sum
  dram__bytes_read.sum
  dram__bytes_write.sum
  dram__throughput.avg.pct_of_peak_sustained_elapsed
  lts__t_bytes.sum
  sm__throughput.avg.pct_of_peak_sustained_elapsed
  sm__warps_active.avg.pct_of_peak_sustained_active
  sm__maximum_warps_per_active_cycle_pct
  launch__grid_size
  launch__block_size
  launch__registers_per_thread
  launch__occupancy_limit_registers
  launch__occupancy_limit_shared_mem
  launch__occupancy_limit_warps
  sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
  smsp__average_warp_latency_issue_stalled_long_scoreboard
  smsp__average_warp_latency_issue_stalled_barrier
  smsp__average_warp_latency_issue_stalled_short_scoreboard
  smsp__average_warp_latency_issue_stalled_math_pipe_throttle
  smsp__average_warp_latency_issue_stalled_wait
)
metric_list=$(IFS=,; echo "${metrics[*]}")

# profile <binary> <benchmark name> <kernel regex>
profile() {
  local binary=$1 name=$2 regex=$3
  local file="${out}/profile-${name//\//_}.csv"
  ncu --clock-control none --cache-control all --csv --page raw --print-units base \
    -k "regex:${regex}" \
    -c "${kernels}" --metrics "${metric_list}" \
    "${binary}" --benchmark_filter="^${name}/" > "${file}" 2> "${file}.log"
  echo "${file}"
}

# source_profile <binary> <benchmark name> <kernel regex>: per-instruction stall samples of one
# launch of the kernel.
source_profile() {
  local binary=$1 name=$2 regex=$3 report="${out}/source-${2//\//_}"
  ncu --clock-control none --section SourceCounters --section WarpStateStats -k \
    "regex:${regex}" -c 1 -f -o "${report}" \
    "${build_dir}/benchmarks/${binary}" --benchmark_filter="^${name}/" \
    > "${report}.log" 2>&1
  ncu -i "${report}.ncu-rep" --page source --csv --print-source sass > "${report}.csv" \
    2>> "${report}.log"
  ncu -i "${report}.ncu-rep" --page details --csv > "${report}-details.csv" 2>> "${report}.log"
  python3 scripts/source-summary.py "${report}.csv" "${name}: ${regex}"
}

files=()
for name in "${source[@]}"; do
  source_profile kvc_bench_prefill "${name}" "${source_kernel}"
done
for name in "${source_store[@]}"; do
  source_profile kvc_bench_prefill_store "${name}" "${source_store_kernel}"
done
for name in "${decode[@]}"; do
  files+=("$(profile "${build_dir}/benchmarks/kvc_bench_decode" "${name}" 'decode_')")
done
for name in "${prefill[@]}"; do
  files+=("$(profile "${build_dir}/benchmarks/kvc_bench_prefill" "${name}" 'prefill_')")
done
for name in "${store[@]}"; do
  files+=("$(profile "${build_dir}/benchmarks/kvc_bench_prefill_store" "${name}" \
    'prefill_(allocate|prepare|dmc_scan|compact|commit)')")
done
python3 - "${files[@]}" << 'EOF'
import csv, sys
def num(value):
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return float("nan")
print(f"{'shape':<34} {'kernel':<26} {'us':>7} {'DRAM rd MB':>10} {'DRAM %':>6} "
      f"{'occ %':>5} {'regs':>4} {'lim r/s/w':>9} {'tensor %':>8} {'lsb/bar/ssb/wait':>18}")
for path in sys.argv[1:]:
    shape = path.split("profile-", 1)[1].rsplit(".csv", 1)[0]
    try:
        rows = list(csv.DictReader(line for line in open(path) if line.startswith('"')))
    except OSError:
        rows = []
    rows = [r for r in rows if r.get("Kernel Name") and r.get("ID", "").isdigit()]
    if not rows:
        print(f"{shape:<34} (no kernels profiled: see {path}.log)")
        continue
    seen = set()
    for r in rows:
        kernel = r["Kernel Name"].split("<")[0].split("(")[0]
        if kernel in seen:
            continue
        seen.add(kernel)
        get = lambda key: num(r.get(key, "nan"))
        stalls = "/".join(f"{get('smsp__average_warp_latency_issue_stalled_' + s + '.ratio'):.0f}"
                          for s in ("long_scoreboard", "barrier", "short_scoreboard", "wait"))
        limits = "/".join(f"{get('launch__occupancy_limit_' + s):.0f}"
                          for s in ("registers", "shared_mem", "warps"))
        print(f"{shape:<34} {kernel[:26]:<26} {get('gpu__time_duration.sum') / 1e3:7.1f} "
              f"{get('dram__bytes_read.sum') / 1e6:10.2f} "
              f"{get('dram__throughput.avg.pct_of_peak_sustained_elapsed'):6.1f} "
              f"{get('sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f} "
              f"{get('launch__registers_per_thread'):4.0f} {limits:>9} "
              f"{get('sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active'):8.1f} "
              f"{stalls:>18}")
print("us = gpu__time_duration (ncu, cold caches, one launch); DRAM rd = dram__bytes_read; "
      "occ = achieved warps / max; lim r/s/w = blocks per SM allowed by registers / shared "
      "memory / warps; stalls = average cycles per warp stalled on long scoreboard / barrier / "
      "short scoreboard / wait.")
EOF
