# The CI smoke test of moe-train-lm: every recipe with --quick, then the
# outputs a person reads are checked, not just the exit code.
#   cmake -DEXE=<moe-train-lm> -DDIR=<scratch dir> -P train_lm_quick.cmake
cmake_minimum_required(VERSION 3.20)  # empty CSV fields stay list elements (CMP0007)
file(REMOVE_RECURSE ${DIR})
execute_process(COMMAND ${EXE} --quick --recipes all --out ${DIR} RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "moe-train-lm --quick failed (${rc}):\n${err}")
endif()

function(read_csv path header_expected rows_var)
  file(STRINGS ${path} lines)
  list(POP_FRONT lines header)
  if(NOT header STREQUAL header_expected)
    message(FATAL_ERROR "${path}: header '${header}', expected '${header_expected}'")
  endif()
  set(${rows_var} "${lines}" PARENT_SCOPE)
endfunction()

read_csv(${DIR}/summary.csv
  "recipe,inference_k,train_loss,val_loss,val_bpc,tokens_per_s,active_parameters,total_parameters,sparsity,max_load_over_mean,wall_s,seed"
  summary)
list(LENGTH summary n)
if(NOT n EQUAL 14)  # six recipes and smoe-dropout at k = 1..8
  message(FATAL_ERROR "summary.csv: ${n} rows, expected 14")
endif()
foreach(row IN LISTS summary)
  string(REPLACE "," ";" f "${row}")
  list(GET f 0 recipe)
  list(GET f 4 bpc)
  # Uniform over the ~100 characters is 6.6 bits; a model that learned is well below.
  if(NOT bpc MATCHES "^[0-9.]+$" OR NOT bpc LESS 5.5)
    message(FATAL_ERROR "summary.csv: ${recipe} val_bpc='${bpc}', expected a number < 5.5")
  endif()
endforeach()

read_csv(${DIR}/metrics.csv
  "recipe,step,tokens,train_loss,val_loss,sparsity,lambda,k,max_load_over_mean,tokens_per_s,seed"
  metrics)
foreach(recipe dense topk default-moe remoe acmoe smoe-dropout)
  set(first "")
  set(last "")
  foreach(row IN LISTS metrics)
    string(REPLACE "," ";" f "${row}")
    list(GET f 0 r)
    list(GET f 4 val)
    if(r STREQUAL recipe AND NOT val STREQUAL "")
      if(first STREQUAL "")
        set(first ${val})
      endif()
      set(last ${val})
    endif()
  endforeach()
  if(first STREQUAL "" OR NOT last LESS first)
    message(FATAL_ERROR "metrics.csv: ${recipe} validation loss ${first} -> ${last}, expected a fall")
  endif()
endforeach()
foreach(plot val_loss expert_load remoe_sparsity smoe_dropout_k)
  find_program(gnuplot gnuplot)
  if(gnuplot AND NOT EXISTS ${DIR}/${plot}.svg)
    message(FATAL_ERROR "${DIR}/${plot}.svg missing although gnuplot exists")
  endif()
endforeach()
message(STATUS "moe-train-lm --quick: outputs checked")
