#!/usr/bin/env bash
# Packs what the GPU machine lacks for a full build (doctest and Google Benchmark: headers, the
# shared library and their CMake package files) into .devdeps/ of the repository root, a folder
# git ignores (.git/info/exclude). Carry it to the device (`carry: [".devdeps"]`);
# scripts/gpu-check.sh and scripts/bench-suite.sh then configure with
# CMAKE_PREFIX_PATH=.devdeps and LD_LIBRARY_PATH=.devdeps/lib/x86_64-linux-gnu.
# Run here (Debian 12 with doctest-dev and libbenchmark-dev installed). About 1 MB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.devdeps
rm -rf "${dest}"
mkdir -p "${dest}/include" "${dest}/lib/cmake" "${dest}/lib/x86_64-linux-gnu/cmake"
cp -r /usr/include/doctest /usr/include/benchmark "${dest}/include/"
cp -r /usr/lib/cmake/doctest "${dest}/lib/cmake/"
cp -r /usr/lib/x86_64-linux-gnu/cmake/benchmark "${dest}/lib/x86_64-linux-gnu/cmake/"
cp -P /usr/lib/x86_64-linux-gnu/libbenchmark.so* /usr/lib/x86_64-linux-gnu/libbenchmark_main.a \
  "${dest}/lib/x86_64-linux-gnu/"
# (The package files locate everything relative to themselves: the copy is relocatable.)
grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
du -sh "${dest}"
