// The kernel contract: the recurrences of the LSTM and its variants, the GRU and the SimpleRNN
// over raw buffers, for float and double. The LSTM's have the shape of haste's lib/haste/lstm.h
// (a pass object holds the sizes and options, run() takes the buffers); the GRU's and the
// SimpleRNN's take one argument struct per call. No torch types: the callers (bindings/*.cpp)
// check and allocate, and run the products over all steps at once (x @ kernel before a forward,
// the weight gradients after a backward); these run the steps in between.
//
// Shapes: B batch rows, T time steps (`steps`; T is the element type in code), D input features,
// U units. Buffers are dense, row-major and batch-major like the caller's x [B,T,D]. Step s
// processes time index t = s, or T-1-s going backwards; a [B,T,*] buffer is indexed by t, so its
// rows at one step are T rows apart (BLAS takes that as the leading dimension: nothing is ever
// transposed or flipped).
// Masks (Keras): keep [B,T], true where a step counts (nullptr: all do). A masked step keeps
// (h, c); its output repeats the previous output (zeros before the first step), or is zero with
// zero_out.
// Activation codes (simd.h): tanh 0, sigmoid 1, relu 2, linear 3, hard_sigmoid 4,
// hard_sigmoid_tf_keras 5; the backward takes the derivatives from the activated values.
// Threads: each LSTM run() and each GRU and SimpleRNN loop spreads the batch rows over ATen's
// threads itself (threads.h), each thread running every step for its rows.
// Packed calls (per-row lengths): the same buffers in torch's PackedSequence layout (row_layout.h),
// where each batch row takes only its own steps (lstm::Params::batch_sizes, and the GRU's and
// SimpleRNN's `batch_sizes` below).
#pragma once

#include <cstdint>

