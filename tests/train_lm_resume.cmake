# Resuming moe-train-lm from a checkpoint continues bitwise identically:
# for each recipe, 30 steps straight and 15 + resume + 15 steps must leave
# byte-identical checkpoints (parameters, layer state, AdamW moments).
#   cmake -DEXE=<moe-train-lm> -DDIR=<scratch dir> -P train_lm_resume.cmake
foreach(recipe dense topk default-moe remoe acmoe smoe-dropout)
  set(common --quick --recipes ${recipe} --steps 30 --eval-every 10 --log-every 10)
  file(REMOVE_RECURSE ${DIR}/${recipe})
  execute_process(COMMAND ${EXE} ${common} --checkpoint-dir ${DIR}/${recipe}/straight
                  RESULT_VARIABLE rc OUTPUT_QUIET)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${recipe}: the straight run failed (${rc})")
  endif()
  execute_process(COMMAND ${EXE} ${common} --stop-after 15
                          --checkpoint-dir ${DIR}/${recipe}/first RESULT_VARIABLE rc OUTPUT_QUIET)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${recipe}: the first half failed (${rc})")
  endif()
  execute_process(COMMAND ${EXE} ${common} --resume ${DIR}/${recipe}/first/${recipe}.safetensors
                          --checkpoint-dir ${DIR}/${recipe}/resumed RESULT_VARIABLE rc OUTPUT_QUIET)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${recipe}: the resumed run failed (${rc})")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files
                          ${DIR}/${recipe}/straight/${recipe}.safetensors
                          ${DIR}/${recipe}/resumed/${recipe}.safetensors RESULT_VARIABLE same)
  if(NOT same EQUAL 0)
    message(FATAL_ERROR "${recipe}: the resumed checkpoint differs from the straight run's")
  endif()
  # And the half-way checkpoint really is another state (the test can fail).
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files
                          ${DIR}/${recipe}/straight/${recipe}.safetensors
                          ${DIR}/${recipe}/first/${recipe}.safetensors RESULT_VARIABLE same)
  if(same EQUAL 0)
    message(FATAL_ERROR "${recipe}: the half-way checkpoint equals the final one")
  endif()
  message(STATUS "${recipe}: resumed bitwise identically")
endforeach()
