# Installs the configured kvc build tree into a scratch prefix, then configures and builds a
# consumer project that only knows `find_package(kvc CONFIG REQUIRED)`, and runs it.
file(REMOVE_RECURSE "${KVC_SCRATCH}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${KVC_BUILD_DIR}" --prefix "${KVC_SCRATCH}/prefix"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${result}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${KVC_CONSUMER_SOURCE}" -B "${KVC_SCRATCH}/build"
                        -G "${KVC_GENERATOR}" "-DCMAKE_PREFIX_PATH=${KVC_SCRATCH}/prefix"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "configuring the consumer failed: ${result}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${KVC_SCRATCH}/build" RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "building the consumer failed: ${result}")
endif()
execute_process(COMMAND "${KVC_SCRATCH}/build/kvc_consumer" RESULT_VARIABLE result
                OUTPUT_VARIABLE output)
message(STATUS "${output}")
if(NOT result EQUAL 0 OR NOT output MATCHES "kvc consumer ok")
  message(FATAL_ERROR "the consumer did not run: ${result}")
endif()
