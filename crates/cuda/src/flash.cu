// FlashAttention on tensor cores: the forward pass (tiled, online softmax) and the
// FlashAttention-2 backward pass, bf16 or f16 in, f32 accumulation, `mma.sync` m16n8k16.
// Its own NVRTC program (compiled at the first attention call, see `flash.rs`); no headers.
//
// Layouts: q, o, do, dq `[batch, heads, q_len, D]`; k, v, dk, dv `[batch, kv_heads, k_len, D]`;
// lse, delta `[batch, heads, q_len]` f32; `allow` (optional) `[q_len, k_len]` bytes, nonzero
// where the query may attend. Query head h reads key/value head h / (heads / kv_heads). Causal:
// query i sees keys 0..=i + k_len - q_len (bottom-right aligned, as in augur_kernels::flash).
//
// Fragments (PTX ISA, mma.m16n8k16): lane = 4 * g + t. A (16x16, row): {a0,a1} row g, cols
// 2t, 2t+1; {a2,a3} row g+8; {a4,a5} row g, cols 2t+8, 2t+9; {a6,a7} row g+8, cols 2t+8.. .
// B (16x8, col): {b0,b1} k = 2t, 2t+1, n = g; {b2,b3} k = 2t+8, 2t+9. C (16x8): {c0,c1} row g,
// cols 2t, 2t+1; {c2,c3} row g+8. `ldmatrix.x4` loads four 8x8 tiles, lanes 8i..8i+7 giving
// the row addresses of tile i. Shared-memory rows are padded by 16 bytes, so the eight rows
// of one 8x8 tile fall in different banks.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FA_INF __int_as_float(0x7f800000)
// Tile shapes (mirrored in flash.rs).
#define FA_NW 4                       // forward: warps per block
#define FA_MT 2                       // forward: 16-row query tiles per warp
#define FA_BR (16 * FA_MT * FA_NW)    // forward: query rows per block
#define FA_BC 64                      // forward: keys per tile
#define BW_THREADS 256                // backward: 8 warps
#define BW_BC 128                     // backward: keys per block
#define BW_BR 64                      // backward: query rows per step
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// The one kernel argument of every attention kernel (`FaArgs` in flash.rs, field for field).
struct FaArgs {
    u64 q, k, v, o, lse, allow;
    u64 dout, delta, dq_acc, dq, dk, dv;
    int batch, heads, kv_heads, q_len, k_len, causal;
    float scale;
    float pad;
};

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// ldmatrix.x4 at shared-memory byte address `a`: a base computed once plus a constant, which
// the compiler folds into the instruction.
__device__ __forceinline__ void ldm4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldm4t(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// This lane's row address in a 16x16 block (row stride L elements), as an element offset, for
// the two orders of the four 8x8 tiles: `rows8` takes (rows 0-7, cols 0-7), (rows 8-15, cols
// 0-7), (0-7, 8-15), (8-15, 8-15) (an A fragment; or a B fragment with .trans), `cols8` takes
// (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) (two B fragments; or A with .trans).
__device__ __forceinline__ int rows8(int L) {
    const int lane = threadIdx.x % 32;
    return ((lane & 7) + ((lane >> 3) & 1) * 8) * L + (lane >> 4) * 8;
}

__device__ __forceinline__ int cols8(int L) {
    const int lane = threadIdx.x % 32;
    return ((lane & 7) + (lane >> 4) * 8) * L + ((lane >> 3) & 1) * 8;
}

template <bool BF> __device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
    if constexpr (BF) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// The two 16x8 products of one A fragment with an x4 load's two B fragments (b and b + 2).
template <bool BF> __device__ __forceinline__ void mma2(float* c0, float* c1, const u32* a, const u32* b) {
    mma<BF>(c0, a, b);
    mma<BF>(c1, a, b + 2);
}

// Two floats as one register of two 16-bit values, `lo` in the low half.
template <bool BF> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if constexpr (BF) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <bool BF> __device__ __forceinline__ float to_f32(u16 h) {
    if constexpr (BF) return __uint_as_float(((u32)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Copy `ROWS` rows of D 16-bit values (global row stride D) into shared memory (row stride
// D + 8), asynchronously; rows at or past `valid` are zero-filled.
template <int D, int ROWS, int NT> __device__ __forceinline__ void load_rows(u16* s, const u16* g, int valid) {
    constexpr int CH = D / 8;
#pragma unroll 1
    for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
        int r = i / CH, c = i % CH;
        int src_row = r < valid ? r : 0;
        u32 bytes = r < valid ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(s + r * (D + 8) + c * 8)),
                     "l"(g + (size_t)src_row * D + c * 8), "r"(bytes)
                     : "memory");
    }
}

// Is key j visible to query i (both inside their lengths)?
__device__ __forceinline__ bool visible(const FaArgs& a, int i, int j) {
    if (i >= a.q_len || j >= a.k_len) return false;
    if (a.causal && j > i + a.k_len - a.q_len) return false;
    if (a.allow && !((const u8*)a.allow)[(size_t)i * a.k_len + j]) return false;
    return true;
}

// ---------------------------------------------------------------------------------------------
// Forward: block (query tile, head, batch) of FA_NW warps, each owning FA_MT tiles of 16 query
// rows (two tiles share every k and v fragment loaded from shared memory); K/V tiles stream
// through double-buffered shared memory.

template <int D, bool BF> __device__ __forceinline__ void fa_forward(const FaArgs& a) {
    constexpr int LD = D + 8, NT = 32 * FA_NW, MT = FA_MT;
    extern __shared__ __align__(16) u16 smem[];
    u16* sq = smem;
    u16* sk = sq + FA_BR * LD;       // 2 buffers
    u16* sv = sk + 2 * FA_BC * LD;   // 2 buffers
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int nqb = (a.q_len + FA_BR - 1) / FA_BR;
    const int q0 = (nqb - 1 - (int)blockIdx.x) * FA_BR;  // the longest causal rows start first
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (a.heads / a.kv_heads);
    const size_t qrow = (size_t)(b * a.heads + h) * a.q_len;
    const u16* Q = (const u16*)a.q + qrow * D;
    const u16* K = (const u16*)a.k + (size_t)(b * a.kv_heads + hk) * a.k_len * D;
    const u16* V = (const u16*)a.v + (size_t)(b * a.kv_heads + hk) * a.k_len * D;
    const int off = a.k_len - a.q_len;
    const int kend = a.causal ? min(a.k_len, q0 + FA_BR + off) : a.k_len;
    const int ntiles = (kend + FA_BC - 1) / FA_BC;
    const float sl = a.scale * LOG2E;

    load_rows<D, FA_BR, NT>(sq, Q + (size_t)q0 * D, a.q_len - q0);
    load_rows<D, FA_BC, NT>(sk, K, a.k_len);
    load_rows<D, FA_BC, NT>(sv, V, a.k_len);
    cp_commit();

    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < D / 8; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = -FA_INF, l[mt][0] = l[mt][1] = 0.f;
    const int r0 = warp * 16 * MT;
    const u32 qa = smem_u32(sq) + 2 * (r0 * LD + rows8(LD)), ka = smem_u32(sk) + 2 * cols8(LD), va = smem_u32(sv) + 2 * rows8(LD);

    for (int j = 0; j < ntiles; j++) {
        const int buf = j & 1, k0 = j * FA_BC;
        if (j + 1 < ntiles) {
            load_rows<D, FA_BC, NT>(sk + (buf ^ 1) * FA_BC * LD, K + (size_t)(k0 + FA_BC) * D, a.k_len - k0 - FA_BC);
            load_rows<D, FA_BC, NT>(sv + (buf ^ 1) * FA_BC * LD, V + (size_t)(k0 + FA_BC) * D, a.k_len - k0 - FA_BC);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const u32 kb = ka + buf * (2 * FA_BC * LD), vb = va + buf * (2 * FA_BC * LD);

        // s = q k^T over this tile: 16 MT rows x 64 keys per warp.
        float s[MT][FA_BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int i = 0; i < FA_BC / 8; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 qf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
                ldm4(qf[mt], qa + 2 * (16 * mt * LD + kk * 16));
#pragma unroll
            for (int np = 0; np < FA_BC / 16; np++) {
                u32 bf[4];
                ldm4(bf, kb + 2 * (np * 16 * LD + kk * 16));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma2<BF>(s[mt][2 * np], s[mt][2 * np + 1], qf[mt], bf);
                }
            }
        }
        // Masks only where the tile crosses the end, the diagonal, or an explicit mask.
        if (k0 + FA_BC > a.k_len || (a.causal && k0 + FA_BC - 1 > q0 + off) || a.allow) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < FA_BC / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (!visible(a, q0 + r0 + 16 * mt + g + 8 * (e / 2), k0 + nt * 8 + 2 * t + e % 2)) s[mt][nt][e] = -FA_INF;
        }
        // Online softmax on the raw scores (scale > 0): p = 2^(s sl - m sl), one FFMA each.
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float mx = m[mt][hr];
#pragma unroll
            for (int nt = 0; nt < FA_BC / 8; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float base = mx == -FA_INF ? 0.f : mx * sl;
            const float alpha = ex2(m[mt][hr] * sl - base);
            m[mt][hr] = mx;
            float rs = 0.f;
#pragma unroll
            for (int nt = 0; nt < FA_BC / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float p = ex2(fmaf(s[mt][nt][2 * hr + e], sl, -base));
                    s[mt][nt][2 * hr + e] = p;
                    rs += p;
                }
            }
            l[mt][hr] = l[mt][hr] * alpha + rs;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[mt][dt][2 * hr] *= alpha;
                o[mt][dt][2 * hr + 1] *= alpha;
            }
        }
        // o += p v: p's accumulator layout is the A layout of the next product.
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; kk++) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                pa[mt][0] = pack2<BF>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2<BF>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2<BF>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2<BF>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                u32 bf[4];
                ldm4t(bf, vb + 2 * (kk * 16 * LD + dp * 16));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma2<BF>(o[mt][2 * dp], o[mt][2 * dp + 1], pa[mt], bf);
                }
            }
        }
        __syncthreads();
    }

    u16* O = (u16*)a.o + qrow * D;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float sum = l[mt][hr];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int qi = q0 + r0 + 16 * mt + g + 8 * hr;
        if (qi >= a.q_len) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *(u32*)(O + (size_t)qi * D + dt * 8 + 2 * t) = pack2<BF>(o[mt][dt][2 * hr] * inv, o[mt][dt][2 * hr + 1] * inv);
        if (t == 0) ((float*)a.lse)[qrow + qi] = sum > 0.f ? (m[mt][hr] * sl + __log2f(sum)) * LN2 : -FA_INF;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2): block (key tile, kv head, batch) owns dk/dv of its 64 keys and
