# Install rules: headers, the exported kvc::kvc target and a relocatable package config, so that
# `find_package(kvc)` works from an install prefix.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvc" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS kvc EXPORT kvcTargets)
install(EXPORT kvcTargets NAMESPACE kvc:: DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/kvcConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvcConfig.cmake"
  INSTALL_DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/kvcConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/kvcConfig.cmake" "${PROJECT_BINARY_DIR}/kvcConfigVersion.cmake"
        DESTINATION "${CMAKE_INSTALL_LIBDIR}/cmake/kvc")
