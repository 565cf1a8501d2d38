# ctest driver of tools.replay_roundtrip: for every policy, write a random trace with
# kvc-make-trace, replay it with kvc-replay (default device), and check the exit code, the output
# files and report.json; then check that a broken trace exits with 1 and names the file.
# Inputs: KVC_MAKE_TRACE, KVC_REPLAY (executables), KVC_WORK (scratch directory).
foreach(variable KVC_MAKE_TRACE KVC_REPLAY KVC_WORK)
  if(NOT DEFINED ${variable})
    message(FATAL_ERROR "roundtrip.cmake: ${variable} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE "${KVC_WORK}")

set(cases
  "full|--dtype|fp32|--rope|interleaved"
  "dmc|--dtype|bf16|--mode|checkpoint|--prompt|16|--tokens|48"
  "dmc|--dtype|fp16|--mode|paper|--prompt|0"
  "h2o|--dtype|fp16|--heavy|6|--recent|4"
  "tova|--dtype|bf16|--budget|10|--protect-new")
set(index 0)
foreach(case IN LISTS cases)
  string(REPLACE "|" ";" arguments "${case}")
  list(POP_FRONT arguments policy)
  set(trace "${KVC_WORK}/trace${index}_${policy}")
  set(out "${KVC_WORK}/out${index}_${policy}")
  execute_process(
    COMMAND "${KVC_MAKE_TRACE}" "${trace}" --policy ${policy} --seed ${index} ${arguments}
    RESULT_VARIABLE code ERROR_VARIABLE error)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "kvc-make-trace (${policy}) exited ${code}: ${error}")
  endif()
  execute_process(COMMAND "${KVC_REPLAY}" "${trace}" --out "${out}"
    RESULT_VARIABLE code OUTPUT_VARIABLE output ERROR_VARIABLE error)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "kvc-replay (${policy}) exited ${code}:\n${output}${error}")
  endif()
  foreach(file out.npy slots.npy cache_k.npy cache_v.npy cache_pos.npy report.json)
    if(NOT EXISTS "${out}/${file}")
      message(FATAL_ERROR "kvc-replay (${policy}) did not write ${file}")
    endif()
  endforeach()
  file(READ "${out}/report.json" report)
  string(JSON reported_policy GET "${report}" policy)
  string(JSON ratio GET "${report}" compression_ratio)
  if(NOT reported_policy STREQUAL policy)
    message(FATAL_ERROR "report.json names policy '${reported_policy}', expected '${policy}'")
  endif()
  message(STATUS "${policy}: ok, compression ratio ${ratio}")
  math(EXPR index "${index} + 1")
endforeach()

# A broken trace: exit code 1 and a message naming the file.
file(WRITE "${KVC_WORK}/trace0_full/k.npy" "not a numpy file")
execute_process(COMMAND "${KVC_REPLAY}" "${KVC_WORK}/trace0_full" --out "${KVC_WORK}/broken"
  RESULT_VARIABLE code ERROR_VARIABLE error)
if(NOT code EQUAL 1 OR NOT error MATCHES "k\\.npy: not a \\.npy file")
  message(FATAL_ERROR "broken trace: exit ${code}, stderr: ${error}")
endif()
# A usage error: exit code 2.
execute_process(COMMAND "${KVC_REPLAY}" "${KVC_WORK}/trace1_dmc" RESULT_VARIABLE code ERROR_QUIET)
if(NOT code EQUAL 2)
  message(FATAL_ERROR "missing --out: exit ${code}, expected 2")
endif()
