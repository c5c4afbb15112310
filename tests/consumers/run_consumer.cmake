# cmake -DMODE=<mode> -DALLOY_SOURCE_DIR=... -DWORK_DIR=... [...] -P run_consumer.cmake
# Configures, builds and runs one consumer project in a fresh directory; any failure fails the test.
#   find_package, subdirectory, fetchcontent: alloy used one way; with CONSUMER_CUDA=ON the
#     program has a .cu translation unit beside its .cpp one.
#   host_only_install: alloy configured with ALLOY_CUDA=OFF and installed into a private prefix;
#     the installed files must name no CUDA, and a g++-only consumer must link no CUDA library.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message("${out}")
endfunction()

# The shared libraries `binary` needs, by file name, in `out`.
function(runtime_libraries binary out)
  file(GET_RUNTIME_DEPENDENCIES EXECUTABLES ${binary} RESOLVED_DEPENDENCIES_VAR resolved
       UNRESOLVED_DEPENDENCIES_VAR unresolved)
  set(names ${unresolved})
  foreach(lib IN LISTS resolved)
    get_filename_component(name ${lib} NAME)
    list(APPEND names ${name})
  endforeach()
  set(${out} ${names} PARENT_SCOPE)
endfunction()

set(cuda_pattern "CUDA::|CUDAToolkit|cudart|cublas")
set(work ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${work})
file(MAKE_DIRECTORY ${work})
set(project_mode ${MODE})
set(expect_cuda_runtime ${CONSUMER_CUDA_RUNTIME})
if(MODE STREQUAL "host_only_install")
  set(project_mode find_package)
  set(CONSUMER_CUDA OFF)
  set(expect_cuda_runtime 0)
endif()
set(configure_args -S ${CMAKE_CURRENT_LIST_DIR}/${project_mode} -B ${work}/build -G ${GENERATOR}
                   -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DALLOY_SOURCE_DIR=${ALLOY_SOURCE_DIR}
                   -DCONSUMER_DIR=${CMAKE_CURRENT_LIST_DIR} -DCONSUMER_EXPECT_CUDA_RUNTIME=${expect_cuda_runtime})
if(CONSUMER_CUDA)
  list(APPEND configure_args -DCONSUMER_CUDA=ON -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}
       -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES})
endif()

if(CONSUMER_NCCL AND NOT MODE STREQUAL "host_only_install")
  list(APPEND configure_args -DCONSUMER_EXPECT_NCCL=ON)
endif()
if(MODE STREQUAL "subdirectory" OR MODE STREQUAL "fetchcontent")
  list(APPEND configure_args -DALLOY_CUDA=${ALLOY_CUDA})  # alloy's CUDA setting as in the build that runs this
endif()
if(MODE STREQUAL "find_package")
  # Install alloy from its build tree into a private prefix, then find it there.
  run(${CMAKE_COMMAND} --install ${ALLOY_BINARY_DIR} --prefix ${work}/prefix)
  list(APPEND configure_args -DCMAKE_PREFIX_PATH=${work}/prefix)
elseif(MODE STREQUAL "host_only_install")
  run(${CMAKE_COMMAND} -S ${ALLOY_SOURCE_DIR} -B ${work}/alloy -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
      -DALLOY_CUDA=OFF -DALLOY_BUILD_TESTS=OFF -DALLOY_BUILD_BENCHMARKS=OFF -DALLOY_BUILD_EXAMPLES=OFF)
  run(${CMAKE_COMMAND} --install ${work}/alloy --prefix ${work}/prefix)
  list(APPEND configure_args -DCMAKE_PREFIX_PATH=${work}/prefix)
endif()

if(EXISTS ${work}/prefix)
  file(GLOB_RECURSE package_files ${work}/prefix/*/cmake/alloy/*.cmake)
  list(FILTER package_files INCLUDE REGEX "/alloy(Config|ConfigVersion|Targets)\\.cmake$")
  list(LENGTH package_files n)
  if(NOT n EQUAL 3)
    message(FATAL_ERROR "install wrote ${n} of alloyConfig, alloyConfigVersion, alloyTargets: ${package_files}")
  endif()
endif()

if(MODE STREQUAL "host_only_install")
  # Nothing installed may ask for CUDA: no CUDA:: target, no find_dependency(CUDAToolkit).
  file(GLOB_RECURSE installed ${work}/prefix/*/cmake/alloy/*)
  foreach(f IN LISTS installed)
    file(STRINGS ${f} hits REGEX "${cuda_pattern}")
    if(hits)
      message(FATAL_ERROR "the host-only install names CUDA in ${f}:\n${hits}")
    endif()
  endforeach()
  file(GLOB_RECURSE targets_file ${work}/prefix/*/cmake/alloy/alloyTargets.cmake)
  file(STRINGS ${targets_file} no_cuda REGEX "INTERFACE_COMPILE_DEFINITIONS.*ALLOY_NO_CUDA")
  if(NOT no_cuda)
    message(FATAL_ERROR "the host-only alloy::alloy does not define ALLOY_NO_CUDA (${targets_file})")
  endif()
endif()

run(${CMAKE_COMMAND} ${configure_args})
run(${CMAKE_COMMAND} --build ${work}/build)
run(${work}/build/consumer)
if(CONSUMER_NCCL AND NOT MODE STREQUAL "host_only_install")
  run(${work}/build/consumer_nccl)
endif()

if(MODE STREQUAL "host_only_install" OR (MODE STREQUAL "find_package" AND CONSUMER_CUDA))
  file(STRINGS ${work}/build/CMakeCache.txt cuda_cache_entries REGEX "^(CUDAToolkit|CUDA_cudart)")
  runtime_libraries(${work}/build/consumer libraries)
  message("consumer's shared libraries: ${libraries}")
  if(NOT libraries MATCHES "libstdc\\+\\+|libc\\.")
    message(FATAL_ERROR "could not read the consumer's shared libraries: ${libraries}")
  endif()
  if(MODE STREQUAL "host_only_install")
    if(cuda_cache_entries)
      message(FATAL_ERROR "a consumer of the host-only install looked for CUDA: ${cuda_cache_entries}")
    endif()
    if(libraries MATCHES "cuda|cublas")
      message(FATAL_ERROR "a consumer of the host-only install links CUDA: ${libraries}")
    endif()
  else()  # the same checks see CUDA where it is, so their silence above means something
    if(NOT cuda_cache_entries OR NOT libraries MATCHES "libcudart")
      message(FATAL_ERROR "a CUDA consumer shows no CUDA: cache '${cuda_cache_entries}', libraries ${libraries}")
    endif()
  endif()
endif()
