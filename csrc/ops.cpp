// The CPU kernels of the openllm_clone ops, whose schemas and shape functions
// runners/kernels.py declares (so that torch.export traces them before any build).
#include <torch/library.h>

#include "vec.h"

TORCH_LIBRARY_IMPL(openllm_clone, CPU, m) {
  m.impl("linear_packed", &openllm_clone::linear_packed);
  m.impl("linear_quant", &openllm_clone::linear_quant);
  m.impl("paged_attention", &openllm_clone::paged_attention);
  m.impl("lora_bgmv_", &openllm_clone::lora_bgmv_);
}
