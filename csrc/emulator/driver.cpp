// The emulator's C interface, loaded by the tests through ctypes (tests/csrc/emulator.py):
// runs the fused kernels, the head-refit kernels and the L-BFGS direction kernel of csrc/cuda on
// host memory, and small self-test kernels for the emulator's own instructions. Every function
// returns 0, or 1 with the error in `err`.
#define MMKERNELS_EMULATOR 1

#include "../cuda/fused_launch.cuh"
#include "../cuda/heads_launch.cuh"

#include <cstddef>
#include <cstring>
#include <exception>

using namespace mmkernels::cuda;

namespace {

template <class Fn>
int guarded(char* err, int errlen, Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    if (err && errlen > 0) {
      std::strncpy(err, e.what(), (size_t)errlen - 1);
      err[errlen - 1] = 0;
    }
    return 1;
  }
}

// ---- self-test kernels (one warp) ----------------------------------------------------------------

// Each lane loads its mma operands straight from global memory at the positions the PTX ISA
// gives for its fragments (the table in the caller, `a_pos` / `b_pos` / `c_pos`: lane-major
// element indices into row-major A [16 x K], B [K x 8] (k-major), D [16 x 8]), runs one
// mma.sync and stores its D fragment at the same C positions.
template <int Kind>
void mma_lane(const float* A, const float* B, const int32_t* a_pos, const int32_t* b_pos,
              const int32_t* c_pos, float* D) {
  const int lane = threadIdx.x;
  uint32_t a[4], b[2];
  float d[4];
  if (Kind == 2) {  // tf32: one element per register
    for (int j = 0; j < 4; ++j) a[j] = to_tf32(A[a_pos[lane * 4 + j]]);
    for (int j = 0; j < 2; ++j) b[j] = to_tf32(B[b_pos[lane * 2 + j]]);
  } else {  // two 16-bit elements per register, the lower index in the low half
    auto pack = [](float lo, float hi) {
      uint16_t l, h;
      if (Kind == 0) {
        l = bits_of(__float2bfloat16_rn(lo));
        h = bits_of(__float2bfloat16_rn(hi));
      } else {
        l = bits_of(__float2half_rn(lo));
        h = bits_of(__float2half_rn(hi));
      }
      return uint32_t(l) | (uint32_t(h) << 16);
    };
    for (int j = 0; j < 4; ++j) a[j] = pack(A[a_pos[lane * 8 + 2 * j]], A[a_pos[lane * 8 + 2 * j + 1]]);
    for (int j = 0; j < 2; ++j) b[j] = pack(B[b_pos[lane * 4 + 2 * j]], B[b_pos[lane * 4 + 2 * j + 1]]);
  }
  for (int j = 0; j < 4; ++j) d[j] = D[c_pos[lane * 4 + j]];
  if (Kind == 0) mma_bf16_16816(d, a, b);
  else if (Kind == 1) mma_f16_16816(d, a, b);
  else mma_tf32_1688(d, a, b);
  for (int j = 0; j < 4; ++j) D[c_pos[lane * 4 + j]] = d[j];
}

// Copies `rows` x 8 b16 values into shared memory (row stride 8 + pad elements), then one
// ldmatrix .x4 (Trans: .trans) whose lane l addresses row l of the copied rows; writes each
// lane's four registers to out[lane * 4 + i].
template <bool Trans>
void ldmatrix_lanes(const uint16_t* src, int pad, uint32_t* out) {
  MMK_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<uint16_t*>(smem);
  const int lane = threadIdx.x, ld = 8 + pad;
  for (int c = 0; c < 8; ++c) sstore(&s[lane * ld + c], src[lane * 8 + c]);
  __syncthreads();
  uint32_t r[4];
  ldmatrix<4, Trans>(r, &s[lane * ld]);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

}  // namespace

