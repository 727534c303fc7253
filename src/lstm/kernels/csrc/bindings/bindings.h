// The torch bindings of the kernel core: what module.cpp lists for Python (tensors in, checks,
// allocation, the products over all steps, then the raw passes and loops of rnn.h). Argument conventions:
// act/ract are activation codes (simd.h), mask is Keras' [B, T] keep mask, in_drop [1|4, B, D] and
// rec_drop [4, B, U] are dropout masks on x and h (one for all gates, or one per gate).
#pragma once

#include <torch/types.h>

#include <vector>

#include "rnn.h"

// ----- the LSTM (lstm_ops.cpp) ---------------------------------------------------------------------
// The plain cell: x [B,T,D], kernel [D,4U], R [U,4U], bias [4U], h0, c0 [B,U]. Returns Y, hT, cT
// and, with save, the saved G [B,T,4U], Hp, Cp [B,T,U] (rnn.h: lstm::ForwardPass). With batch_sizes
// [T] (int64, CPU) the call is packed (rnn.h Params::batch_sizes): x [N,1,D], in_drop per packed
// row [G,N,D], rec_drop per batch row in the packed order, B = batch_sizes[0], Y and the saved
// buffers [N,1,*]; forwards, no mask. The variants take the same.
std::vector<torch::Tensor> lstm_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor R,
                                        c10::optional<torch::Tensor> bias_o, torch::Tensor h0, torch::Tensor c0,
                                        c10::optional<torch::Tensor> in_drop_o,
                                        c10::optional<torch::Tensor> rec_drop_o,
                                        c10::optional<torch::Tensor> mask_o,
                                        c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
                                        bool seq, int64_t act, int64_t ract, bool save);

// needs: which of dx, dkernel, dR, dbias, dh0, dc0 to form. Returns them (undefined where not
// needed: dx, dkernel, dR, dbias).
std::vector<torch::Tensor> lstm_backward(c10::optional<torch::Tensor> dY_o, c10::optional<torch::Tensor> dhT_o,
                                         c10::optional<torch::Tensor> dcT_o, torch::Tensor x, torch::Tensor kernel,
                                         torch::Tensor R, torch::Tensor G, torch::Tensor Hp, torch::Tensor Cp,
                                         c10::optional<torch::Tensor> in_drop_o,
                                         c10::optional<torch::Tensor> rec_drop_o,
                                         c10::optional<torch::Tensor> mask_o,
                                         c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
                                         bool seq, int64_t act, int64_t ract, std::vector<bool> needs);

// ----- int8 inference (int8_ops.cpp) ----------------------------------------------------------------
// An int8 weight [K,N] packed for int8 products (int8_product.h Int8Right::pack): int8 [packed size].
torch::Tensor pack_int8(const torch::Tensor& weight);

// The plain cell with int8 weights (rnn.h lstm::forward_int8): x [B,T,D] float32; kernel and
// recurrent packed by pack_int8 from [D,4U] and [U,4U], with their column scales [4U]; bias [4U];
// h0, c0 [B,U]; mask [B,T]. Returns Y ([B,T,U] with seq, else [B,U]), hT, cT.
std::vector<torch::Tensor> int8_lstm_forward(const torch::Tensor& x, const torch::Tensor& kernel,
                                             const torch::Tensor& kernel_scales, const torch::Tensor& recurrent,
                                             const torch::Tensor& recurrent_scales,
                                             const c10::optional<torch::Tensor>& bias, const torch::Tensor& h0,
                                             const torch::Tensor& c0, const c10::optional<torch::Tensor>& mask,
                                             bool go_backwards, bool zero_output_for_mask, bool return_sequences,
                                             int64_t activation, int64_t recurrent_activation);

// Streaming inference of the int8 LSTM, one step per call (forward_int8 with T = 1) on states of its
// own: step(x) [B,D] float32 writes h into a new [B, U] tensor, or returns an undefined tensor (None)
// when x is not a CPU float32 tensor (the caller converts it). Keeps the packed weights alive.
class Int8LSTMStep {
 public:
  Int8LSTMStep(torch::Tensor kernel, torch::Tensor kernel_scales, torch::Tensor recurrent,
               torch::Tensor recurrent_scales, c10::optional<torch::Tensor> bias, int64_t input_size, int64_t batch,
               int64_t activation, int64_t recurrent_activation);
  void set_state(const torch::Tensor& h, const torch::Tensor& c);
  std::vector<torch::Tensor> state() const;
  torch::Tensor step(const torch::Tensor& x);

