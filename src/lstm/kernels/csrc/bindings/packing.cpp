// The host side of per-row lengths and resets (packing.py): the packed layout, built in one pass
// over the rows (in Python the same takes some thirty tensor ops, more than a short call's whole
// recurrence), and the moving of rows between the padded tensors and the packed ones.

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "bindings/bindings.h"
#include "buffer_pool.h"

namespace {

// A segment: one episode of a batch row, its valid steps j in [first, first + length) (j counts a
// row's valid steps in processing order)
struct Segment {
  int64_t row, first, length;
  bool restart;  // starts from the restored states (a reset), else from the initial ones
};

torch::Tensor int64_tensor(const std::vector<int64_t>& values) {
  auto tensor = torch::empty({static_cast<int64_t>(values.size())}, torch::kLong);
  std::copy(values.begin(), values.end(), tensor.data_ptr<int64_t>());
  return tensor;
}

}  // namespace

std::vector<torch::Tensor> packing_plan(const torch::Tensor& lengths, const c10::optional<torch::Tensor>& reset_o,
                                        int64_t steps, bool go_backwards) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == torch::kLong && lengths.is_cpu(),
              "packing_plan: expected lengths an int64 CPU tensor [B]");
  const auto length_values = lengths.contiguous();
  const int64_t* length = length_values.data_ptr<int64_t>();
  const int64_t B = lengths.size(0);
  torch::Tensor reset_values;
  const bool* reset = nullptr;
  if (reset_o && reset_o->defined()) {
    TORCH_CHECK(reset_o->scalar_type() == torch::kBool && reset_o->is_cpu() && reset_o->dim() == 2 &&
                    reset_o->size(0) == B && reset_o->size(1) == steps,
                "packing_plan: expected reset a bool CPU tensor [B, T]");
    reset_values = reset_o->contiguous();
    reset = reset_values.data_ptr<bool>();
  }
  // the segments, in batch-row order
  std::vector<Segment> segments;
  std::vector<int64_t> running, last_segment;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = length[b];
    TORCH_CHECK(0 <= n && n <= steps, "packing_plan: expected lengths in [0, ", steps, "], got ", n);
    if (n == 0) continue;
    auto restarts_at = [&](int64_t j) { return reset && reset[b * steps + (go_backwards ? n - 1 - j : j)]; };
    int64_t first = 0;
    bool restart = restarts_at(0);
    for (int64_t j = 1; j < n; ++j) {
      if (!restarts_at(j)) continue;
      segments.push_back({b, first, j - first, restart});
      first = j;
      restart = true;
    }
    segments.push_back({b, first, n - first, restart});
    running.push_back(b);
    last_segment.push_back(static_cast<int64_t>(segments.size()) - 1);
  }
  TORCH_CHECK(!segments.empty(), "packing_plan: expected a row with a valid step");
  // longest first (stable: equal lengths keep the batch-row order); step s is taken by ranks [0, batch_sizes[s])
  const int64_t V = static_cast<int64_t>(segments.size());
  std::vector<int64_t> order(V), rank(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return segments[a].length > segments[b].length; });
  for (int64_t k = 0; k < V; ++k) rank[order[k]] = k;
  const int64_t longest = segments[order[0]].length;
  std::vector<int64_t> batch_sizes(longest, 0), first_row(longest + 1, 0);
  for (const Segment& segment : segments)
    for (int64_t s = 0; s < segment.length; ++s) ++batch_sizes[s];
  std::partial_sum(batch_sizes.begin(), batch_sizes.end(), first_row.begin() + 1);
  // each packed row's source row of x [B*T, D] and the output position it shows in [B*T, P]
  // (processing order: going backwards, a row's valid steps are its last `length` positions)
  const int64_t N = first_row[longest];
  std::vector<int64_t> sources(N), positions(N), rows(V);
  auto restarts = torch::empty({V}, torch::kBool);
  bool* restart_out = restarts.data_ptr<bool>();
  for (int64_t k = 0; k < V; ++k) {
    const Segment& segment = segments[order[k]];
    const int64_t b = segment.row, n = length[b];
    rows[k] = b;
    restart_out[k] = segment.restart;
    for (int64_t s = 0; s < segment.length; ++s) {
      const int64_t j = segment.first + s, packed = first_row[s] + k;
      sources[packed] = b * steps + (go_backwards ? n - 1 - j : j);
      positions[packed] = b * steps + (go_backwards ? j + steps - n : j);
    }
  }
  std::vector<int64_t> last(running.size());
  for (size_t r = 0; r < running.size(); ++r) last[r] = rank[last_segment[r]];
  return {int64_tensor(rows),    restarts,           int64_tensor(batch_sizes), int64_tensor(sources),
          int64_tensor(positions), int64_tensor(running), int64_tensor(last)};
}

torch::Tensor scatter_rows(const torch::Tensor& rows, const torch::Tensor& index, int64_t total) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_cpu() && index.dim() == 1 && index.scalar_type() == torch::kLong &&
                  index.is_cpu() && index.size(0) == rows.size(0),
              "scatter_rows: expected rows [N, F] and an int64 index [N], on the CPU");
  const auto source = rows.contiguous();
  const auto positions = index.contiguous();
  const int64_t* position = positions.data_ptr<int64_t>();
  // each output row's source row, or -1: a zero row
  std::vector<int64_t> source_of(total, -1);
  for (int64_t n = 0; n < source.size(0); ++n) {
    TORCH_CHECK(0 <= position[n] && position[n] < total && source_of[position[n]] < 0,
                "scatter_rows: expected distinct indices in [0, ", total, ")");
    source_of[position[n]] = n;
  }
  auto out = buffer_pool::empty({total, source.size(1)}, source.options());
  const int64_t row_bytes = source.size(1) * static_cast<int64_t>(source.element_size());
  const char* from = static_cast<const char*>(source.data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, total, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       if (source_of[r] < 0)
                         std::memset(to + r * row_bytes, 0, row_bytes);
                       else
                         std::memcpy(to + r * row_bytes, from + source_of[r] * row_bytes, row_bytes);
                     }
                   });
  return out;
}

torch::Tensor gather_rows(const torch::Tensor& rows, const torch::Tensor& index) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_cpu() && index.dim() == 1 && index.scalar_type() == torch::kLong &&
                  index.is_cpu(),
              "gather_rows: expected rows [M, F] and an int64 index [N], on the CPU");
  const auto source = rows.contiguous();
  const auto picks = index.contiguous();
  const int64_t* pick = picks.data_ptr<int64_t>();
  const int64_t count = picks.size(0), total = source.size(0);
  for (int64_t n = 0; n < count; ++n)
    TORCH_CHECK(0 <= pick[n] && pick[n] < total, "gather_rows: expected indices in [0, ", total, "), got ", pick[n]);
  auto out = buffer_pool::empty({count, source.size(1)}, source.options());
  const int64_t row_bytes = source.size(1) * static_cast<int64_t>(source.element_size());
  const char* from = static_cast<const char*>(source.data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, count, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t n = begin; n < end; ++n)
                       std::memcpy(to + n * row_bytes, from + pick[n] * row_bytes, row_bytes);
                   });
  return out;
}
