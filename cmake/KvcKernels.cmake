# Precompiled kernels: the static library `kvc_decode_instances` holds decode attention
# (DefaultVariant) for every supported (dtype, head dim, group size), one generated translation
# unit per configuration (parallel builds, bounded compile time per file), plus the runtime
# dispatcher `kvc::decode_attention` (src/instantiations/decode_dispatch.cu).
# With KVC_CI_MINIMAL=ON only bf16, head dim 128, group size 4 is compiled (both libraries).
#
# Included from the top-level CMakeLists.txt after the `kvc` target exists. In-tree consumers
# that need the precompiled kernels (the GPU tests and the decode benchmark) are linked at the
# end of the top-level directory's processing, once their targets exist.
if(NOT KVC_WITH_CUDA)
  return()
endif()

if(KVC_CI_MINIMAL)
  set(_kvc_decode_dtypes bf16)
  set(_kvc_decode_head_dims 128)
  set(_kvc_decode_groups 4)
else()
  set(_kvc_decode_dtypes fp16 bf16 fp32)
  set(_kvc_decode_head_dims 64 128 256)
  set(_kvc_decode_groups 1 2 4 8)
endif()
set(_kvc_decode_type_fp16 half)
set(_kvc_decode_type_bf16 __nv_bfloat16)
set(_kvc_decode_type_fp32 float)

set(_kvc_decode_sources "${PROJECT_SOURCE_DIR}/src/instantiations/decode_dispatch.cu")
foreach(_dtype IN LISTS _kvc_decode_dtypes)
  foreach(_dim IN LISTS _kvc_decode_head_dims)
    foreach(_group IN LISTS _kvc_decode_groups)
      set(KVC_INSTANCE_TYPE "${_kvc_decode_type_${_dtype}}")
      set(KVC_INSTANCE_HEAD_DIM ${_dim})
      set(KVC_INSTANCE_GROUP ${_group})
      set(_file "${PROJECT_BINARY_DIR}/kvc_instances/decode_${_dtype}_d${_dim}_g${_group}.cu")
      configure_file("${PROJECT_SOURCE_DIR}/src/instantiations/decode_instance.cu.in" "${_file}" @ONLY)
      list(APPEND _kvc_decode_sources "${_file}")
    endforeach()
  endforeach()
endforeach()

add_library(kvc_decode_instances STATIC ${_kvc_decode_sources})
add_library(kvc::decode_instances ALIAS kvc_decode_instances)
set_target_properties(kvc_decode_instances PROPERTIES EXPORT_NAME decode_instances)
target_link_libraries(kvc_decode_instances PUBLIC kvc::kvc)
if(TARGET kvc_warnings)
  target_link_libraries(kvc_decode_instances PRIVATE $<BUILD_INTERFACE:kvc_warnings>)
endif()
if(KVC_CI_MINIMAL)
  target_compile_definitions(kvc_decode_instances PRIVATE KVC_DECODE_MINIMAL=1)
endif()
set_target_properties(kvc_decode_instances PROPERTIES POSITION_INDEPENDENT_CODE ON)

# Prefill attention: the static library `kvc_prefill_instances`, built the same way (one generated
# unit per (dtype, head dim, group size) from src/instantiations/prefill_instance.cu.in, plus the
# dispatcher src/instantiations/prefill_dispatch.cu), over the same configuration set.
set(_kvc_prefill_sources "${PROJECT_SOURCE_DIR}/src/instantiations/prefill_dispatch.cu")
foreach(_dtype IN LISTS _kvc_decode_dtypes)
  foreach(_dim IN LISTS _kvc_decode_head_dims)
    foreach(_group IN LISTS _kvc_decode_groups)
      set(KVC_INSTANCE_TYPE "${_kvc_decode_type_${_dtype}}")
      set(KVC_INSTANCE_HEAD_DIM ${_dim})
      set(KVC_INSTANCE_GROUP ${_group})
      set(_file "${PROJECT_BINARY_DIR}/kvc_instances/prefill_${_dtype}_d${_dim}_g${_group}.cu")
      configure_file("${PROJECT_SOURCE_DIR}/src/instantiations/prefill_instance.cu.in" "${_file}" @ONLY)
      list(APPEND _kvc_prefill_sources "${_file}")
    endforeach()
  endforeach()
endforeach()

add_library(kvc_prefill_instances STATIC ${_kvc_prefill_sources})
add_library(kvc::prefill_instances ALIAS kvc_prefill_instances)
set_target_properties(kvc_prefill_instances PROPERTIES EXPORT_NAME prefill_instances)
target_link_libraries(kvc_prefill_instances PUBLIC kvc::kvc)
if(TARGET kvc_warnings)
  target_link_libraries(kvc_prefill_instances PRIVATE $<BUILD_INTERFACE:kvc_warnings>)
endif()
if(KVC_CI_MINIMAL)
  target_compile_definitions(kvc_prefill_instances PRIVATE KVC_PREFILL_MINIMAL=1)
endif()
set_target_properties(kvc_prefill_instances PROPERTIES POSITION_INDEPENDENT_CODE ON)

function(_kvc_link_decode_instances)
  foreach(_target IN ITEMS kvc_gpu_tests kvc_bench_decode)
    if(TARGET ${_target})
      target_link_libraries(${_target} PRIVATE kvc_decode_instances)
    endif()
  endforeach()
  foreach(_target IN ITEMS kvc_gpu_tests kvc_bench_prefill kvc_bench_prefill_store)
    if(TARGET ${_target})
      target_link_libraries(${_target} PRIVATE kvc_prefill_instances)
    endif()
  endforeach()
endfunction()
cmake_language(DEFER CALL _kvc_link_decode_instances)
