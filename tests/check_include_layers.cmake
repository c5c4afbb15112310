# The include-direction test: a header under include/alloy may include only headers of its own
# folder or of the folders below it. The layers, bottom first; folders on one level are siblings
# and may not include each other:
#   0  the top level: config.hpp, error.hpp, cublas_error.hpp
#   1  numeric/
#   2  backend/, io/
#   3  memory/
#   4  precision/, optim/
#   5  kernels/
#   6  dist/
#   7  train/
#   8  nn/
# alloy.hpp, the umbrella, may include anything, and nothing may include it. A header's folder is
# the first component of its path under include/alloy (kernels/cuda/gemm_cublaslt.hpp is in
# kernels/). A header in a folder missing from this list fails the test, so a new folder must be
# given its level here.
#
#   cmake -DALLOY_INCLUDE_DIR=<repository>/include -P check_include_layers.cmake
cmake_minimum_required(VERSION 3.25)

set(_levels top=0 numeric=1 backend=2 io=2 memory=3 precision=4 optim=4 kernels=5 dist=6 train=7 nn=8)
set(_umbrella alloy.hpp)

if(NOT ALLOY_INCLUDE_DIR)
  message(FATAL_ERROR "check_include_layers: pass -DALLOY_INCLUDE_DIR=<the repository's include directory>")
endif()
get_filename_component(_root "${ALLOY_INCLUDE_DIR}/alloy" ABSOLUTE)
if(NOT IS_DIRECTORY "${_root}")
  message(FATAL_ERROR "check_include_layers: ${_root} is not a directory")
endif()

foreach(_entry IN LISTS _levels)
  string(REPLACE "=" ";" _pair "${_entry}")
  list(GET _pair 0 _name)
  list(GET _pair 1 _value)
  set(_level_of_${_name} ${_value})
endforeach()

# _folder: the folder of a path relative to include/alloy ("top" for the top level).
function(_folder_of rel out)
  if(rel MATCHES "^([^/]+)/")
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  else()
    set(${out} "top" PARENT_SCOPE)
  endif()
endfunction()

file(GLOB_RECURSE _headers RELATIVE "${_root}" "${_root}/*.hpp" "${_root}/*.h" "${_root}/*.cuh")
list(SORT _headers)
set(_violations 0)
set(_report "")
set(_edges 0)
foreach(_rel IN LISTS _headers)
  set(_file "${_root}/${_rel}")
  _folder_of("${_rel}" _from)
  set(_from_is_umbrella OFF)
  if(_rel STREQUAL _umbrella)
    set(_from_is_umbrella ON)
  elseif(NOT DEFINED _level_of_${_from})
    string(APPEND _report "\n  ${_file}: folder '${_from}/' has no level; give it one in "
                         "${CMAKE_CURRENT_LIST_FILE}")
    math(EXPR _violations "${_violations} + 1")
    continue()
  endif()

  file(READ "${_file}" _text)
  # One list element per line: characters that CMake lists treat specially are replaced first.
  string(REPLACE "\\" "/" _text "${_text}")
  string(REPLACE ";" "," _text "${_text}")
  string(REPLACE "[" "(" _text "${_text}")
  string(REPLACE "]" ")" _text "${_text}")
  string(REPLACE "\n" ";" _lines "${_text}")
  set(_line 0)
  foreach(_l IN LISTS _lines)
    math(EXPR _line "${_line} + 1")
    if(NOT _l MATCHES "^[ \t]*#[ \t]*include[ \t]*([<\"])([^>\"]+)[>\"]")
      continue()
    endif()
    set(_spelled "${CMAKE_MATCH_2}")
    if(CMAKE_MATCH_1 STREQUAL "\"")
      # A quoted include is found next to the including file first.
      get_filename_component(_dir "${_file}" DIRECTORY)
      get_filename_component(_target "${_dir}/${_spelled}" ABSOLUTE)
      string(FIND "${_target}" "${_root}/" _at)
      if(NOT _at EQUAL 0)
        continue()
      endif()
      file(RELATIVE_PATH _target "${_root}" "${_target}")
    elseif(_spelled MATCHES "^alloy/(.+)$")
      set(_target "${CMAKE_MATCH_1}")
    else()
      continue()  # not an alloy header
    endif()
    math(EXPR _edges "${_edges} + 1")
    if(_from_is_umbrella)
      continue()
    endif()
    set(_where "${_file}:${_line}")
    if(_target STREQUAL _umbrella)
      string(APPEND _report "\n  ${_where}: includes the umbrella <alloy/${_umbrella}>; include the headers it needs")
      math(EXPR _violations "${_violations} + 1")
      continue()
    endif()
    _folder_of("${_target}" _to)
    if(_to STREQUAL _from)
      continue()
    endif()
    if(NOT DEFINED _level_of_${_to})
      string(APPEND _report "\n  ${_where}: ${_from} -> ${_to}: folder '${_to}/' has no level (<${_spelled}>)")
      math(EXPR _violations "${_violations} + 1")
    elseif(_level_of_${_to} GREATER _level_of_${_from})
      string(APPEND _report "\n  ${_where}: ${_from} -> ${_to} points up (${_from} is level ${_level_of_${_from}}, "
                           "${_to} level ${_level_of_${_to}}): #include <${_spelled}>")
      math(EXPR _violations "${_violations} + 1")
    elseif(_level_of_${_to} EQUAL _level_of_${_from})
      string(APPEND _report "\n  ${_where}: ${_from} -> ${_to} points sideways (siblings, level ${_level_of_${_to}}): "
                           "#include <${_spelled}>")
      math(EXPR _violations "${_violations} + 1")
    endif()
  endforeach()
endforeach()

list(LENGTH _headers _count)
if(_violations GREATER 0)
  message(FATAL_ERROR "check_include_layers: ${_violations} violation(s) of the layer order (bottom first: "
                      "top level, numeric, backend|io, memory, precision|optim, kernels, dist, train, nn):${_report}")
endif()
message(STATUS "check_include_layers: ${_count} headers, ${_edges} includes of alloy headers, every one downward")
