// MMK_LAUNCH(kernel, blocks, threads, smem, stream, args...): a kernel launch with nvcc (launch
// errors thrown as std::runtime_error), or the host emulator's launch of the same kernel code
// under MMKERNELS_EMULATOR. Shared by the launchers of every kernel family (fused_launch.cuh,
// heads_launch.cuh).
#pragma once

#include "device.cuh"

#include <stdexcept>
#include <string>

#if defined(MMKERNELS_EMULATOR)
#define MMK_LAUNCH(kernel, blocks, threads, smem, stream, ...) \
  do {                                                            \
    (void)(stream);                                               \
    ::mmk_emu::launch(::mmk_emu::dim3((unsigned)(blocks)), ::mmk_emu::dim3(threads), smem, \
                      [&] { kernel(__VA_ARGS__); });              \
  } while (0)
#else
#define MMK_LAUNCH(kernel, blocks, threads, smem, stream, ...)                              \
  do {                                                                                      \
    kernel<<<(unsigned)(blocks), threads, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__); \
    const cudaError_t err_ = cudaGetLastError();                                            \
    if (err_ != cudaSuccess)                                                                \
      throw std::runtime_error(std::string("mmkernels: CUDA launch failed: ") +             \
                               cudaGetErrorString(err_));                                   \
  } while (0)
#endif