namespace lstm_core {

// ----- the LSTM and its variants (lstm.cpp) --------------------------------------------------------
// The plain cell and its variants (peephole, layer norm, projection, coupled gates, cell clip,
// zoneout, in any combination) are options of one recurrence; the maths is reference.py's. Per
// step, for each batch row:
//   z = xk + b + A, A = h_{t-1} @ R (per gate when recurrent dropout masks h); with layer norm
//   z = LN(xk) g_x + LN(A) g_h + b (b: the bias, forget_bias included); peepholes, gates,
//   C = clip(f C_{t-1} + i C̃), o, hu = o act(C or LN(C) g_c + b_c), h = hu @ P (projection),
//   zoneout, Keras masking.
// Sizes: GU = G*U gate columns (G = 4 gate blocks i|f|c|o, or 3 f|c|o with coupled gates, i = 1-f);
// Ps = the size of h (the projection's, or U).
// Before a forward the caller forms xk = x @ kernel (input dropout masks first) and the
// DropConnect mask on R; after a backward, dkernel = x^T dxk, dx = dxk kernel^T, dR = Hp^T DA (per
// gate times rec_drop with recurrent dropout) and dP = Hu^T Dr.
namespace lstm {

struct Flags {
  bool backwards;  // go_backwards
  bool zero_out;   // zero_output_for_mask
  bool seq;        // return_sequences: Y [B,T,Ps], else [B,Ps] (the last output)
  bool coupled;    // i = 1 - f, G = 3
  bool peephole, ln, proj;  // the variants on: peepholes, layer norm, projection
  bool save;       // training: write the saved buffers
  int act, ract;   // activation (candidate and cell output), recurrent activation (i, f, o)
  double clip;     // the cell clip; < 0: none
  // low-precision operands (low_precision.h Operand; float only): 0 none; 1 bfloat16, 2 float16.
  // h is rounded to it at every step (with a projection hu, its operand, too), so outputs and
  // states hold rounded values; the caller rounds the weights and x. The plain cell takes its
  // per-step products on operand_right.h's (AMX tiles in bf16, else MKL's low-precision GEMM) where
  // Params::R_low is given; every other product is float's on the rounded values (the same
  // products, accumulated in float32)
  int operand;
};

// The weights, masks and sizes of one call; nullptr where a variant is off.
template <typename T>
struct Params {
  const T* gain_x;   // [GU] layer norm of xk: g_x
  const T* bias;     // [GU]
  const T* R;        // [Ps,GU] the recurrent kernel
  const T* RT;       // [GU,Ps] R transposed (the backward's)
  // with an operand type (Flags::operand): R, RT hold its values as T; these, its bits
  const uint16_t* R_low;   // [Ps,GU] R (nullptr: R's products stay in T)
  const uint16_t* RT_low;  // [GU,Ps] R transposed (the backward's)
  // buffers written in the operand type instead of T (half the memory traffic), or nullptr
  uint16_t* Y_low;    // [B,T,Ps] the outputs with flags.seq (Y is not written)
  uint16_t* Hp_low;   // [B,T,Ps] Saved::Hp (not written)
  uint16_t* dXW_low;  // [B,T,GU] Gradients::dXW (not written; the backward's products read it)
  const T* rd;       // [G,B,Ps] recurrent dropout masks on h_{t-1}, one per gate
  const T* peep;     // [3,U] peephole weights i|f|o, or [2,U] f|o when coupled
  const T* gain_h;   // [GU] layer norm of A: g_h
  const T* gain_c;   // [U] layer norm of C: g_c
  const T* shift_c;  // [U] layer norm of C: b_c
  const T* P;        // [U,Ps] the projection
  const T* PT;       // [Ps,U] P transposed (the backward's)
  const bool* mask;  // [B,T] keep
  // [Tn] the packed layout (row_layout.h: torch's PackedSequence, time-major, the rows sorted by
  // length, longest first, step s taking the first batch_sizes[s]; forwards, no mask), or nullptr:
  // batch-major. Packed, every [B,T,*] buffer below is [N,*] with N the sum of batch_sizes, the
  // outputs with flags.seq too, and a batch row's weights-side buffers ([B,*], rd) are in that order
  const int64_t* batch_sizes;
  // zoneout (problem.Zoneout): a counter-based draw from the seed, so the forward and the
  // backward draw the same flags with no mask memory; thresholds on 24-bit uniforms (0: off)
  uint64_t zoneout_seed, keep_h, keep_c;
  int64_t zoneout_offset;  // the global processing step of the call's first step
  int64_t B, Tn, U, Ps, GU, G;
};

// The forward's saved buffers (training), indexed by time like xk; nullptr where a variant has
// none. LN(C) and LN(xk) are recomputed in the backward from C and xk (less memory traffic than
// writing them here and reading them back).
template <typename T>
struct Saved {
  T* G;       // [B,T,GU] the activated gates: xk itself without layer norm (written over it)
  T* Hp;      // [B,T,Ps] h_{t-1}
  T* Cp;      // [B,T,U] C_{t-1} (C_t is recomputed from G and C_{t-1})
  T* Ahat;    // [B,T,GU] layer norm: LN(A)
  T* rstd_h;  // [B,T] layer norm: 1/std of A's row
  T* mean_c;  // [B,T] layer norm: C's mean
  T* rstd_c;  // [B,T] layer norm: 1/std of C
  T* Hu;      // [B,T,U] projection: hu, h before the projection
  T* Xk;      // [B,T,GU] layer norm: xk itself (the forward's input, kept as it is)
  T* rstd_x;  // [B,T] layer norm: 1/std of xk's row
  T* mean_x;  // [B,T] layer norm: xk's mean
};

// The backward's outputs; nullptr where a variant has none or the caller needs none.
template <typename T>
struct Gradients {
  T* dXW;         // [B,T,GU] dL/dxk (zero at masked steps); may be Saved::G, or Saved::Xk with
                  // layer norm (each step writes rows it has just read: in cache, where a fresh
                  // buffer's lines are first fetched for ownership)
  T* DA;          // [B,T,GU] layer norm: dL/dA, through the norm (may be Saved::Ahat); else
                  // nullptr: it equals dXW
  T* Dr;          // [B,T,Ps] projection: dL/dr of every step, r = hu @ P (before zoneout)
  T* dh0;         // [B,Ps]
  T* dc0;         // [B,U]
  T* dpeep;       // [3,U] or [2,U] as Params::peep
  T* dgain_c;     // [U]
  T* dshift_c;    // [U]
  T* dgate_gain;  // [2,GU] g_x, g_h
  T* dbias;       // [GU], or nullptr: not needed
};

template <typename T>
class ForwardPass {
 public:
  ForwardPass(const Params<T>& params, const Flags& flags);

