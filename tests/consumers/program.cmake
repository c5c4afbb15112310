# The consumer program, the same in every consumer project: main.cpp (g++) and, when
# CONSUMER_CUDA, consumer.cu (nvcc) in one executable. Nothing but alloy::alloy: no C++
# standard, no CUDA flags; what the target passes must be enough.
add_executable(consumer ${CONSUMER_DIR}/main.cpp)
target_compile_definitions(consumer PRIVATE CONSUMER_EXPECT_CUDA_RUNTIME=${CONSUMER_EXPECT_CUDA_RUNTIME})
if(CONSUMER_CUDA)
  target_sources(consumer PRIVATE ${CONSUMER_DIR}/consumer.cu)
  target_compile_definitions(consumer PRIVATE CONSUMER_HAS_CUDA_TU)
endif()
target_link_libraries(consumer PRIVATE alloy::alloy)
# Where alloy's own build found NCCL, the consumer gets alloy::nccl too (installed or not), and a
# program using NcclCommunicator builds and links with it alone.
if(CONSUMER_EXPECT_NCCL)
  if(NOT TARGET alloy::nccl)
    message(FATAL_ERROR "alloy's build has NCCL, but this consumer has no alloy::nccl")
  endif()
  add_executable(consumer_nccl ${CONSUMER_DIR}/nccl.cpp)
  target_link_libraries(consumer_nccl PRIVATE alloy::nccl)
endif()
