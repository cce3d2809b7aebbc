# Compile-fail driver, run with `cmake -P`:
#
#   cmake -DBUILD_DIR=<build tree> -DTARGET=<target> -DCONTROL_TARGET=<target>
#         -DCONCEPT=<concept name> -DBAD_TYPE=<rejected type>
#         [-DCONFIG=<config>] -P expect_compile_error.cmake
#
# Builds CONTROL_TARGET (same source with a valid policy), which must succeed,
# then TARGET, which must fail with a diagnostic saying that CONCEPT is not
# satisfied. Merely naming the concept is not enough: GCC echoes moe::Layer's
# whole requires-clause (every policy concept) for any constraint failure, so
# the regex needs the concept's own satisfaction note (GCC) or the concept
# applied to the rejected type (Clang, MSVC).
cmake_minimum_required(VERSION 3.20)

foreach(var BUILD_DIR TARGET CONTROL_TARGET CONCEPT BAD_TYPE)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "expect_compile_error.cmake: -D${var}=... is required")
  endif()
endforeach()
set(EXPECT "satisfaction of [^ ]*${CONCEPT}<|${CONCEPT}<${BAD_TYPE}[,>]")
set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()

execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${CONTROL_TARGET}
                        ${config_args}
  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output COMMAND_ECHO STDOUT)
if(NOT result EQUAL 0)
  message("${output}")
  message(FATAL_ERROR "control target ${CONTROL_TARGET} (valid policy) failed to compile, so "
                      "the compile-fail test of ${TARGET} proves nothing")
endif()

execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${TARGET} ${config_args}
  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output COMMAND_ECHO STDOUT)
message("${output}")
if(result EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled, but it must be rejected by a concept")
endif()
if(NOT output MATCHES "${EXPECT}")
  message(FATAL_ERROR "${TARGET} failed to compile, but no diagnostic matches '${EXPECT}'")
endif()
message(STATUS "${TARGET} was rejected as expected (diagnostic matches '${EXPECT}')")