  // The whole sequence; steps >= 1 (the caller answers an empty one).
  // xk: [B,T,GU] x @ kernel, in time order: without layer norm the activated gates are written
  //     over it (Saved::G is xk or nullptr); with layer norm read only (it is Saved::Xk)
  // h0: [B,Ps], c0: [B,U] the initial state
  // Y: [B,T,Ps] with flags.seq, else [B,Ps]; hT: [B,Ps], cT: [B,U] the final state
  // saved: written with flags.save (else all nullptr)
  // Htr, Ctr: [B,T,Ps], [B,T,U] each step's own h and C after zoneout, masked or not, in
  //     processing order (the reference's trace; implies save), or nullptr
  void run(T* xk, const T* h0, const T* c0, T* Y, T* hT, T* cT, const Saved<T>& saved, T* Htr, T* Ctr) const;

  // Inference of the plain cell without the [B,T,GU] projection buffer (for big shapes it costs
  // page faults and memory bandwidth, not FLOPs): each step is one GEMM [x_t, h] @ [kernel; R];
  // no dropout. x: [B,T,D]; W: [D+U,4U] = [kernel; R]; the rest as run(). steps >= 1.
  void run_fused_input(int64_t input_size, const T* x, const T* W, const T* h0, const T* c0, T* Y, T* hT,
                       T* cT) const;

  // run_fused_input with low-precision operands (float, Flags::operand): x [B,T,D] and W [D+U,4U]
  // as the operand type's bits; with flags.seq the outputs go to Params::Y_low (Y unused), else
  // to Y [B,U] in float. h is rounded at every step, hT too.
  void run_fused_input_low(int64_t input_size, const uint16_t* x, const uint16_t* W, const T* h0, const T* c0, T* Y,
                           T* hT, T* cT) const;

 private:
  Params<T> params_;
  Flags flags_;
};

template <typename T>
class BackwardPass {
 public:
  BackwardPass(const Params<T>& params, const Flags& flags);

  // dY: [B,T,Ps] with flags.seq, else [B,Ps]; dhT: [B,Ps], dcT: [B,U]; each nullptr: zero
  // saved: the forward's; grads: written (the weight gradients summed over the batch)
  void run(const T* dY, const T* dhT, const T* dcT, const Saved<T>& saved, const Gradients<T>& grads) const;

 private:
  Params<T> params_;
  Flags flags_;
};

// One step without saving, for a tiny batch (up to kSmallBatch rows, gemm.h): the Keras cell
// call and a one-step layer call. No input-projection GEMM, no scratch tensors: z = bias +
// x @ kernel + h0 @ R in register tiles (small_gemm.h). It is the first step: a masked row keeps
// (h0, c0) and outputs zeros.
template <typename T>
class SingleStep {
 public:
  SingleStep(int64_t batch, int64_t input_size, int64_t units, int act, int ract);

  // x: [B,D]; kernel: [D,4U]; R: [U,4U]; bias: [4U] or nullptr; h0, c0: [B,U];
  // keep: [B] or nullptr; Y, hT, cT: [B,U] out (the output and the new state)
  void run(const T* x, const T* kernel, const T* R, const T* bias, const T* h0, const T* c0, const bool* keep,
           T* Y, T* hT, T* cT) const;

