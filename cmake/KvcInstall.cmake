# Install rules: headers, the exported kvc::kvc target and a relocatable package config, so that
# `find_package(kvc)` works from an install prefix.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvc" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
# The precompiled kernel libraries (CUDA builds) install as kvc::decode_instances and
# kvc::prefill_instances (static; KVC_CI_MINIMAL builds hold one instance each).
set(_kvc_install_targets kvc)
foreach(_kvc_library IN ITEMS kvc_decode_instances kvc_prefill_instances)
  if(TARGET ${_kvc_library})
    list(APPEND _kvc_install_targets ${_kvc_library})
  endif()
endforeach()
install(TARGETS ${_kvc_install_targets} EXPORT kvcTargets
        ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")
install(EXPORT kvcTargets NAMESPACE kvc:: DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/kvcConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvcConfig.cmake"
  INSTALL_DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")
if(KVC_WITH_CUDA)  # compiled libraries: the package is for one architecture
  write_basic_package_version_file(
    "${PROJECT_BINARY_DIR}/kvcConfigVersion.cmake"
    COMPATIBILITY SameMinorVersion)
else()  # headers only
  write_basic_package_version_file(
    "${PROJECT_BINARY_DIR}/kvcConfigVersion.cmake"
    COMPATIBILITY SameMinorVersion
    ARCH_INDEPENDENT)
endif()
install(FILES "${PROJECT_BINARY_DIR}/kvcConfig.cmake" "${PROJECT_BINARY_DIR}/kvcConfigVersion.cmake"
        DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")
