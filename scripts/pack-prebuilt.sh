#!/usr/bin/env bash
# Packs a build directory made on the CPU machine (nvcc 13.0, sm_90a, every instantiation) for a
# run on the lent GPU machine, so that no device time goes into compiling: packs it, without
# object files and static libraries, into .devbuild/prebuilt.tgz (ignored by git), with the
# absolute source and build paths that its CTest files name. `scripts/gpu-check.sh --prebuilt
# .devbuild` there recreates those paths as links and runs the tests and benchmarks from it.
# Carry .devbuild and .devdeps (scripts/pack-device-deps.sh).
#
# Usage: scripts/pack-prebuilt.sh [BUILD_DIR]   (default: build-dev)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build-dev}
[[ -d ${build} ]] || { echo "pack-prebuilt: no build directory ${build}" >&2; exit 1; }
dest=.devbuild
rm -rf "${dest}"
mkdir -p "${dest}"
# Everything but compiler outputs that nothing runs (object files, static libraries, dependency
# logs, the install consumer's scratch tree, test scratch folders).
tar -C "${build}" -cf - --exclude='*.o' --exclude='*.a' --exclude='*.d' --exclude='.ninja_*' \
  --exclude='install_consumer' --exclude='replay_roundtrip' --exclude='replay_numpy_roundtrip' \
  --exclude='CMakeFiles' . | tar -C "${dest}" -xf -
# Host symbols are not needed to run; strip them to fit the device tool's 64 MiB.
find "${dest}" -type f -perm -u+x -exec sh -c 'file -b "$1" | grep -q ELF && strip "$1"' _ {} \;
printf '%s\n%s\n' "${PWD}" "$(cd "${build}" && pwd)" > "${dest}/KVC_PREBUILT_PATHS"
# One compressed archive (binaries shrink about 4x): gpu-check.sh --prebuilt unpacks it.
tar -C "${dest}" -czf prebuilt.tgz . && rm -rf "${dest}" && mkdir -p "${dest}" &&
  mv prebuilt.tgz "${dest}/"
grep -qx '/.devbuild/' .git/info/exclude 2>/dev/null || echo '/.devbuild/' >> .git/info/exclude
du -sh "${dest}"
