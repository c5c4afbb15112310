# Runs a fuzz target for ctest (cmake -P). Variables:
#   FUZZER       the libFuzzer binary
#   MODE         replay: every input in REGRESSIONS and SEEDS once (-runs=0);
#                fuzz: fuzzing from those inputs for ALLOY_FUZZ_SECONDS seconds (an environment
#                variable; SECONDS when unset) into a fresh corpus under WORK
#   SEEDS, REGRESSIONS, DICT, WORK, SECONDS
#   ALL_SEEDS_LOAD  ON: replay fails unless every file in SEEDS was accepted
# A finding (a crash, a sanitizer report, a leak, a hang over 10 s, an out-of-memory) fails the
# test, and libFuzzer saves its input under WORK/findings. So does a run that accepted no input:
# the target would not be reaching the loader.
foreach(_v FUZZER MODE SEEDS REGRESSIONS DICT WORK)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "run_fuzzer.cmake: ${_v} is not set")
  endif()
endforeach()
if(NOT EXISTS ${FUZZER})
  message(FATAL_ERROR "run_fuzzer.cmake: ${FUZZER} does not exist (build the alloy_fuzz target)")
endif()
file(MAKE_DIRECTORY ${WORK}/findings)
# A target whose fuzzing has found no bug yet has no regressions directory.
if(NOT IS_DIRECTORY ${REGRESSIONS})
  message("no regression inputs for this target (${REGRESSIONS} does not exist)")
  set(REGRESSIONS "")
endif()
set(_args -timeout=10 -rss_limit_mb=2048 -dict=${DICT} -artifact_prefix=${WORK}/findings/ -print_final_stats=1)
# The first directory is the one libFuzzer may write to: always a scratch one.
if(MODE STREQUAL "replay")
  file(REMOVE_RECURSE ${WORK}/replay)
  file(MAKE_DIRECTORY ${WORK}/replay)
  list(APPEND _args -runs=0 ${WORK}/replay ${REGRESSIONS} ${SEEDS})
elseif(MODE STREQUAL "fuzz")
  set(_seconds ${SECONDS})
  if(DEFINED ENV{ALLOY_FUZZ_SECONDS} AND NOT "$ENV{ALLOY_FUZZ_SECONDS}" STREQUAL "")
    set(_seconds $ENV{ALLOY_FUZZ_SECONDS})
  endif()
  file(REMOVE_RECURSE ${WORK}/corpus)
  file(MAKE_DIRECTORY ${WORK}/corpus)
  list(APPEND _args -max_total_time=${_seconds} ${WORK}/corpus ${REGRESSIONS} ${SEEDS})
else()
  message(FATAL_ERROR "run_fuzzer.cmake: MODE is '${MODE}', not replay or fuzz")
endif()

list(JOIN _args " " _shown)
message("${FUZZER} ${_shown}")
execute_process(COMMAND ${FUZZER} ${_args} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
if(NOT _rc EQUAL 0)
  string(LENGTH "${_out}" _length)
  if(_length GREATER 20000)
    math(EXPR _from "${_length} - 20000")
    string(SUBSTRING "${_out}" ${_from} -1 _out)
  endif()
  message("${_out}")
  message(FATAL_ERROR "the fuzz target failed (exit ${_rc}): a finding; its input is under ${WORK}/findings/")
endif()

# The summary: libFuzzer's final statistics and the target's own counts.
string(REGEX MATCHALL "(Done [0-9]+ runs[^\n]*|stat::[a-z_]+: *[0-9]+|[a-z_]+: [0-9]+ inputs: [0-9]+ accepted[^\n]*)"
       _summary "${_out}")
list(JOIN _summary "\n" _summary_text)
message("${_summary_text}")
if(NOT _out MATCHES ": ([0-9]+) inputs: ([0-9]+) accepted")
  message(FATAL_ERROR "the fuzz target printed no counts: it did not run to its end")
endif()
set(_accepted ${CMAKE_MATCH_2})
if(_accepted EQUAL 0)
  message(FATAL_ERROR "the fuzz target accepted no input: it is not reaching the loader (are the seeds valid?)")
endif()
if(MODE STREQUAL "replay" AND ALL_SEEDS_LOAD)
  file(GLOB _seed_files ${SEEDS}/*)
  list(LENGTH _seed_files _seed_count)
  if(_accepted LESS _seed_count)
    message(FATAL_ERROR "${_accepted} inputs accepted, fewer than the ${_seed_count} valid seeds in ${SEEDS}")
  endif()
endif()