 private:
  torch::Tensor kernel_, kernel_scales_, recurrent_, recurrent_scales_, bias_, h_, c_;
  int64_t B_, D_, U_;
  lstm_core::lstm::Flags flags_;
};

// ----- per-row lengths and resets (packing.cpp) ---------------------------------------------------
// The packed layout of rows with lengths [B] (int64, in [0, T], some > 0) and resets (bool [B, T] by
// time index, or none): a segment per episode of each row (its valid steps, split before each
// reset), sorted longest first. Returns, all CPU: rows [V] (the batch row of each segment), restarts
// [V] (bool: starts after a reset), batch_sizes [S] (step s is taken by segments [0, batch_sizes[s])),
// sources [N] (each packed row's row of x viewed [B*T, D]), positions [N] (the output position it
// shows, of [B*T, P] in processing order), running [B'] (the rows with length > 0), last [B'] (the
// segment each of them ends in).
std::vector<torch::Tensor> packing_plan(const torch::Tensor& lengths, const c10::optional<torch::Tensor>& reset_o,
                                        int64_t steps, bool go_backwards);

// rows [N, F] placed at the distinct indices [N] of a [total, F] tensor, zeros elsewhere (from the
// buffer pool: no page faults for a call's outputs or input gradient).
torch::Tensor scatter_rows(const torch::Tensor& rows, const torch::Tensor& index, int64_t total);

// rows [M, F] at the indices [N] as a new [N, F] tensor (from the buffer pool): index_select's
// numbers, several times faster on a call's x (1151 rows of [5120, 100]: 118 us in index_select)
torch::Tensor gather_rows(const torch::Tensor& rows, const torch::Tensor& index);

// ----- low-precision operands (operands.cpp) -----------------------------------------------------
// The tensors of a float32 recurrence with bfloat16/float16 operands (`operand` 1 or 2; fused.py,
// operands_in_float32): those marked in `rounded` rounded to the operand type, every floating one in
// float32, the rest as they are; one pass per tensor (ATen's two dtype copies of a [100, 256] weight
// take 12.4 us, a clone 4.3 us) and one call for them all.
std::vector<torch::Tensor> operands_in_float32(const std::vector<torch::Tensor>& tensors,
                                               const std::vector<bool>& rounded, int64_t operand);

// ----- dropout's keep-masks (keep_masks.cpp) ------------------------------------------------------
// float32 [count]: element n is 1 when counter_bits(seed, n) < threshold (counter_hash.h), else 0.
torch::Tensor keep_mask(int64_t seed, int64_t count, int64_t threshold);

// ----- one step (streaming_ops.cpp) ----------------------------------------------------------------
// One step for a tiny batch without saving (rnn.h: lstm::SingleStep): x [B,1,D] or [B,D], the
// tensors dense. Returns Y ([B,1,U] with seq, else [B,U]), hT, cT.
std::vector<torch::Tensor> single_step(const torch::Tensor& x, const torch::Tensor& kernel, const torch::Tensor& R,
                                       const torch::Tensor& bias, const torch::Tensor& h0, const torch::Tensor& c0,
                                       const torch::Tensor& mask, bool seq, bool zero_out, int64_t act,
                                       int64_t ract);

// The Keras cell call's lean route (`out, [h, c] = cell(x_t, [h, c])`): the layer route's checks
// answered here, then single_step. Returns an empty list when the call is not this route's (a
// dtype, device, layout or shape the full route converts or reports, a batch over kSmallBatch):
// the caller then takes the full route, which gives the same numbers or the error; [None] when
// every check passes but a tensor needs grad (the caller runs the autograd Function). h and c
// absent: zeros.
std::vector<torch::Tensor> cell_step(const torch::Tensor& x, const c10::optional<torch::Tensor>& h_o,
                                     const c10::optional<torch::Tensor>& c_o, const torch::Tensor& kernel,
                                     const torch::Tensor& R, const c10::optional<torch::Tensor>& bias_o, int64_t act,
                                     int64_t ract);

