// Element type of a CUDA kernel's inputs, as the launchers take it (plain C++, no torch
// headers); the accumulation type is double for kF64, else float.
#pragma once

namespace kdfast {
namespace cuda {

enum class DType { kF32, kF64, kF16, kBF16 };

}  // namespace cuda
}  // namespace kdfast
