// Element types of the CUDA kernels: reading an input element into the accumulation type
// (to_acc) and rounding a result back to the element type (Store<T>::from). Device code only;
// include from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kdfast {
namespace cuda {

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return static_cast<Acc>(__bfloat162float(v));
}

template <typename T>
struct Store {
  template <typename Acc>
  __device__ __forceinline__ static T from(Acc v) { return static_cast<T>(v); }
};
template <>
struct Store<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half(v); }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16(v); }
};

}  // namespace cuda
}  // namespace kdfast
