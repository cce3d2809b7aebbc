# Consumer test driver, run with `cmake -P`:
#
#   cmake -DMODE=find_package|add_subdirectory -DMOE_SOURCE_DIR=<moe source tree>
#         -DWORK_DIR=<scratch dir> [-DCXX_COMPILER=...] [-DGENERATOR=...]
#         [-DMAKE_PROGRAM=...] [-DBUILD_TYPE=Debug] [-DEIGEN3_DIR=...]
#         [-DNLOHMANN_JSON_DIR=...] [-DEXPECT_IO=ON|OFF] [-DEXPECT_BLAS=ON|OFF] [-DEXPECT_ONEDNN=ON|OFF] -P run_consumer.cmake
#
# find_package:     configure, build and install moe (no tests, no examples)
#                   into WORK_DIR/prefix, then configure, build and run
#                   consumer/find_package against that prefix.
# add_subdirectory: configure, build and run consumer/add_subdirectory, which
#                   adds MOE_SOURCE_DIR as a subproject.
# EXPECT_IO=ON: the consumers must also find moe::io (nlohmann_json) and use it.
cmake_minimum_required(VERSION 3.20)

foreach(var MODE MOE_SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT MODE MATCHES "^(find_package|add_subdirectory)$")
  message(FATAL_ERROR "run_consumer.cmake: MODE=${MODE}, expected find_package or add_subdirectory")
endif()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Debug)  # fastest to compile; the consumers are tiny
endif()

# Options every nested configure shares: same compiler, generator, build type.
set(common_args -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
if(GENERATOR)
  list(APPEND common_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND common_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
if(CXX_COMPILER)
  list(APPEND common_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()
if(EIGEN3_DIR)
  list(APPEND common_args -DEigen3_DIR=${EIGEN3_DIR})
endif()
if(NLOHMANN_JSON_DIR)
  list(APPEND common_args -Dnlohmann_json_DIR=${NLOHMANN_JSON_DIR})
endif()
# Only for the consumer projects: whether they use moe::io too.
if(EXPECT_IO)
  set(consumer_args -DMOE_CONSUMER_IO=ON)
else()
  set(consumer_args -DMOE_CONSUMER_IO=OFF)
endif()
# EXPECT_ONEDNN=ON: the consumers also link moe::onednn (the oneDNN engines).
if(EXPECT_ONEDNN)
  list(APPEND consumer_args -DMOE_CONSUMER_ONEDNN=ON)
else()
  list(APPEND consumer_args -DMOE_CONSUMER_ONEDNN=OFF)
endif()
# EXPECT_BLAS=ON: the consumers' layer must run its GEMMs on the BLAS.
if(EXPECT_BLAS)
  list(APPEND consumer_args -DMOE_CONSUMER_BLAS=ON)
else()
  list(APPEND consumer_args -DMOE_CONSUMER_BLAS=OFF)
endif()

set(consumer_source_dir ${CMAKE_CURRENT_LIST_DIR}/${MODE})
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# Runs one command; stops the test with the step's name and output on failure.
function(run_step step)
  message(STATUS "[${MODE}] ${step}")
  execute_process(COMMAND ${ARGN}
    WORKING_DIRECTORY ${WORK_DIR}
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output
    COMMAND_ECHO STDOUT)
  message("${output}")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "[${MODE}] step '${step}' failed (exit status: ${result})")
  endif()
endfunction()

# Runs the consumer executable of a build tree (single- or multi-config).
function(run_consumer build_dir)
  foreach(candidate ${build_dir}/consumer ${build_dir}/${BUILD_TYPE}/consumer
                    ${build_dir}/consumer.exe ${build_dir}/${BUILD_TYPE}/consumer.exe)
    if(EXISTS ${candidate} AND NOT IS_DIRECTORY ${candidate})
      run_step("run the consumer" ${candidate})
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "[${MODE}] no consumer executable was built in ${build_dir}")
endfunction()

if(MODE STREQUAL "find_package")
  set(moe_build ${WORK_DIR}/moe-build)
  set(prefix ${WORK_DIR}/prefix)
  set(consumer_build ${WORK_DIR}/consumer-build)

  run_step("configure moe" ${CMAKE_COMMAND} -S ${MOE_SOURCE_DIR} -B ${moe_build} ${common_args}
    -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCHMARKS=OFF
    -DCMAKE_INSTALL_PREFIX=${prefix})
  run_step("build moe" ${CMAKE_COMMAND} --build ${moe_build} --config ${BUILD_TYPE})
  run_step("install moe" ${CMAKE_COMMAND} --install ${moe_build} --config ${BUILD_TYPE}
    --prefix ${prefix})

  file(GLOB_RECURSE installed_config ${prefix}/moeConfig.cmake)
  if(NOT installed_config)
    message(FATAL_ERROR "[${MODE}] no moeConfig.cmake was installed under ${prefix}")
  endif()
  if(NOT EXISTS ${prefix}/include/moe/moe.hpp)
    message(FATAL_ERROR "[${MODE}] moe/moe.hpp was not installed under ${prefix}/include")
  endif()

  # Only the fresh prefix may provide moe: no package registry.
  run_step("configure the find_package consumer" ${CMAKE_COMMAND} -S ${consumer_source_dir}
    -B ${consumer_build} ${common_args} ${consumer_args} -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  file(STRINGS ${consumer_build}/CMakeCache.txt moe_dir_line REGEX "^moe_DIR:")
  string(REGEX REPLACE "^moe_DIR:[A-Z]+=" "" moe_dir "${moe_dir_line}")
  file(REAL_PATH "${prefix}" real_prefix)
  file(REAL_PATH "${moe_dir}" real_moe_dir)
  string(FIND "${real_moe_dir}" "${real_prefix}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "[${MODE}] the consumer found moe in '${moe_dir}', not in ${prefix}")
  endif()
  run_step("build the find_package consumer" ${CMAKE_COMMAND} --build ${consumer_build}
    --config ${BUILD_TYPE})
  run_consumer(${consumer_build})
else()
  set(consumer_build ${WORK_DIR}/consumer-build)
  run_step("configure the add_subdirectory consumer" ${CMAKE_COMMAND} -S ${consumer_source_dir}
    -B ${consumer_build} ${common_args} ${consumer_args} -DMOE_SOURCE_DIR=${MOE_SOURCE_DIR})
  run_step("build the add_subdirectory consumer" ${CMAKE_COMMAND} --build ${consumer_build}
    --config ${BUILD_TYPE})
  run_consumer(${consumer_build})
endif()

message(STATUS "[${MODE}] consumer test passed")
