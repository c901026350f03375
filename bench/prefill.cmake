# The prefill attention benchmark; include()d from bench/CMakeLists.txt. Run it (with its tests
# and the PyTorch SDPA baseline) on the GPU machine through bench/run_prefill_gpu.sh.
if(SIEVE_HAVE_CUDA)
  add_executable(prefill_attention_bench ${CMAKE_CURRENT_LIST_DIR}/prefill_attention_bench.cu)
  target_link_libraries(prefill_attention_bench PRIVATE sieve_kernels)
endif()