// walks every query tile of every query head that reads them, recomputing p from lse:
//   s = q k^T, p = exp(s * scale - lse), dv += p^T do, dp = do v^T, ds = p (dp - delta),
//   dk += scale ds^T q, dq += scale ds k (added to the f32 dq_acc with atomics).

// delta[row] = sum_d do[row, d] * o[row, d], one warp per row.
template <int D, bool BF> __device__ __forceinline__ void fa_delta(const FaArgs& a) {
    const int rows = a.batch * a.heads * a.q_len;
    const int row = blockIdx.x * (BW_THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const u16* o = (const u16*)a.o + (size_t)row * D;
    const u16* d = (const u16*)a.dout + (size_t)row * D;
    float acc = 0.f;
    for (int i = lane; i < D; i += 32) acc += to_f32<BF>(o[i]) * to_f32<BF>(d[i]);
    for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffff, acc, s);
    if (lane == 0) ((float*)a.delta)[row] = acc;
}

// dq = dq_acc, rounded to 16 bits.
template <bool BF> __device__ __forceinline__ void fa_dq_cast(const FaArgs& a, size_t n) {
    for (size_t i = (size_t)blockIdx.x * BW_THREADS + threadIdx.x; i < n; i += (size_t)gridDim.x * BW_THREADS) {
        const u32 p = pack2<BF>(((const float*)a.dq_acc)[i], 0.f);
        ((u16*)a.dq)[i] = (u16)(p & 0xffff);
    }
}

