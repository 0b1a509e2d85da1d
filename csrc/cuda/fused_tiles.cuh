// Building blocks of the fused kernels: the math policies (tile shapes, the warp-level product
// of two shared-memory tiles, where each accumulator sits in the block tile) and the
// predicated global-to-shared tile copy. No torch header (csrc/cuda/device.cuh).
//
// Shared-memory tiles are stored either K-contiguous (A as [m][k], B as [n][k]) or
// M/N-contiguous (A as [k][m], B as [k][n]); the policies read both (ldmatrix with or without
// .trans for 16-bit types). Rows are padded by 16 bytes: conflict-free ldmatrix, 16-byte rows
// for cp.async.
#pragma once

#include "ptx.cuh"

namespace mmkernels::cuda {

// Deliberate defects, for the emulator's own tests (tests/csrc/test_emulator.py): a kernel
// instantiated with one of these must be caught. Production code uses kNoFault.
enum Fault : int { kNoFault = 0, kSkipBarrier = 1, kOffByOneTile = 2 };

template <typename Elem, int BM_, int BN_, int BK_, int Threads, int Stages>
struct TileShape {
  using elem = Elem;
  using acc_t = typename AccOf<Elem>::type;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, THREADS = Threads, STAGES = Stages;
  // Blocks per multiprocessor promised to ptxas: with none it may trade a few spills for
  // occupancy; 2 blocks of 128 threads still allow 255 registers a thread.
  static constexpr int MIN_BLOCKS = Threads <= 128 ? 2 : 1;
  static constexpr int PAD = 16 / (int)sizeof(Elem);
  // Leading dimensions (elements) of the two storage orders.
  static constexpr int LD_K = BK + PAD;   // [m][k] or [n][k]
  static constexpr int LD_AM = BM + PAD;  // [k][m]
  static constexpr int LD_BN = BN + PAD;  // [k][n]
  template <bool KMajorA>
  static constexpr int a_elems() { return KMajorA ? BK * LD_AM : BM * LD_K; }
  template <bool KMajorB>
  static constexpr int b_elems() { return KMajorB ? BK * LD_BN : BN * LD_K; }
};

// A(m, k) and B(n, k) of a shared-memory tile, for either storage order.
template <class T, bool AKM>
MMK_DEVICE typename T::elem tile_a(const typename T::elem* s, int m, int k) {
  return sload(AKM ? &s[k * T::LD_AM + m] : &s[m * T::LD_K + k]);
}
template <class T, bool BKN>
MMK_DEVICE typename T::elem tile_b(const typename T::elem* s, int n, int k) {
  return sload(BKN ? &s[k * T::LD_BN + n] : &s[n * T::LD_K + k]);
}

// ---- tensor cores: bf16 / f16 (mma.m16n8k16 + ldmatrix) and tf32 (mma.m16n8k8) -----------------
// 4 warps as 2 x 2, each a 32 x 32 warp tile of 2 x 4 mma tiles.
template <typename Elem, int BK_>
struct MmaPolicy : TileShape<Elem, 64, 64, BK_, 128, 3> {
  using S = TileShape<Elem, 64, 64, BK_, 128, 3>;
  static constexpr int MT = 2, NT = 4, ACC = MT * NT * 4;
  static constexpr bool kPairs = true;  // accumulators 2j, 2j + 1: columns c, c + 1 of one row
  static constexpr bool kTF32 = sizeof(Elem) == 4;

  // Row and column in the block tile of accumulator i of this thread.
  MMK_DEVICE static void coord(int tid, int i, int& row, int& col) {
    const int lane = tid & 31, warp = tid >> 5;
    const int mt = i / (NT * 4), nt = (i / 4) % NT, e = i % 4;
    row = (warp & 1) * 32 + mt * 16 + (lane >> 2) + 8 * (e >> 1);
    col = (warp >> 1) * 32 + nt * 8 + 2 * (lane & 3) + (e & 1);
  }