extern "C" {

int mmk_emu_problem_bytes() { return (int)sizeof(FusedProblem); }
int mmk_emu_problem_offset_workspace() { return (int)offsetof(FusedProblem, workspace); }

int mmk_emu_forward(const FusedProblem* f, int fault, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (fault == kSkipBarrier) forward<kSkipBarrier>(*f, nullptr);
    else if (fault == kOffByOneTile) forward<kOffByOneTile>(*f, nullptr);
    else forward<kNoFault>(*f, nullptr);
  });
}

int64_t mmk_emu_backward_workspace_elems(const FusedProblem* f) {
  return backward_workspace_elems(*f);
}

int mmk_emu_backward(const FusedProblem* f, int fault, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (fault == kSkipBarrier) backward<kSkipBarrier>(*f, nullptr);
    else if (fault == kOffByOneTile) backward<kOffByOneTile>(*f, nullptr);
    else backward<kNoFault>(*f, nullptr);
  });
}

int mmk_emu_gram_problem_bytes() { return (int)sizeof(GramProblem); }
int mmk_emu_softmax_problem_bytes() { return (int)sizeof(SoftmaxProblem); }
int mmk_emu_softmax_problem_offset_workspace() { return (int)offsetof(SoftmaxProblem, workspace); }

int64_t mmk_emu_gram_workspace_elems(const GramProblem* f) { return gram_workspace_elems(*f); }

int mmk_emu_gram(const GramProblem* f, char* err, int errlen) {
  return guarded(err, errlen, [&] { launch_gram(*f, nullptr); });
}

int64_t mmk_emu_softmax_workspace_elems(const SoftmaxProblem* f, char* err, int errlen) {
  int64_t n = -1;
  guarded(err, errlen, [&] { n = softmax_workspace_elems(*f); });
  return n;
}

int mmk_emu_softmax(const SoftmaxProblem* f, char* err, int errlen) {
  return guarded(err, errlen, [&] { launch_softmax(*f, nullptr); });
}

int mmk_emu_lbfgs_problem_bytes() { return (int)sizeof(LbfgsProblem); }
int mmk_emu_lbfgs_problem_offset_workspace() { return (int)offsetof(LbfgsProblem, workspace); }

int64_t mmk_emu_lbfgs_workspace_elems(const LbfgsProblem* f) { return lbfgs_workspace_elems(*f); }

int mmk_emu_lbfgs(const LbfgsProblem* f, char* err, int errlen) {
  return guarded(err, errlen, [&] { launch_lbfgs(*f, nullptr); });
}

// kind: 0 bf16, 1 f16 (m16n8k16), 2 tf32 (m16n8k8).
int mmk_emu_mma(int kind, const float* A, const float* B, const int32_t* a_pos,
                const int32_t* b_pos, const int32_t* c_pos, float* D, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    auto body = [&] {
      if (kind == 0) mma_lane<0>(A, B, a_pos, b_pos, c_pos, D);
      else if (kind == 1) mma_lane<1>(A, B, a_pos, b_pos, c_pos, D);
      else mma_lane<2>(A, B, a_pos, b_pos, c_pos, D);
    };
    mmk_emu::launch(mmk_emu::dim3(1), mmk_emu::dim3(32), 0, body);
  });
}

int mmk_emu_ldmatrix(int trans, int pad, const uint16_t* src, uint32_t* out, char* err,
                     int errlen) {
  return guarded(err, errlen, [&] {
    const size_t smem = 32 * (8 + pad) * 2;
    if (trans)
      mmk_emu::launch(mmk_emu::dim3(1), mmk_emu::dim3(32), smem, [&] { ldmatrix_lanes<true>(src, pad, out); });
    else
      mmk_emu::launch(mmk_emu::dim3(1), mmk_emu::dim3(32), smem, [&] { ldmatrix_lanes<false>(src, pad, out); });
  });
}

long long mmk_emu_stat(int which) {
  const auto& s = mmk_emu::stats();
  const long long v[] = {s.blocks, s.threads, s.barriers, s.collectives, s.switches};
  return which >= 0 && which < 5 ? v[which] : -1;
}

}  // extern "C"
