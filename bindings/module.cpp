// The pybind11 module llada_engine._C. Importing it registers the `llada` ops (bindings/library.cpp
// and the family files); the module itself carries what the binary was built with.
#include <pybind11/pybind11.h>

#include "llada/moe.h"
#include "llada_build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "llada_engine native kernels; the ops live in torch.ops.llada";
  m.def("build_info", [] {
    py::dict info;
    info["version"] = LLADA_BUILD_VERSION;
    info["torch_version"] = LLADA_BUILD_TORCH_VERSION;
    info["cuda_kernels"] = static_cast<bool>(LLADA_BUILD_WITH_CUDA);
    info["cuda_archs"] = LLADA_BUILD_CUDA_ARCHS;
    info["cuda_version"] = LLADA_BUILD_CUDA_VERSION;
    info["cutlass_version"] = LLADA_BUILD_CUTLASS_VERSION;
    // The batch-invariant CPU GEMM's path on this machine, under the LLADA_CPU_ISA cap now set.
    py::dict gemm;
    const llada::CpuIsa isa = llada::cpu_isa_from_env();
    gemm["float32"] = llada::batch_invariant_gemm_cpu_path(llada::DType::kFloat32, isa);
    gemm["bfloat16"] = llada::batch_invariant_gemm_cpu_path(llada::DType::kBFloat16, isa);
    gemm["float16"] = llada::batch_invariant_gemm_cpu_path(llada::DType::kFloat16, isa);
    info["cpu_gemm_path"] = gemm;
    return info;
  }, "What this binary was built with (versions, CUDA kernels and archs, CUTLASS version) and the CPU GEMM "
     "path it takes on this machine.");
}