  template <bool AKM, bool BKN>
  MMK_DEVICE static void compute(int tid, const Elem* sA, const Elem* sB, float* acc) {
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
    if constexpr (kTF32) {
      const int g = lane >> 2, t = lane & 3;
      MMK_UNROLL
      for (int kk = 0; kk < S::BK; kk += 8) {
        uint32_t a[MT][4], b[NT][2];
        MMK_UNROLL
        for (int mt = 0; mt < MT; ++mt)
          MMK_UNROLL
          for (int j = 0; j < 4; ++j)
            a[mt][j] = to_tf32(tile_a<S, AKM>(sA, wm + mt * 16 + g + 8 * (j & 1), kk + t + 4 * (j >> 1)));
        MMK_UNROLL
        for (int nt = 0; nt < NT; ++nt)
          MMK_UNROLL
          for (int j = 0; j < 2; ++j) b[nt][j] = to_tf32(tile_b<S, BKN>(sB, wn + nt * 8 + g, kk + t + 4 * j));
        MMK_UNROLL
        for (int mt = 0; mt < MT; ++mt)
          MMK_UNROLL
          for (int nt = 0; nt < NT; ++nt)
            mma_tf32_1688(*reinterpret_cast<float(*)[4]>(acc + (mt * NT + nt) * 4), a[mt], b[nt]);
      }
    } else {
      const int mi = lane >> 3, r = lane & 7;
      MMK_UNROLL
      for (int kk = 0; kk < S::BK; kk += 16) {
        uint32_t a[MT][4], b[NT][2];
        MMK_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          const Elem* p = AKM ? &sA[(kk + (mi >> 1) * 8 + r) * S::LD_AM + wm + mt * 16 + (mi & 1) * 8]
                              : &sA[(wm + mt * 16 + (lane & 15)) * S::LD_K + kk + (lane >> 4) * 8];
          ldmatrix<4, AKM>(a[mt], p);
        }
        MMK_UNROLL
        for (int np = 0; np < NT / 2; ++np) {
          const Elem* p = BKN ? &sB[(kk + (mi & 1) * 8 + r) * S::LD_BN + wn + np * 16 + (mi >> 1) * 8]
                              : &sB[(wn + np * 16 + (mi >> 1) * 8 + r) * S::LD_K + kk + (mi & 1) * 8];
          uint32_t q[4];
          ldmatrix<4, BKN>(q, p);
          b[2 * np][0] = q[0];
          b[2 * np][1] = q[1];
          b[2 * np + 1][0] = q[2];
          b[2 * np + 1][1] = q[3];
        }
        MMK_UNROLL
        for (int mt = 0; mt < MT; ++mt)
          MMK_UNROLL
          for (int nt = 0; nt < NT; ++nt) {
            float(&d)[4] = *reinterpret_cast<float(*)[4]>(acc + (mt * NT + nt) * 4);
            if constexpr (std::is_same_v<Elem, bf16>) mma_bf16_16816(d, a[mt], b[nt]);
            else mma_f16_16816(d, a[mt], b[nt]);
          }
      }
    }
  }
};

// ---- SIMT: float32 (IEEE, when TF32 is not allowed) and float64 ---------------------------------
// 16 x 16 threads, each a 4 x 4 micro-tile strided by 16 rows and columns.
template <typename Elem>
struct SimtPolicy : TileShape<Elem, 64, 64, 16, 256, sizeof(Elem) == 8 ? 2 : 3> {
  using S = TileShape<Elem, 64, 64, 16, 256, sizeof(Elem) == 8 ? 2 : 3>;
  using acc_t = typename S::acc_t;
  static constexpr int ACC = 16;
  static constexpr bool kPairs = false;

  MMK_DEVICE static void coord(int tid, int i, int& row, int& col) {
    row = (tid >> 4) + 16 * (i >> 2);
    col = (tid & 15) + 16 * (i & 3);
  }

  template <bool AKM, bool BKN>
  MMK_DEVICE static void compute(int tid, const Elem* sA, const Elem* sB, acc_t* acc) {
    const int ty = tid >> 4, tx = tid & 15;
    MMK_UNROLL
    for (int k = 0; k < S::BK; ++k) {
      acc_t a[4], b[4];
      MMK_UNROLL
      for (int i = 0; i < 4; ++i) a[i] = tile_a<S, AKM>(sA, ty + 16 * i, k);
      MMK_UNROLL
      for (int j = 0; j < 4; ++j) b[j] = tile_b<S, BKN>(sB, tx + 16 * j, k);
      MMK_UNROLL
      for (int i = 0; i < 4; ++i)
        MMK_UNROLL
        for (int j = 0; j < 4; ++j) acc[i * 4 + j] = mmk_fma(a[i], b[j], acc[i * 4 + j]);
    }
  }
};

