# alloy::nccl: alloy with NCCL, for NcclCommunicator (include/alloy/dist/nccl_communicator.hpp).
# NCCL is the CUDA toolkit's copy (nccl.h and libnccl beside cudart) or one under NCCL_ROOT.
# alloy's own build and its installed package (alloyConfig.cmake) both define the target with this
# function, looking NCCL up where each is configured; without NCCL there is no alloy::nccl and
# everything else works as before.
#   alloy_define_nccl(<alloy target> <IMPORTED|BUILD>)
function(alloy_define_nccl alloy_target kind)
  if(TARGET alloy::nccl)
    return()
  endif()
  find_path(ALLOY_NCCL_INCLUDE_DIR nccl.h HINTS $ENV{NCCL_ROOT}/include ${CUDAToolkit_INCLUDE_DIRS})
  find_library(ALLOY_NCCL_LIBRARY nccl HINTS $ENV{NCCL_ROOT}/lib $ENV{NCCL_ROOT}/lib64 ${CUDAToolkit_LIBRARY_DIR})
  if(NOT ALLOY_NCCL_INCLUDE_DIR OR NOT ALLOY_NCCL_LIBRARY)
    message(STATUS "alloy: NCCL not found: no alloy::nccl, NcclCommunicator is not available (set NCCL_ROOT to "
                   "point at one)")
    return()
  endif()
  if(kind STREQUAL "IMPORTED")
    add_library(alloy::nccl INTERFACE IMPORTED)
    set(target alloy::nccl)
  else()
    add_library(alloy_nccl INTERFACE)
    add_library(alloy::nccl ALIAS alloy_nccl)
    set(target alloy_nccl)
  endif()
  target_include_directories(${target} SYSTEM INTERFACE ${ALLOY_NCCL_INCLUDE_DIR})
  target_link_libraries(${target} INTERFACE ${alloy_target} ${ALLOY_NCCL_LIBRARY})
  message(STATUS "alloy: NCCL found: ${ALLOY_NCCL_LIBRARY} (alloy::nccl)")
endfunction()