 private:
  int64_t B_, D_, U_;
  int act_, ract_;
};

// Streaming inference, one step per call (streaming.cpp). The input and recurrent products are
// one, xh @ W with xh = [x_t, h] [B,D+U] and W = [kernel; R] [D+U,4U], W packed in P panels of
// NB = small_gemm::kPanel<T> columns: panel p holds the four gates' columns of units
// [p*UP, (p+1)*UP), UP = NB/4 (zero columns past U), contiguous, so one register tile gives all
// four gates of UP units and the gate math follows at once. With several threads each takes a
// range of panels (its share of W stays in its core's L2 from step to step).
//
// Splitting a step over the threads pays only while they get a core at once; on a busy machine
// a split step can wait milliseconds for one. A split step far slower than the best one turns
// splitting off for a while (doubling while that recurs, halving after a good split): the
// object keeps that state between steps.
class StreamingStep {
 public:
  StreamingStep(int64_t batch, int64_t input_size, int64_t units, int64_t panel_width, int act, int ract);

  int64_t panel_count() const { return P_; }       // P
  int64_t panel_units() const { return UP_; }      // UP
  int64_t panel_width() const { return NB_; }      // NB

  // x: [B,D] this step's input
  // xh: [B,D+U] in: h in columns D.. (the previous step's); out: x there, then this step's h
  // W: [P,D+U,NB] the packed weights; bias: [P,NB] the packed bias (zeros: none)
  // z: [B,P*NB] scratch
  // c: [B,U] the cell state, in and out
  // h: [B,U] out: this step's h (not aliased with xh)
  template <typename T>
  void run(const T* x, T* xh, const T* W, const T* bias, T* z, T* c, T* h);

 private:
  template <typename T>
  void run_panels(int64_t p0, int64_t p1, const T* xh, const T* W, const T* bias, T* z, T* c, T* h) const;