// Subset s uses modality k (no subset mask: every subset uses every modality). The [S, K]
// mask is read on the device by every block that needs it: no host copy, no sync.
MMK_DEVICE bool subset_uses(const uint8_t* subset_mask, int K, int64_t s, int k) {
  return subset_mask == nullptr || subset_mask[s * K + k] != 0;
}

// Two adjacent elements in one store (p aligned to 2 * sizeof(T)).
template <typename T>
MMK_DEVICE void store_pair(T* p, T a, T b) {
  struct alignas(2 * sizeof(T)) Pair {
    T a, b;
  };
  *reinterpret_cast<Pair*>(p) = Pair{a, b};
}

// ---- predicated tile copy -------------------------------------------------------------------------

// Copies a ROWS x COLS tile into shared memory (row stride LDS elements): element (r, c) is
// g[r * ld + c] when r < rows_left, row_ok(r) and c < cols_left; everything else is zero, and
// a row or tail left out is never read (a select: whatever it holds, NaN included, stays out).
// `vec` is the widest copy (16, 8 or 4 bytes) that the addresses allow, or sizeof(Elem) when
// not even 4 bytes do (2-byte elements at odd offsets): then plain loads and stores.
template <typename Elem, int ROWS, int COLS, int LDS, int THREADS, class RowOk>
MMK_DEVICE void copy_tile(int tid, Elem* s, const Elem* g, int64_t ld, int rows_left,
                          int cols_left, RowOk row_ok, int vec) {
  constexpr int E = (int)sizeof(Elem);
  if (vec < 4) {
    for (int i = tid; i < ROWS * COLS; i += THREADS) {
      const int r = i / COLS, c = i % COLS;
      const bool ok = r < rows_left && c < cols_left && row_ok(r);
      Elem v = Convert<Elem>::from(0.0f);
      if (ok) v = g[r * ld + c];
      sstore(&s[r * LDS + c], v);
    }
    return;
  }
  const int per = vec / E, chunks = COLS / per;
  for (int i = tid; i < ROWS * chunks; i += THREADS) {
    const int r = i / chunks, c = (i % chunks) * per;
    const bool ok = r < rows_left && row_ok(r);
    int n = ok ? cols_left - c : 0;
    n = n < 0 ? 0 : (n > per ? per : n);
    const Elem* src = n > 0 ? g + r * ld + c : g;
    Elem* dst = &s[r * LDS + c];
    if (vec == 16) cp_async<16>(dst, src, n * E);
    else if (vec == 8) cp_async<8>(dst, src, n * E);
    else cp_async<4>(dst, src, n * E);
  }
}

struct AllRows {
  MMK_DEVICE bool operator()(int) const { return true; }
};

// Rows whose bit `bit` is set in a shared-memory word per row.
struct RowBits {
  const uint32_t* bits;
  int bit;
  MMK_DEVICE bool operator()(int r) const { return (sload(&bits[r]) >> bit) & 1u; }
};

// Rows b0 + r that have modality k in a [B, K] sample mask (null: every row).
struct MaskRows {
  const uint8_t* mask;
  int64_t b0;
  int K, k;
  MMK_DEVICE bool operator()(int r) const { return mask == nullptr || mask[(b0 + r) * K + k] != 0; }
};

// The widest copy (bytes) that a base address, a row stride and a column offset allow.
MMK_HOST_DEVICE int copy_width(const void* base, int64_t ld_elems, int elem_bytes) {
  const uint64_t a = reinterpret_cast<uintptr_t>(base) | (uint64_t)(ld_elems * elem_bytes);
  for (int v = 16; v >= 4; v /= 2)
    if (a % v == 0 && v >= elem_bytes) return v;
  return elem_bytes < 4 ? elem_bytes : 4;
}

// OR of `v` over the block (every thread gets it); `scratch` holds one word per warp.
template <int THREADS>
MMK_DEVICE uint32_t block_or(int tid, uint32_t v, uint32_t* scratch) {
  MMK_UNROLL
  for (int off = 16; off > 0; off /= 2) v |= __shfl_xor_sync(0xffffffffu, v, off);
  if ((tid & 31) == 0) sstore(&scratch[tid >> 5], v);
  __syncthreads();
  uint32_t all = 0;
  MMK_UNROLL
  for (int w = 0; w < THREADS / 32; ++w) all |= sload(&scratch[w]);
  return all;
}

}  // namespace mmkernels::cuda