template <int D, bool BF> __device__ __forceinline__ void fa_backward(const FaArgs& a) {
    // Per warp: s and dp over 16 query rows x BW_BC/2 keys (NS tiles of 8); dk and dv over
    // MK tiles of 16 keys x D/2 columns; dq over 16 query rows x D/2 columns.
    constexpr int LD = D + 8, LP = BW_BC + 8, T = BW_BR * LD, NS = BW_BC / 16, MK = BW_BC / 64;
    extern __shared__ __align__(16) u16 smem[];
    u16* sk = smem;
    u16* sv = sk + BW_BC * LD;
    u16* sq = sv + BW_BC * LD;   // 2 buffers
    u16* sdo = sq + 2 * T;       // 2 buffers
    u16* sp = sdo + 2 * T;       // p, [query][key]
    u16* sds = sp + BW_BR * LP;  // ds, [query][key]
    float* sl = (float*)(sds + BW_BR * LP);  // lse, 2 buffers
    float* sd = sl + 2 * BW_BR;              // delta, 2 buffers

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wr = warp & 3, wc = warp >> 2;  // row group of 16 (keys of BW_BC/4 for dk/dv), column half
    const int k0 = blockIdx.x * BW_BC, hk = blockIdx.y, b = blockIdx.z;
    const int group = a.heads / a.kv_heads, off = a.k_len - a.q_len;
    const size_t kvrow = (size_t)(b * a.kv_heads + hk) * a.k_len + k0;
    const float slog = a.scale * LOG2E;

    // Query tiles that can see this key tile.
    const int qstart = a.causal ? max(0, k0 - off) / BW_BR : 0;
    const int nqt = (a.q_len + BW_BR - 1) / BW_BR;
    const int steps = group * (nqt - qstart);
    if (steps <= 0) return;

    // Queue step i's query tile, its do tile, and its lse/delta rows into buffer `buf`.
    auto fetch = [&](int i, int buf) {
        const int h = hk * group + i / (nqt - qstart), q0 = (qstart + i % (nqt - qstart)) * BW_BR;
        const size_t row = (size_t)(b * a.heads + h) * a.q_len + q0;
        load_rows<D, BW_BR, BW_THREADS>(sq + buf * T, (const u16*)a.q + row * D, a.q_len - q0);
        load_rows<D, BW_BR, BW_THREADS>(sdo + buf * T, (const u16*)a.dout + row * D, a.q_len - q0);
        // Asynchronous like the tiles: a plain load here would hold its warp, and with it the
        // next barrier, for a memory round trip every step. Rows past the end read as 0 (their
        // scores are masked).
        if (threadIdx.x < 2 * BW_BR) {
            const int r = threadIdx.x % BW_BR;
            const bool in = q0 + r < a.q_len;
            const float* src = (const float*)(threadIdx.x < BW_BR ? a.lse : a.delta) + row + (in ? r : 0);
            float* dst = (threadIdx.x < BW_BR ? sl : sd) + buf * BW_BR + r;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(in ? 4 : 0) : "memory");
        }
    };
    load_rows<D, BW_BC, BW_THREADS>(sk, (const u16*)a.k + kvrow * D, a.k_len - k0);
    load_rows<D, BW_BC, BW_THREADS>(sv, (const u16*)a.v + kvrow * D, a.k_len - k0);
    fetch(0, 0);
    cp_commit();

    float dk[MK][D / 16][4], dv[MK][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MK; mt++)