// Streaming inference (rnn.h: lstm::StreamingStep) on buffers of its own: it keeps references to
// the weight tensors and re-packs them when their in-place version changes. step(x) writes h into
// a new [B, U] tensor (one allocation; never aliased with the state), or returns None when x is
// not a CPU tensor of the weights' dtype (the caller converts it).
class LSTMStep {
 public:
  LSTMStep(torch::Tensor kernel, torch::Tensor rec, c10::optional<torch::Tensor> bias_o, int64_t batch, int64_t act,
           int64_t ract);
  void refresh();
  void set_state(torch::Tensor h, torch::Tensor c);
  std::vector<torch::Tensor> state();
  torch::Tensor step(const torch::Tensor& x);

 private:
  torch::Tensor pack(const torch::Tensor& w) const;
  template <typename T>
  void run(const torch::Tensor& x, torch::Tensor& out);

  torch::Tensor kernel_ref_, rec_ref_, bias_ref_;
  int64_t kernel_version_ = -1, rec_version_ = -1, bias_version_ = -1;  // as packed
  int64_t B_, D_, U_;
  lstm_core::lstm::StreamingStep core_;
  torch::Tensor W_packed_, bias_packed_, xh_, c_, z_;  // rnn.h: StreamingStep::run's buffers
};

// The variants: xk = x @ kernel [B,T,GU] (time order, contiguous), gate_gain [2,GU] (layer norm: g_x, g_h),
// bias [GU] (forget_bias included), R [Ps,GU], P [U,Ps]; zoneout_*, keep_h, keep_c as
// rnn.h's lstm::Params. Returns Y, hT, cT and, with save, G, Hp, Cp, Ahat, rstd_h, mean_c,
// rstd_c, Hu, xk itself, rstd_x, mean_x (undefined where unused; rnn.h: lstm::Saved) and, with
// trace (which implies save), each step's h and C after zoneout [B,T,*] in processing order.
// operand: 0, or bfloat16 (1) / float16 (2) rounding of h at every step (rnn.h: lstm::Flags), the
// tensors float32 holding values the caller rounded (x, the kernels, h0).
std::vector<torch::Tensor> variant_forward(torch::Tensor xk, c10::optional<torch::Tensor> gate_gain_o,
                                           c10::optional<torch::Tensor> bias_o, torch::Tensor R,
                                           c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
                                           c10::optional<torch::Tensor> gain_c_o,
                                           c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
                                           int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h,
                                           int64_t keep_c, c10::optional<torch::Tensor> mask_o,
                                           c10::optional<torch::Tensor> batch_sizes_o, torch::Tensor h0,
                                           torch::Tensor c0, bool backwards, bool zero_out, bool seq, bool coupled,
                                           int64_t act, int64_t ract, double clip, bool save, bool trace,
                                           int64_t operand);

// saved: the forward's (empty where unused). Returns dxk [B,T,GU], DA [B,T,GU] (layer norm; else
// undefined: it equals dxk), Dr [B,T,Ps] (projection), dh0, dc0, d peephole, d gain_c, d shift_c,
// d gate_gain, d bias (rnn.h: lstm::Gradients). consume: the saved buffers are not read
// again, so dxk is written over G (with layer norm: over xk, and DA over Ahat).
std::vector<torch::Tensor> variant_backward(
    c10::optional<torch::Tensor> dY_o, c10::optional<torch::Tensor> dhT_o, c10::optional<torch::Tensor> dcT_o,
    std::vector<torch::Tensor> saved, c10::optional<torch::Tensor> gate_gain_o, c10::optional<torch::Tensor> bias_o,
    torch::Tensor R, c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
    c10::optional<torch::Tensor> gain_c_o, c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
    int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h, int64_t keep_c,
    c10::optional<torch::Tensor> mask_o, c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
    bool seq, bool coupled, int64_t act, int64_t ract, double clip, bool consume);

