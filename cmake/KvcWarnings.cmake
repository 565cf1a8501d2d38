# Warning flags for kvc's own targets (tests, examples, benchmarks); consumers are not affected.
add_library(kvc_warnings INTERFACE)
target_compile_options(kvc_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra --expt-relaxed-constexpr>)
