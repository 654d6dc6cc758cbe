// Sample-index helpers (Megatron semantics), built on first use by megatron/data/helpers.py.
// The numpy fallback in helpers.py must produce identical arrays; tests/data check that.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// Row k = (index into doc_idx, token offset) where packed sample k starts; sample k spans
// seq_length + 1 tokens up to and including row k + 1 (consecutive samples share one token).
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style> sizes_,
                                      py::array_t<int64_t, py::array::c_style> doc_idx_,
                                      int64_t seq_length, int64_t num_samples) {
  auto sizes = sizes_.unchecked<1>();
  auto doc_idx = doc_idx_.unchecked<1>();
  const int64_t n_doc_idx = doc_idx.shape(0);
  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.mutable_unchecked<2>();
  int64_t doc_idx_index = 0;
  int64_t doc_offset = 0;
  {
    py::gil_scoped_release release;
    out(0, 0) = 0;
    out(0, 1) = 0;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (doc_idx_index >= n_doc_idx) {
          py::gil_scoped_acquire acquire;
          throw std::runtime_error("build_sample_idx: documents exhausted at sample " +
                                   std::to_string(sample));
        }
        const int64_t doc_length = sizes(doc_idx(doc_idx_index)) - doc_offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts on its last token.
          doc_offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          ++doc_idx_index;
          doc_offset = 0;
        }
      }
      out(sample, 0) = doc_idx_index;
      out(sample, 1) = doc_offset;
    }
  }
  return result;
}

// Greedy blending: sample i goes to the dataset furthest below its target share.
py::tuple build_blending_indices(py::array_t<double, py::array::c_style> weights_, int64_t size) {
  auto weights = weights_.unchecked<1>();
  const int64_t n = weights.shape(0);
  py::array_t<int64_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  std::vector<int64_t> current(n, 0);
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < size; ++i) {
      const double denom = i > 1 ? static_cast<double>(i) : 1.0;
      int64_t best = 0;
      double best_err = weights(0) * denom - static_cast<double>(current[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double err = weights(d) * denom - static_cast<double>(current[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      di(i) = best;
      dsi(i) = current[best];
      ++current[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(sepneox_data_helpers, m) {
  m.def("build_sample_idx", &build_sample_idx);
  m.def("build_blending_indices", &build_blending_indices);
}
