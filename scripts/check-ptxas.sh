#!/usr/bin/env bash
# Recompiles the prefill-attention instances of a configured build with `ptxas -v` and fails when
# ptxas reports that it serialised the kernel's wgmma instructions (info C7520: "wgmma.mma_async
# instructions are serialized ..."). ptxas does that silently, without -v, when a wgmma sits in a
# code path it cannot prove warp-uniform; every product then waits for the previous one, and the
# kernel runs about 25 % slower (benchmarks/RESULTS.md, 2026-12-04, sixth session). Also fails
# when a 16-bit head-dim-64/128 (wgmma) instance spills, and prints each kernel's registers and
# spills. Needs no GPU; CI runs it (.ci/run).
#
# Usage: scripts/check-ptxas.sh BUILD_DIR [REGEX]
#   BUILD_DIR  a Ninja build configured with CUDA for sm_90a
#   REGEX      only the instances whose name matches (e.g. 'bf16_d128'; default: all)
set -euo pipefail
build=${1:?usage: scripts/check-ptxas.sh BUILD_DIR [REGEX]}
only=${2:-.}
command -v ninja >/dev/null || { echo "check-ptxas: ninja not found" >&2; exit 2; }
if [[ ! -f ${build}/build.ninja ]]; then
  echo "check-ptxas: ${build} is not a Ninja build directory" >&2
  exit 2
fi
mapfile -t commands < <(ninja -C "${build}" -t commands kvc_prefill_instances 2>/dev/null |
  grep -E 'nvcc .*-c [^ ]*prefill_[a-z0-9]+_d[0-9]+_g[0-9]+\.cu' || true)
if ((${#commands[@]} == 0)); then
  echo "check-ptxas: no prefill instances to check (no CUDA in ${build}?)"
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "${scratch}"' EXIT
failed=0
for command in "${commands[@]}"; do
  [[ ${command} == *sm_90a* ]] || continue  # wgmma exists only there
  source_file=$(sed -E 's/.* -c ([^ ]*\.cu).*/\1/' <<<"${command}")
  name=$(basename "${source_file}" .cu)
  [[ ${name} =~ ${only} ]] || continue
  # The same command with ptxas -v and a scratch object.
  (cd "${build}" && eval "${command%% -o *} -Xptxas -v -o ${scratch}/${name}.o") \
    >"${scratch}/${name}.log" 2>&1 || { cat "${scratch}/${name}.log"; exit 1; }
  summary=$(grep -A2 'Function properties for .*prefill_attention_kernel' "${scratch}/${name}.log" |
    grep -oE '[0-9]+ bytes spill stores|Used [0-9]+ registers' | paste -sd ' ' -)
  spills=$(grep -oE '[0-9]+ bytes spill stores' <<<"${summary}" | grep -oE '^[0-9]+' || echo 0)
  if grep -q 'C7520' "${scratch}/${name}.log"; then
    echo "check-ptxas: ${name}: wgmma serialised by ptxas (C7520)   ${summary}"
    grep 'C7520' "${scratch}/${name}.log" | cut -c1-200
    failed=1
  elif [[ ${name} =~ _(fp16|bf16)_d(64|128)_ ]] && ((spills > 0)); then
    # The wgmma instances have never spilled; a spill there is a performance regression.
    echo "check-ptxas: ${name}: the wgmma instance spills   ${summary}"
    failed=1
  else
    echo "check-ptxas: ${name}: ok   ${summary}"
  fi
done
if ((failed)); then
  echo "check-ptxas: failed (C7520: a wgmma sits in a branch ptxas cannot prove warp-uniform," \
    "see PrefillTcWarp::step in kvc/attention/prefill_warp.cuh; or a wgmma instance spills)"
  exit 1
fi
