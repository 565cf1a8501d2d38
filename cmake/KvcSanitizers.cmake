# KVC_SANITIZE: sanitizers for kvc's own host targets, e.g. -DKVC_SANITIZE=address,undefined
# (any list that g++/clang++ accept after -fsanitize=). Applied at the end of the configure step
# to every executable and library of this project whose sources are all host C++: targets with
# CUDA sources (.cu files, or sources compiled as CUDA) are left alone, since nvcc neither takes
# these flags nor links the sanitizer runtimes. Undefined behaviour aborts (no recovery), so a
# sanitized test fails on the first report.
set(KVC_SANITIZE "" CACHE STRING
  "Sanitizers for kvc's host targets (e.g. address,undefined); empty for none")

if(KVC_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "KVC_SANITIZE needs g++ or clang++, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  set(KVC_SANITIZE_FLAGS -fsanitize=${KVC_SANITIZE} -fno-sanitize-recover=all
    -fno-omit-frame-pointer)

  # Every target defined in `dir` and below.
  function(_kvc_targets_below dir out)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    get_property(children DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(child IN LISTS children)
      _kvc_targets_below("${child}" below)
      list(APPEND targets ${below})
    endforeach()
    set(${out} ${targets} PARENT_SCOPE)
  endfunction()

  function(_kvc_apply_sanitizers)
    _kvc_targets_below("${PROJECT_SOURCE_DIR}" targets)
    set(applied "")
    foreach(target IN LISTS targets)
      get_target_property(type ${target} TYPE)
      if(NOT type MATCHES "EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|MODULE_LIBRARY")
        continue()
      endif()
      get_target_property(sources ${target} SOURCES)
      set(host_only TRUE)
      foreach(source IN LISTS sources)
        get_source_file_property(language "${source}" TARGET_DIRECTORY ${target} LANGUAGE)
        if(source MATCHES "\\.cu$" OR language STREQUAL "CUDA")
          set(host_only FALSE)
        endif()
      endforeach()
      if(host_only)
        target_compile_options(${target} PRIVATE ${KVC_SANITIZE_FLAGS})
        target_link_options(${target} PRIVATE ${KVC_SANITIZE_FLAGS})
        list(APPEND applied ${target})
      endif()
    endforeach()
    list(JOIN applied " " applied_text)
    message(STATUS "kvc: -fsanitize=${KVC_SANITIZE} on the host targets: ${applied_text}")
  endfunction()

  cmake_language(DEFER DIRECTORY "${PROJECT_SOURCE_DIR}" CALL _kvc_apply_sanitizers)
endif()
