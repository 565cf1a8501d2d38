# Precompiled kernels: two static libraries, each one generated translation unit per supported
# (dtype, head dim, group size) (parallel builds, bounded compile time per file) plus a runtime
# dispatcher (src/instantiations/<family>_dispatch.cu, which reads the same set from
# src/instantiations/compiled_set.hpp):
#   kvc_decode_instances   decode attention (DefaultVariant), kvc::decode_attention
#   kvc_prefill_instances  prefill attention (DefaultVariant), kvc::prefill_attention
# With KVC_CI_MINIMAL=ON only bf16, head dim 128, group size 4 is compiled (both libraries).
#
# Included from the top-level CMakeLists.txt after the `kvc` target exists. In-tree consumers
# that need the precompiled kernels (the GPU tests and the benchmarks) are linked at the end of
# the top-level directory's processing, once their targets exist.
if(NOT KVC_WITH_CUDA)
  return()
endif()

if(KVC_CI_MINIMAL)
  set(KVC_INSTANCE_DTYPES bf16)
  set(KVC_INSTANCE_HEAD_DIMS 128)
  set(KVC_INSTANCE_GROUPS 4)
else()
  set(KVC_INSTANCE_DTYPES fp16 bf16 fp32)
  set(KVC_INSTANCE_HEAD_DIMS 64 128 256)
  set(KVC_INSTANCE_GROUPS 1 2 4 8)
endif()

# Links `library` into each of the remaining arguments that is a target (deferred call).
function(_kvc_link_instances library)
  foreach(_target IN LISTS ARGN)
    if(TARGET ${_target})
      target_link_libraries(${_target} PRIVATE ${library})
    endif()
  endforeach()
endfunction()

# kvc_add_instance_library(<family> CONSUMERS <target>...)
# Builds the static library kvc_<family>_instances (alias kvc::<family>_instances, export name
# <family>_instances) from src/instantiations/<family>_dispatch.cu and one copy of
# src/instantiations/<family>_instance.cu.in per (dtype, head dim, group size) in
# KVC_INSTANCE_DTYPES x KVC_INSTANCE_HEAD_DIMS x KVC_INSTANCE_GROUPS, and links it into each
# CONSUMERS target that exists at the end of the top-level directory.
function(kvc_add_instance_library family)
  cmake_parse_arguments(PARSE_ARGV 1 _arg "" "" "CONSUMERS")
  set(_type_fp16 half)
  set(_type_bf16 __nv_bfloat16)
  set(_type_fp32 float)
  set(_dir "${PROJECT_SOURCE_DIR}/src/instantiations")
  set(_sources "${_dir}/${family}_dispatch.cu")
  foreach(_dtype IN LISTS KVC_INSTANCE_DTYPES)
    foreach(_dim IN LISTS KVC_INSTANCE_HEAD_DIMS)
      foreach(_group IN LISTS KVC_INSTANCE_GROUPS)
        set(KVC_INSTANCE_TYPE "${_type_${_dtype}}")
        set(KVC_INSTANCE_HEAD_DIM ${_dim})
        set(KVC_INSTANCE_GROUP ${_group})
        set(_file "${PROJECT_BINARY_DIR}/kvc_instances/${family}_${_dtype}_d${_dim}_g${_group}.cu")
        configure_file("${_dir}/${family}_instance.cu.in" "${_file}" @ONLY)
        list(APPEND _sources "${_file}")
      endforeach()
    endforeach()
  endforeach()

  set(_lib kvc_${family}_instances)
  add_library(${_lib} STATIC ${_sources})
  add_library(kvc::${family}_instances ALIAS ${_lib})
  set_target_properties(${_lib} PROPERTIES EXPORT_NAME ${family}_instances
                                           POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(${_lib} PUBLIC kvc::kvc)
  if(TARGET kvc_warnings)
    target_link_libraries(${_lib} PRIVATE $<BUILD_INTERFACE:kvc_warnings>)
  endif()
  if(KVC_CI_MINIMAL)
    target_compile_definitions(${_lib} PRIVATE KVC_INSTANCES_MINIMAL=1)
  endif()
  # A deferred call's arguments are evaluated when it runs: spell the values out now.
  list(JOIN _arg_CONSUMERS " " _consumers)
  cmake_language(EVAL CODE "cmake_language(DEFER CALL _kvc_link_instances ${_lib} ${_consumers})")
endfunction()

kvc_add_instance_library(decode CONSUMERS kvc_gpu_tests kvc_bench_decode)
kvc_add_instance_library(prefill CONSUMERS kvc_gpu_tests kvc_bench_prefill kvc_bench_prefill_store)