  int64_t B_, D_, U_, UP_, P_, NB_;
  int act_, ract_;
  double best_split_s_ = 1e300;
  int64_t serial_steps_ = 0, backoff_ = 64;  // steps left unsplit, and the next backoff
};

extern template void StreamingStep::run<float>(const float*, float*, const float*, const float*, float*, float*,
                                               float*);
extern template void StreamingStep::run<double>(const double*, double*, const double*, const double*, double*,
                                                double*, double*);

// multiply-adds of a streaming step from which it uses the threads (measured on 2 cores: from
// about D=128, U=128; set_stream_parallel_work)
extern int64_t kStreamParallelWork;

// Inference of the plain cell with int8 weights (lstm.quantize; problem.py Recurrence.quantized),
// in float32 (int8_lstm.cpp). Per step, for each batch row:
//   z = (q(x_t) @ Wq) sx sw + bias + (q(h_{t-1}) @ Rq) sh sr, in that order
// with q(.) a row quantized as it comes (int8_product.h quantize_row: sx, sh its scales) and Wq, Rq
// the int8 weights with their column scales sw, sr; the products' int32 sums exact. Then the gate
// math, C and h in float32, and Keras' masking, as ForwardPass::run_fused_input. Each thread runs
// every step for a range of the batch rows.
struct Int8Weights {
  const int8_t* kernel;           // Int8Right-packed [D,4U]
  const float* kernel_scales;     // [4U]
  const int8_t* recurrent;        // Int8Right-packed [U,4U]
  const float* recurrent_scales;  // [4U]
  const float* bias;              // [4U] or nullptr
};

// x: [B,T,D]; keep: [B,T] or nullptr; h0, c0: [B,U]; Y: [B,T,U] with flags.seq, else [B,U];
// hT, cT: [B,U]. Only flags' backwards, zero_out, seq, act and ract are read. steps >= 1.
void forward_int8(const Int8Weights& w, int64_t B, int64_t steps, int64_t D, int64_t U, const float* x,
                  const bool* keep, const Flags& flags, const float* h0, const float* c0, float* Y, float* hT,
                  float* cT);

extern template class ForwardPass<float>;
extern template class ForwardPass<double>;
extern template class BackwardPass<float>;
extern template class BackwardPass<double>;
extern template class SingleStep<float>;
extern template class SingleStep<double>;

}  // namespace lstm

// ----- the GRU and the SimpleRNN (gru.cpp, simple_rnn.cpp) -----------------------------------------
// A loop runs the whole call: it spreads the B batch rows over ATen's threads in chunks (threads.h
// chunk_count, run_chunks; row_layout.h Chunk), each thread running every step for its rows. Outputs
// y are in processing order. The gates of a masked step are still computed and saved (traces read
// them; the backward ignores them). The input projection x @ kernel (input dropout applied) and
// the weight gradients are the caller's GEMMs over all steps at once; the loops add the bias row by
// row.
// Packed (batch_sizes given: row_layout.h, as lstm::Params::batch_sizes): every [B,T,*] buffer
// below is [N,*] with N the sum of batch_sizes, y with return_sequences too; B = batch_sizes[0],
// and the per-batch-row buffers ([B,*]: h0, h_last, dh, bias_rows; the recurrent dropout masks)
// hold the rows in the packed order; forwards, no mask (go_backwards false, keep null). Only the
// rows taking a step run it (its products and gate math): work in proportion to the sum of the
// lengths. A packed backward without return_sequences takes no dy: the caller gives the last
// output's gradient (the final state's) in dh.

// The options of a sequence call besides its weights (activation codes above).
struct SequenceOptions {
  bool go_backwards;
  bool zero_output_for_mask;
  bool return_sequences;  // y [B,T,U] in processing order, else the last output [B,U]
  int activation;
  int recurrent_activation;  // GRU z and r (the SimpleRNN has none)
  bool reset_after;          // GRU: r multiplies h @ R_h + b_h (true) or h before the product (false)
  // low-precision operands, as lstm::Flags::operand (float only): h rounded at every step, and the
  // other operands of the per-step products (h after its dropout mask; the GRU's r * h); with the
  // weights' bits given, the per-step products on operand_right.h's (AMX tiles in bf16, else MKL's
  // low-precision GEMM; the backward's dz rounded for them)
  int operand;
};

// GRU, gates z | r | h_tilde (Keras' order):
//   z = σ(x W_z + h R_z + b), r = σ(x W_r + h R_r + b)
//   reset_after: h_tilde = act(x W_h + b_in + r * (h R_h + b_rec)); else act(x W_h + b + (r * h) R_h)
//   h_new = z * h + (1 - z) * h_tilde
namespace gru {

template <typename Scalar>
struct Forward {
  int64_t batch, steps, units;      // B, T, U
  Scalar* gates;                    // [B,T,3U] in: x @ kernel; out: activated z | r | h_tilde
  const Scalar* input_bias;         // [3U] or null
  const Scalar* recurrent_bias;     // [3U] or null (reset_after only: bias[1])
  const Scalar* recurrent_kernel;   // [U,3U]
  const Scalar* recurrent_dropout;  // [3,B,U] keep-masks on h_{t-1}, or null
  const bool* keep;                 // [B,T] step mask (time order), or null
  const Scalar* h0;                 // [B,U]
  Scalar* y;                        // [B,T,U] (return_sequences) or [B,U]
  Scalar* h_last;                   // [B,U]
  // saved for the backward (training), both or neither:
  Scalar* h_prev;           // [B,T,U] the state before the step of time index t, or null
  Scalar* candidate_input;  // [B,T,U] reset_after: h_{t-1} R_h + b_rec_h; else r * h_{t-1} * dropout_h
  // with SequenceOptions::operand: R's bits [U,3U] (the per-step products on operand_right.h's for
  // chunks of kLowGemmRows rows or more), or null
  const uint16_t* recurrent_kernel_low;
  const int64_t* batch_sizes;  // [T] the packed layout, or null: batch-major
};

template <typename Scalar>
struct Backward {
  int64_t batch, steps, units;
  const Scalar* dy;                 // [B,T,U] or [B,U] (as y), or null
  const Scalar* gates;              // [B,T,3U] the forward's gates
  const Scalar* h_prev;             // [B,T,U]
  const Scalar* candidate_input;    // [B,T,U]
  // reset_after: [3U,U] = [R_h; R_z; R_r]^T (the blocks in dz's order); else R^T [3U,U]
  const Scalar* recurrent_kernel_t;
  const Scalar* recurrent_dropout;  // [3,B,U] or null
  const bool* keep;                 // [B,T] or null
  Scalar* dh;                       // [B,U] in: dL/dh_last; out: dL/dh0
  // dL/d pre-activations, per time index, zero at masked steps:
  //   reset_after [B,T,4U]: d(h R_h + b_rec_h) | dz | dr | dh_tilde (the input row is dz | dr | dh_tilde,
  //   the recurrent row d(hR_h) | dz | dr); else [B,T,3U]: dz | dr | dh_tilde (both rows)
  Scalar* dz;
  Scalar* bias_rows;  // [B, width of dz]: dz summed over the steps per row (added to), or null
  const uint16_t* recurrent_kernel_t_low;  // recurrent_kernel_t's bits with SequenceOptions::operand, or null
  const int64_t* batch_sizes;              // [T] the packed layout, or null: batch-major
};

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& options);
template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& options);

