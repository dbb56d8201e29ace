// Element types the kernels accept, as a torch-free enum filled in by the bindings.
#pragma once

namespace llada {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace llada