#pragma unroll
        for (int i = 0; i < D / 16; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[mt][i][e] = dv[mt][i][e] = 0.f;

    for (int it = 0; it < steps; it++) {
        const int buf = it & 1;
        if (it + 1 < steps) {
            fetch(it + 1, buf ^ 1);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const int h = hk * group + it / (nqt - qstart), q0 = (qstart + it % (nqt - qstart)) * BW_BR;
        const u32 qs = smem_u32(sq + buf * T), dos = smem_u32(sdo + buf * T);
        const u32 ks = smem_u32(sk), vs = smem_u32(sv), ps = smem_u32(sp), dss = smem_u32(sds);

        // s = q k^T and dp = do v^T.
        {
            float s[NS][4], dp[NS][4];
#pragma unroll
            for (int i = 0; i < NS; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 qa[4], da[4];
                const int arow = 2 * (wr * 16 * LD + rows8(LD) + kk * 16);
                ldm4(qa, qs + arow);
                ldm4(da, dos + arow);
#pragma unroll
                for (int np = 0; np < NS / 2; np++) {
                    const int brow = 2 * ((wc * (BW_BC / 2) + np * 16) * LD + cols8(LD) + kk * 16);
                    u32 kb[4], vb[4];
                    ldm4(kb, ks + brow);
                    ldm4(vb, vs + brow);
                    mma2<BF>(s[2 * np], s[2 * np + 1], qa, kb);
                    mma2<BF>(dp[2 * np], dp[2 * np + 1], da, vb);
                }
            }
            // p and ds into shared memory as 16-bit [query][key]; a row that sees no key has
            // lse = -inf and p = 0.
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                const int r = wr * 16 + g + 8 * hr;
                const float lse = sl[buf * BW_BR + r];
                const float base = lse == -FA_INF ? FA_INF : lse * LOG2E;
#pragma unroll
                for (int nt = 0; nt < NS; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) s[nt][2 * hr + e] = ex2(fmaf(s[nt][2 * hr + e], slog, -base));
            }
            if (k0 + BW_BC > a.k_len || q0 + BW_BR > a.q_len || (a.causal && k0 + BW_BC - 1 > q0 + off) || a.allow) {
#pragma unroll
                for (int nt = 0; nt < NS; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (!visible(a, q0 + wr * 16 + g + 8 * (e / 2), k0 + wc * (BW_BC / 2) + nt * 8 + 2 * t + e % 2)) s[nt][e] = 0.f;
            }
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                const int r = wr * 16 + g + 8 * hr;
                const float delta = sd[buf * BW_BR + r];
#pragma unroll
                for (int nt = 0; nt < NS; nt++) {
                    const int c = wc * (BW_BC / 2) + nt * 8 + 2 * t;
                    const float p0 = s[nt][2 * hr], p1 = s[nt][2 * hr + 1];
                    *(u32*)(sp + r * LP + c) = pack2<BF>(p0, p1);
                    *(u32*)(sds + r * LP + c) = pack2<BF>(p0 * (dp[nt][2 * hr] - delta), p1 * (dp[nt][2 * hr + 1] - delta));
                }
            }
        }
        __syncthreads();

        // dv += p^T do and dk += ds^T q.
#pragma unroll
        for (int kk = 0; kk < BW_BR / 16; kk++) {
            u32 pa[MK][4], sa[MK][4];
#pragma unroll
            for (int mt = 0; mt < MK; mt++) {
                const int at = 2 * (kk * 16 * LP + wr * (BW_BC / 4) + mt * 16 + cols8(LP));
                ldm4t(pa[mt], ps + at);
                ldm4t(sa[mt], dss + at);
            }
#pragma unroll
            for (int dp2 = 0; dp2 < D / 32; dp2++) {
                const int bt = 2 * (kk * 16 * LD + wc * (D / 2) + dp2 * 16 + rows8(LD));
                u32 ob[4], qb[4];
                ldm4t(ob, dos + bt);
                ldm4t(qb, qs + bt);
#pragma unroll
                for (int mt = 0; mt < MK; mt++) {
                    mma2<BF>(dv[mt][2 * dp2], dv[mt][2 * dp2 + 1], pa[mt], ob);
                    mma2<BF>(dk[mt][2 * dp2], dk[mt][2 * dp2 + 1], sa[mt], qb);
                }
            }
        }
        // dq += scale ds k: query rows 16 wr.., columns (D/2) wc.. per warp.
        {
            float dq[D / 16][4];
#pragma unroll
            for (int i = 0; i < D / 16; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BW_BC / 16; kk++) {
                u32 sa[4];
                ldm4(sa, dss + 2 * (wr * 16 * LP + rows8(LP) + kk * 16));
#pragma unroll
                for (int dp2 = 0; dp2 < D / 32; dp2++) {
                    u32 kb[4];
                    ldm4t(kb, ks + 2 * (kk * 16 * LD + wc * (D / 2) + dp2 * 16 + rows8(LD)));
                    mma2<BF>(dq[2 * dp2], dq[2 * dp2 + 1], sa, kb);
                }
            }
            // Lanes t and t^1 swap halves so that each holds four consecutive columns of one
            // row (even t: row g, odd t: row g + 8), added with one 16-byte reduction.
            float* acc = (float*)a.dq_acc + ((size_t)(b * a.heads + h) * a.q_len + q0) * D;
            const bool odd = t & 1;
            const int r = wr * 16 + g + (odd ? 8 : 0);
#pragma unroll
            for (int nt = 0; nt < D / 16; nt++) {
                const float s0 = odd ? dq[nt][0] : dq[nt][2], s1 = odd ? dq[nt][1] : dq[nt][3];
                const float x0 = __shfl_xor_sync(0xffffffff, s0, 1), x1 = __shfl_xor_sync(0xffffffff, s1, 1);
                if (q0 + r >= a.q_len) continue;
                float v[4] = {odd ? x0 : dq[nt][0], odd ? x1 : dq[nt][1], odd ? dq[nt][2] : x0, odd ? dq[nt][3] : x1};
                float* p = acc + (size_t)r * D + wc * (D / 2) + nt * 8 + 2 * (t & ~1);
#if __CUDA_ARCH__ >= 900
                asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v[0] * a.scale), "f"(v[1] * a.scale),
                             "f"(v[2] * a.scale), "f"(v[3] * a.scale)
                             : "memory");
#else
#pragma unroll
                for (int e = 0; e < 4; e++) atomicAdd(p + e, v[e] * a.scale);
#endif
            }
        }
        __syncthreads();
    }

    u16* DK = (u16*)a.dk + kvrow * D;
    u16* DV = (u16*)a.dv + kvrow * D;