extern template void forward_loop<float>(const Forward<float>&, const SequenceOptions&);
extern template void forward_loop<double>(const Forward<double>&, const SequenceOptions&);
extern template void backward_loop<float>(const Backward<float>&, const SequenceOptions&);
extern template void backward_loop<double>(const Backward<double>&, const SequenceOptions&);

}  // namespace gru

// SimpleRNN: h_new = act(x W + b + h R)
namespace simple_rnn {

template <typename Scalar>
struct Forward {
  int64_t batch, steps, units;
  Scalar* outputs;                  // [B,T,U] in: x @ kernel; out: every step's own act(...) (masked too)
  const Scalar* bias;               // [U] or null
  const Scalar* recurrent_kernel;   // [U,U]
  const Scalar* recurrent_dropout;  // [1,B,U] or null
  const bool* keep;                 // [B,T] or null
  const Scalar* h0;                 // [B,U]
  Scalar* y;                        // [B,T,U] or [B,U]
  Scalar* h_last;                   // [B,U]
  Scalar* h_prev;                   // [B,T,U] saved state before each step, or null
  const uint16_t* recurrent_kernel_low;  // R's bits with SequenceOptions::operand (as gru::Forward), or null
  const int64_t* batch_sizes;            // [T] the packed layout, or null: batch-major
};

template <typename Scalar>
struct Backward {
  int64_t batch, steps, units;
  const Scalar* dy;                  // [B,T,U] or [B,U], or null
  const Scalar* outputs;             // [B,T,U] the forward's outputs
  const Scalar* recurrent_kernel_t;  // [U,U] R^T
  const Scalar* recurrent_dropout;   // [1,B,U] or null
  const bool* keep;                  // [B,T] or null
  Scalar* dh;                        // [B,U] in: dL/dh_last; out: dL/dh0
  Scalar* dz;                        // [B,T,U] dL/d pre-activation, zero at masked steps
  Scalar* bias_rows;                 // [B,U] (added to), or null
  const uint16_t* recurrent_kernel_t_low;  // R^T's bits with SequenceOptions::operand, or null
  const int64_t* batch_sizes;              // [T] the packed layout, or null: batch-major
};

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& options);
template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& options);

extern template void forward_loop<float>(const Forward<float>&, const SequenceOptions&);
extern template void forward_loop<double>(const Forward<double>&, const SequenceOptions&);
extern template void backward_loop<float>(const Backward<float>&, const SequenceOptions&);
extern template void backward_loop<double>(const Backward<double>&, const SequenceOptions&);

}  // namespace simple_rnn
}  // namespace lstm_core
