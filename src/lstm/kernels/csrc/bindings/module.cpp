// The Python module: every name Python sees, bound to the torch bindings of the LSTM, its
// variants, the GRU and the SimpleRNN (bindings.h), and the buffer pool.

#include <torch/python.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "bindings/bindings.h"
#include "buffer_pool.h"
#include "gemm.h"
#include "operand_right.h"
#include "rnn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("forward", &lstm_forward, "LSTM forward (fused)");
  m.def("backward", &lstm_backward, "LSTM backward (BPTT)");
  m.def("variant_forward", &variant_forward, "LSTM variants forward (fused)");
  m.def("variant_backward", &variant_backward, "LSTM variants backward (BPTT)");
  m.def("gru_forward", &gru_forward, "GRU forward (fused): [y, h_last] (+ [gates, h_prev, candidate_input] with save)",
        py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("h0"),
        py::arg("input_dropout"), py::arg("recurrent_dropout"), py::arg("mask"), py::arg("batch_sizes"),
        py::arg("go_backwards"), py::arg("zero_output_for_mask"), py::arg("return_sequences"), py::arg("activation"),
        py::arg("recurrent_activation"), py::arg("reset_after"), py::arg("save"), py::arg("operand") = 0);
  m.def("gru_backward", &gru_backward, "GRU backward (BPTT): [dx, dkernel, drecurrent_kernel, dbias, dh0]",
        py::arg("dy"), py::arg("dh_last"), py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"),
        py::arg("bias_dim"), py::arg("gates"), py::arg("h_prev"), py::arg("candidate_input"),
        py::arg("input_dropout"), py::arg("recurrent_dropout"), py::arg("mask"), py::arg("batch_sizes"),
        py::arg("go_backwards"), py::arg("zero_output_for_mask"), py::arg("return_sequences"), py::arg("activation"),
        py::arg("recurrent_activation"), py::arg("reset_after"), py::arg("needs"), py::arg("operand") = 0);
  m.def("simple_rnn_forward", &simple_rnn_forward,
        "SimpleRNN forward (fused): [y, h_last] (+ [outputs, h_prev] with save)", py::arg("x"), py::arg("kernel"),
        py::arg("recurrent_kernel"), py::arg("bias"), py::arg("h0"), py::arg("input_dropout"),
        py::arg("recurrent_dropout"), py::arg("mask"), py::arg("batch_sizes"), py::arg("go_backwards"),
        py::arg("zero_output_for_mask"), py::arg("return_sequences"), py::arg("activation"), py::arg("save"),
        py::arg("operand") = 0);
  m.def("simple_rnn_backward", &simple_rnn_backward,
        "SimpleRNN backward (BPTT): [dx, dkernel, drecurrent_kernel, dbias, dh0]", py::arg("dy"), py::arg("dh_last"),
        py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias_dim"), py::arg("outputs"),
        py::arg("h_prev"), py::arg("input_dropout"), py::arg("recurrent_dropout"), py::arg("mask"),
        py::arg("batch_sizes"), py::arg("go_backwards"), py::arg("zero_output_for_mask"), py::arg("return_sequences"),
        py::arg("activation"), py::arg("needs"), py::arg("operand") = 0);
  m.def("pack_int8", &pack_int8, "an int8 weight [K, N] packed for int8 products", py::arg("weight"));
  m.def("int8_lstm_forward", &int8_lstm_forward, "LSTM inference with int8 weights: [y, h_last, c_last]",
        py::arg("x"), py::arg("kernel"), py::arg("kernel_scales"), py::arg("recurrent"), py::arg("recurrent_scales"),
        py::arg("bias"), py::arg("h0"), py::arg("c0"), py::arg("mask"), py::arg("go_backwards"),
        py::arg("zero_output_for_mask"), py::arg("return_sequences"), py::arg("activation"),
        py::arg("recurrent_activation"));
  py::class_<Int8LSTMStep>(m, "Int8LSTMStep")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t,
                    int64_t, int64_t, int64_t>())
      .def("set_state", &Int8LSTMStep::set_state)
      .def("state", &Int8LSTMStep::state)
      .def("step", &Int8LSTMStep::step);
  m.def("packing_plan", &packing_plan, "the packed layout of rows with these lengths and resets (packing.py)",
        py::arg("lengths"), py::arg("reset"), py::arg("steps"), py::arg("go_backwards"));
  m.def("scatter_rows", &scatter_rows, "rows [N, F] at the distinct indices [N] of a [total, F] tensor of zeros",
        py::arg("rows"), py::arg("index"), py::arg("total"));
  m.def("operands_in_float32", &operands_in_float32,
        "the tensors of a float32 recurrence with low-precision operands: those marked rounded to the operand type, "
        "every floating one in float32", py::arg("tensors"), py::arg("rounded"), py::arg("operand"));
  m.def("gather_rows", &gather_rows, "rows [M, F] at the indices [N]: a new [N, F] tensor", py::arg("rows"),
        py::arg("index"));
  m.def("keep_mask", &keep_mask, "float32 [count]: 1 where counter_bits(seed, n) < threshold (dropout's keep-masks)",
        py::arg("seed"), py::arg("count"), py::arg("threshold"));
  m.def("cell_step", &cell_step, "the cell call's lean route: [out, h, c]; [None]: use autograd; []: not this route");
  py::class_<LSTMStep>(m, "LSTMStep")
      .def(py::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, int64_t>())
      .def("refresh", &LSTMStep::refresh)
      .def("set_state", &LSTMStep::set_state)
      .def("state", &LSTMStep::state)
      .def("step", &LSTMStep::step);
  m.def(
      "pooled_empty",
      [](std::vector<int64_t> sizes, torch::Tensor like) { return buffer_pool::empty(sizes, like.options()); },
      "an uninitialised contiguous CPU tensor of like's dtype from the buffer pool");
  m.def("pool_stats", [] { return buffer_pool::Pool::instance().stats(); },
        "the buffer pool's (idle bytes, idle blocks, allocations it served from idle blocks)");
  m.def("pool_clear", [] { return buffer_pool::Pool::instance().clear(); },
        "gives the buffer pool's idle blocks back to the OS; returns their bytes");
  m.def("set_stream_parallel_work", [](int64_t w) { return std::exchange(lstm_core::lstm::kStreamParallelWork, w); },
        "multiply-adds of a streaming step from which its units are split over the threads; returns the previous");
  m.def("set_panels", &lstm_core::set_panels,
        "whether the per-step float32 products run on panel_right.h's kernel: -1 by the CPU (not Intel's), 0 never, "
        "1 always; returns the previous");
  m.def("panels_preferred", &lstm_core::panels_preferred, "whether they do now (the build has the kernel)");
  m.def("set_low_products", &lstm_core::set_low_products,
        "whether the products with bfloat16/float16 operands run on those types (over all steps MKL's GEMM; per "
        "step over 16+ rows AMX tiles or MKL's GEMM), else on float32's of the widened values: -1 by the CPU "
        "(AVX512-BF16 / AVX512-FP16), 0 never, 1 always; returns the previous");
  m.def("set_pack_min_work", [](int64_t w) { return std::exchange(lstm_core::kPackMinWork, w); },
        "multiply-adds of a step's product from which its right operand is packed; returns the previous");
}