#pragma unroll
    for (int mt = 0; mt < MK; mt++)
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int r = wr * (BW_BC / 4) + mt * 16 + g + 8 * hr;
        if (k0 + r >= a.k_len) continue;
#pragma unroll
        for (int nt = 0; nt < D / 16; nt++) {
            const int c = wc * (D / 2) + nt * 8 + 2 * t;
            *(u32*)(DK + (size_t)r * D + c) = pack2<BF>(dk[mt][nt][2 * hr] * a.scale, dk[mt][nt][2 * hr + 1] * a.scale);
            *(u32*)(DV + (size_t)r * D + c) = pack2<BF>(dv[mt][nt][2 * hr], dv[mt][nt][2 * hr + 1]);
        }
    }
}

// Entry points, one per head width and element type: `fa_fwd_d128_bf16`, ...
#define FA_ENTRIES(D, BF, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * FA_NW, 2) fa_fwd_##NAME(const FaArgs a) {  \
        fa_forward<D, BF>(a);                                                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BW_THREADS, 1) fa_bwd_##NAME(const FaArgs a) {  \
        fa_backward<D, BF>(a);                                                                   \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BW_THREADS) fa_delta_##NAME(const FaArgs a) {   \
        fa_delta<D, BF>(a);                                                                      \
    }
FA_ENTRIES(64, true, d64_bf16)
FA_ENTRIES(128, true, d128_bf16)
FA_ENTRIES(64, false, d64_f16)
FA_ENTRIES(128, false, d128_f16)

extern "C" __global__ void __launch_bounds__(BW_THREADS) fa_dq_cast_bf16(const FaArgs a, u64 n) { fa_dq_cast<true>(a, n); }
extern "C" __global__ void __launch_bounds__(BW_THREADS) fa_dq_cast_f16(const FaArgs a, u64 n) { fa_dq_cast<false>(a, n); }

// Fill `n` 16-bit values with uniform numbers in [-1, 1) from a counter hash (benchmarks).
extern "C" __global__ void fa_fill(u16* x, u64 n, u32 seed, int bf) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 0x9e3779b9u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        const float f = (float)(h >> 8) * (2.f / 16777216.f) - 1.f;
        const u32 p = bf ? pack2<true>(f, 0.f) : pack2<false>(f, 0.f);
        x[i] = (u16)(p & 0xffff);
    }
}
