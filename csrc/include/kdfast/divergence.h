// The divergence of the row-wise softmax-KL core (docs/design.md, "Row-wise softmax-KL"):
// forward KL(p_t || p_s), reverse KL(p_s || p_t), or the generalised JSD(beta) with
// 0 < beta < 1 (beta = 0 and 1 are forward and reverse KL). Plain C++, shared by the CPU
// kernel and the CUDA launcher.
#pragma once

namespace kdfast {

enum class Divergence { kForward, kReverse, kJsd };

}  // namespace kdfast
