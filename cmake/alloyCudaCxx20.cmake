# alloy_cuda_cxx20(<target>): CUDA sources that link <target> compile as C++20.
#
# Included by alloy's CMakeLists.txt (top level, add_subdirectory, FetchContent) and by the
# installed alloyConfig.cmake, so the CMake that builds the consumer decides, not the one that
# installed alloy. CMake knows nvcc's C++20 flag from 3.26 on: there the cuda_std_20 feature asks
# for it (and lifts a lower CUDA_STANDARD). CMake 3.25 (Debian 12) does not: cuda_std_20 fails
# with "not known to CUDA compiler", and without a flag nvcc compiles C++17, where alloy's first
# concept is "identifier "concept" is undefined". There the flag goes to CUDA sources directly
# (nvcc accepts it twice; a consumer's own CUDA_STANDARD below 20 comes after it and wins, and
# alloy/config.hpp then stops with a message that says so).
function(alloy_cuda_cxx20 target)
  if(CMAKE_VERSION VERSION_LESS 3.26)
    set(property INTERFACE_COMPILE_OPTIONS)
    set(value "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
  else()
    set(property INTERFACE_COMPILE_FEATURES)
    set(value cuda_std_20)
  endif()
  get_target_property(imported ${target} IMPORTED)
  if(NOT imported)
    set(value "$<BUILD_INTERFACE:${value}>")  # an install is decided by its own consumer's CMake
  endif()
  set_property(TARGET ${target} APPEND PROPERTY ${property} "${value}")
endfunction()