// ----- the GRU (gru_ops.cpp) and the SimpleRNN (simple_rnn_ops.cpp) ------------------------------
// Python's keyword names: the parameter names less the _o (module.cpp). Autograd is the caller's (a hand-derived
// backward). The saved buffers are time-indexed (flip them for go_backwards): the traces are GRU
// z, r, h_tilde = gates' thirds, h = z * h_prev + (1 - z) * h_tilde (the step's own value, also at
// a masked step); SimpleRNN h = outputs. One streaming step (Keras `cell(x_t, h)`) is the forward
// with T = 1, save = false: measured 8 us a GRU step, 4.5 us a SimpleRNN step at batch 1, D=32,
// U=64 (the LSTM's own single step: 5 us); the binding call is a good part of it.
//
// x [B,T,D], kernel [D,3U], recurrent_kernel [U,3U], bias (None | [3U] | [2,3U]), h0 [B,U],
// input_dropout (None | [1|3,B,D]), recurrent_dropout (None | [3,B,U]), mask (None | bool [B,T]).
// Returns [y, h_last] and, with save, [gates, h_prev, candidate_input] (rnn.h: gru::Forward).
// operand: 0, or bfloat16 (1) / float16 (2) rounding of h and the per-step products' operands
// (rnn.h: SequenceOptions), the float32 tensors holding values the caller rounded.
// batch_sizes (None | int64 [T], CPU): packed, as lstm_forward's (rnn.h: the GRU's and SimpleRNN's
// packed layout): x [N,1,D], input_dropout per packed row [1|3,N,D], recurrent_dropout per batch
// row in the packed order, B = batch_sizes[0], y (return_sequences) and the saved buffers [N,1,*];
// no mask, go_backwards false. The backward takes the same.
std::vector<torch::Tensor> gru_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                       c10::optional<torch::Tensor> bias_o, torch::Tensor h0,
                                       c10::optional<torch::Tensor> input_dropout_o,
                                       c10::optional<torch::Tensor> recurrent_dropout_o,
                                       c10::optional<torch::Tensor> mask_o,
                                       c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                       bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                       int64_t recurrent_activation, bool reset_after, bool save, int64_t operand);

// dy (None | y's shape), dh_last (None | [B,U]), bias_dim (0 none, 1 [3U], 2 [2,3U]), the saved
// buffers and the forward's arguments; needs: which of dx, dkernel, drecurrent_kernel, dbias, dh0
// to form. Returns them (undefined where not needed).
std::vector<torch::Tensor> gru_backward(c10::optional<torch::Tensor> dy_o, c10::optional<torch::Tensor> dh_last_o,
                                        torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                        int64_t bias_dim, torch::Tensor gates, torch::Tensor h_prev,
                                        torch::Tensor candidate_input, c10::optional<torch::Tensor> input_dropout_o,
                                        c10::optional<torch::Tensor> recurrent_dropout_o,
                                        c10::optional<torch::Tensor> mask_o,
                                        c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                        bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                        int64_t recurrent_activation, bool reset_after, std::vector<bool> needs,
                                        int64_t operand);

// As gru_forward with kernel [D,U], recurrent_kernel [U,U], bias (None | [U]), input_dropout
// (None | [1,B,D]), recurrent_dropout (None | [1,B,U]); packed likewise. Returns [y, h_last] and,
// with save, [outputs, h_prev] (rnn.h: simple_rnn::Forward).
std::vector<torch::Tensor> simple_rnn_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                              c10::optional<torch::Tensor> bias_o, torch::Tensor h0,
                                              c10::optional<torch::Tensor> input_dropout_o,
                                              c10::optional<torch::Tensor> recurrent_dropout_o,
                                              c10::optional<torch::Tensor> mask_o,
                                              c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                              bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                              bool save, int64_t operand);

// As gru_backward, bias_dim 0 or 1. Returns [dx, dkernel, drecurrent_kernel, dbias, dh0].
std::vector<torch::Tensor> simple_rnn_backward(c10::optional<torch::Tensor> dy_o,
                                               c10::optional<torch::Tensor> dh_last_o, torch::Tensor x,
                                               torch::Tensor kernel, torch::Tensor recurrent_kernel, int64_t bias_dim,
                                               torch::Tensor outputs, torch::Tensor h_prev,
                                               c10::optional<torch::Tensor> input_dropout_o,
                                               c10::optional<torch::Tensor> recurrent_dropout_o,
                                               c10::optional<torch::Tensor> mask_o,
                                               c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                               bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                               std::vector<bool> needs, int64_t operand);
