# cmake -DMODE=find_package|subdirectory|fetchcontent -DALLOY_SOURCE_DIR=... -DWORK_DIR=... -P run_consumer.cmake
# Configures, builds and runs one consumer project in a fresh directory; any failure fails the test.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message("${out}")
endfunction()

set(work ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${work})
file(MAKE_DIRECTORY ${work})
set(source ${CMAKE_CURRENT_LIST_DIR}/${MODE})
set(configure_args -S ${source} -B ${work}/build -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
                   -DALLOY_SOURCE_DIR=${ALLOY_SOURCE_DIR} -DCONSUMER_MAIN=${CMAKE_CURRENT_LIST_DIR}/main.cpp)

if(MODE STREQUAL "find_package")
  # Install alloy from its build tree into a private prefix, then find it there.
  run(${CMAKE_COMMAND} --install ${ALLOY_BINARY_DIR} --prefix ${work}/prefix)
  file(GLOB_RECURSE version_file ${work}/prefix/*/alloyConfigVersion.cmake)
  if(NOT version_file)
    message(FATAL_ERROR "install did not write alloyConfigVersion.cmake")
  endif()
  list(APPEND configure_args -DCMAKE_PREFIX_PATH=${work}/prefix)
endif()

run(${CMAKE_COMMAND} ${configure_args})
run(${CMAKE_COMMAND} --build ${work}/build)
run(${work}/build/consumer)
