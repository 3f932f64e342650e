// augur's CUDA kernels, compiled at run time by NVRTC (see `Device::open`). No headers: f16 is
// converted with one PTX instruction and bf16 by a shift, so NVRTC needs no include path.
//
// Conventions: row-major f32 activations `[n, k]`; weights are `rows` rows of `row_bytes(k)` bytes
// in their GGUF block layout (or f32/f16/bf16), dequantized in registers, never copied out;
// `meta[0]` is the number of cached positions before the pass (read on the device so that a
// captured decode step can be replayed at any position), `meta[1 + t]` the position of token t.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define MAX_TOK 8      // tokens per launch of the matrix-vector kernel (decode, verification)
#define ATT_WARPS 4
#define ATT_MAXD 8     // head_dim up to 32 * ATT_MAXD
#define INFINITY __int_as_float(0x7f800000)

// Programmatic dependent launch (Hopper): a kernel may start while the previous one finishes;
// it loads only weights before GRID_WAIT, which returns once the previous kernel has completed
// and its writes are visible. Without the launch attribute (or before sm_90) both are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRID_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define GRID_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" :::)
#else
#define GRID_WAIT()
#define GRID_LAUNCH()
#endif
#define GRID_SYNC() \
    do {            \
        GRID_LAUNCH(); \
        GRID_WAIT();   \
    } while (0)

// Tuning knobs (NVRTC -D through AUGUR_CUDA_DEFINES, for A/B runs in one process):
#ifndef PRE
#define PRE 2  // leading chunks of a warp's first row loaded before GRID_WAIT
#endif
#ifndef MV_MIN_BLOCKS
#define MV_MIN_BLOCKS 2  // matrix-vector blocks per SM the register budget must allow
#endif

enum { T_F32 = 0, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K };

__device__ __forceinline__ float f16f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float bf16f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 ld16(const u8* p) { return (u16)p[0] | ((u16)p[1] << 8); }
__device__ __forceinline__ u32 ld32(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24); }

template <int T> __device__ __forceinline__ size_t row_bytes(int k) {
    if (T == T_F32) return (size_t)k * 4;
    if (T == T_F16 || T == T_BF16) return (size_t)k * 2;
    if (T == T_Q4_0) return (size_t)(k / 32) * 18;
    if (T == T_Q4_1) return (size_t)(k / 32) * 20;
    if (T == T_Q5_0) return (size_t)(k / 32) * 22;
    if (T == T_Q5_1) return (size_t)(k / 32) * 24;
    if (T == T_Q8_0) return (size_t)(k / 32) * 34;
    if (T == T_Q4_K) return (size_t)(k / 256) * 144;
    if (T == T_Q5_K) return (size_t)(k / 256) * 176;
    return (size_t)(k / 256) * 210;  // Q6_K
}

// 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float* s, float* m) {
    if (j < 4) {
        *s = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *s = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Elements c*8 .. c*8+8 of a row, dequantized.
template <int T> __device__ __forceinline__ void dq8(const u8* row, int c, float* o) {
    if constexpr (T == T_F32) {
        const float* r = (const float*)row + c * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = r[i];
    } else if constexpr (T == T_F16) {
        const u16* r = (const u16*)row + c * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = f16f(r[i]);
    } else if constexpr (T == T_BF16) {
        const u16* r = (const u16*)row + c * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = bf16f(r[i]);
    } else if constexpr (T == T_Q4_0 || T == T_Q4_1) {
        const int bb = T == T_Q4_0 ? 18 : 20;
        const u8* b = row + (size_t)(c >> 2) * bb;
        int p = c & 3, sh = (p >> 1) * 4;
        // Eight quant bytes as 32-bit words (Q4_1 blocks are 4-byte aligned) or 16-bit ones
        // (Q4_0's 18-byte blocks are 2-byte aligned).
        u32 lo, hi;
        float d, m = 0.f;
        if (T == T_Q4_1) {
            const u32* w = (const u32*)b;
            u32 dm = w[0];
            d = f16f((u16)dm);
            m = f16f((u16)(dm >> 16));
            lo = w[1 + (p & 1) * 2];
            hi = w[2 + (p & 1) * 2];
        } else {
            const u16* h = (const u16*)b;
            d = f16f(h[0]);
            const u16* q = h + 1 + (p & 1) * 4;
            lo = (u32)q[0] | ((u32)q[1] << 16);
            hi = (u32)q[2] | ((u32)q[3] << 16);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u32 byte = ((i < 4 ? lo : hi) >> (8 * (i & 3))) & 0xFF;
            float v = (float)((byte >> sh) & 0xF);
            o[i] = T == T_Q4_0 ? (v - 8.f) * d : v * d + m;
        }
    } else if constexpr (T == T_Q5_0 || T == T_Q5_1) {
        const int bb = T == T_Q5_0 ? 22 : 24;
        const u8* b = row + (size_t)(c >> 2) * bb;
        int p = c & 3;
        float d = f16f(ld16(b));
        u32 qh = ld32(b + (T == T_Q5_0 ? 2 : 4));
        const u8* qs = b + (T == T_Q5_0 ? 6 : 8);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int j = p * 8 + i, lo, hi;
            if (j < 16) {
                lo = qs[j] & 0xF;
                hi = ((qh >> j) << 4) & 0x10;
            } else {
                lo = qs[j - 16] >> 4;
                hi = (qh >> (j - 16 + 12)) & 0x10;
            }
            if (T == T_Q5_0) o[i] = (float)((lo | hi) - 16) * d;
            else o[i] = (float)(lo | hi) * d + f16f(ld16(b + 2));
        }
    } else if constexpr (T == T_Q8_0) {
        const u16* h = (const u16*)(row + (size_t)(c >> 2) * 34);  // 2-byte aligned blocks
        float d = f16f(h[0]);
        const u16* q = h + 1 + (c & 3) * 4;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u16 two = q[i];
            o[2 * i] = (float)(signed char)(two & 0xFF) * d;
            o[2 * i + 1] = (float)(signed char)(two >> 8) * d;
        }
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        const int bb = T == T_Q4_K ? 144 : 176;
        const u8* b = row + (size_t)(c >> 5) * bb;
        int e0 = (c & 31) * 8, chunk = e0 >> 6, hi = (e0 & 63) >= 32, l0 = e0 & 31;
        float s, m;
        scale_min_k4(2 * chunk + hi, b + 4, &s, &m);
        float d1 = f16f(ld16(b)) * s, m1 = f16f(ld16(b + 2)) * m;
        const u8* q = b + (T == T_Q4_K ? 16 : 48) + chunk * 32 + l0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int v = hi ? (q[i] >> 4) : (q[i] & 0xF);
            if (T == T_Q5_K) {
                u8 u = hi ? (u8)(2 << (2 * chunk)) : (u8)(1 << (2 * chunk));
                v += (b[16 + l0 + i] & u) ? 16 : 0;
            }
            o[i] = d1 * (float)v - m1;
        }
    } else {  // Q6_K
        const u8* b = row + (size_t)(c >> 5) * 210;
        int e0 = (c & 31) * 8, n = e0 >> 7, w = e0 & 127, j = w >> 5, l0 = w & 31;
        const u8* ql = b + 64 * n + 32 * (j & 1);
        const u8* qh = b + 128 + 32 * n;
        float d = f16f(ld16(b + 208));
        float sc = (float)(signed char)b[192 + 8 * n + l0 / 16 + 2 * j];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int l = l0 + i;
            int nib = (j >> 1) ? (ql[l] >> 4) : (ql[l] & 0xF);
            int q = (nib | (((qh[l] >> (2 * j)) & 3) << 4)) - 32;
            o[i] = d * sc * (float)q;
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). Every thread gets the sum.
__device__ float block_sum(float v) {
    __shared__ float red[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += red[i];
    return s;
}

// Up to three matrices that share one input (q/k/v, gate/up), one launch.
struct Segs {
    const u8* w[3];
    float* y[3];
    const float* bias[3];
    int rows[3];
    int nseg;
};

// The input of a matrix-vector launch, prepared in shared memory for every token:
// 0: x itself; 1: RMSNorm(x) * nw; 2: silu(x) * up (SwiGLU).
__device__ void prep_input(float* xs, const float* x, int n, int k, int mode, const float* nw, float eps, const float* up) {
    for (int t = 0; t < n; t++) {
        const float* xr = x + (size_t)t * k;
        if (mode == 1) {
            float ss = 0.f;
            for (int i = threadIdx.x; i < k; i += blockDim.x) ss += xr[i] * xr[i];
            ss = block_sum(ss);
            float r = 1.0f / sqrtf(ss / (float)k + eps);
            for (int i = threadIdx.x; i < k; i += blockDim.x) xs[t * k + i] = xr[i] * r * nw[i];
        } else if (mode == 2) {
            const float* ur = up + (size_t)t * k;
            for (int i = threadIdx.x; i < k; i += blockDim.x) {
                float g = xr[i];
                xs[t * k + i] = g / (1.0f + expf(-g)) * ur[i];
            }
        } else {
            for (int i = threadIdx.x; i < k; i += blockDim.x) xs[t * k + i] = xr[i];
        }
    }
    __syncthreads();
}

// Row g of the concatenated segments: its segment's weights, output, bias and row count.
struct SegRow {
    const u8* w;
    float* y;
    const float* bias;
    int r, rows;
};

// Constant indices only: a run-time index would copy `s` to local memory.
__device__ __forceinline__ SegRow seg_row(const Segs& s, int g) {
    int r0 = s.rows[0], r1 = s.rows[1];
    int seg = g < r0 ? 0 : (g < r0 + r1 ? 1 : 2);
    SegRow o;
    o.r = g - (seg > 0 ? r0 : 0) - (seg > 1 ? r1 : 0);
    o.rows = seg == 0 ? r0 : (seg == 1 ? r1 : s.rows[2]);
    o.w = seg == 0 ? s.w[0] : (seg == 1 ? s.w[1] : s.w[2]);
    o.y = seg == 0 ? s.y[0] : (seg == 1 ? s.y[1] : s.y[2]);
    o.bias = seg == 0 ? s.bias[0] : (seg == 1 ? s.bias[1] : s.bias[2]);
    return o;
}

__device__ __forceinline__ void dot_chunk(float* a, const float* w, const float* xs, int c, int n, int k) {
#pragma unroll
    for (int t = 0; t < MAX_TOK; t++) {
        if (t < n) {
            const float* xv = xs + t * k + c * 8;
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) d += w[i] * xv[i];
            a[t] += d;
        }
    }
}

// The dot products of one weight row with the n prepared inputs in shared memory, added to a[t]
// (the row's first PRE chunks already dequantized in `pre` when `have_pre`).
template <int T>
__device__ __forceinline__ void row_dot(const u8* row, const float (*pre)[8], bool have_pre, const float* xs, int n,
                                        int k, float* a) {
    int lane = threadIdx.x & 31, chunks = k / 8, c0 = lane;
    if (have_pre) {
#pragma unroll
        for (int i = 0; i < PRE; i++)
            if (lane + 32 * i < chunks) dot_chunk(a, pre[i], xs, lane + 32 * i, n, k);
        c0 = lane + 32 * PRE;
    }
#pragma unroll 4
    for (int c = c0; c < chunks; c += 32) {
        float w[8];
        dq8<T>(row, c, w);
        dot_chunk(a, w, xs, c, n, k);
    }
}

// y[t, r] (+)= W[r] · x'[t] (+ bias[r]) for n <= MAX_TOK tokens; one warp per row, `rpw` rows
// per warp (large matrices take several, so fewer blocks repeat the input's preparation).
template <int T>
__device__ void matvec(Segs s, const float* x, int n, int k, int mode, const float* nw, float eps, const float* up, int acc,
                       int rpw) {
    extern __shared__ float xs[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int total = s.rows[0] + (s.nseg > 1 ? s.rows[1] : 0) + (s.nseg > 2 ? s.rows[2] : 0);
    size_t rb = row_bytes<T>(k);
    int chunks = k / 8;
    int g0 = (blockIdx.x * nwarps + warp) * rpw;
    float pre[PRE][8];
    if (g0 < total) {
        const u8* row = seg_row(s, g0).w + (size_t)seg_row(s, g0).r * rb;
#pragma unroll
        for (int i = 0; i < PRE; i++)
            if (lane + 32 * i < chunks) dq8<T>(row, lane + 32 * i, pre[i]);
    }
    GRID_SYNC();
    prep_input(xs, x, n, k, mode, nw, eps, up);
    for (int rr = 0; rr < rpw; rr++) {
        int g = g0 + rr;
        if (g >= total) return;
        SegRow sr = seg_row(s, g);
        const u8* row = sr.w + (size_t)sr.r * rb;
        float a[MAX_TOK];
#pragma unroll
        for (int t = 0; t < MAX_TOK; t++) a[t] = 0.f;
        row_dot<T>(row, pre, rr == 0, xs, n, k, a);
#pragma unroll
        for (int t = 0; t < MAX_TOK; t++) {
            if (t < n) {
                float v = warp_sum(a[t]);
                if (lane == 0) {
                    if (sr.bias) v += sr.bias[sr.r];
                    float* y = sr.y + (size_t)t * sr.rows + sr.r;
                    *y = acc ? *y + v : v;
                }
            }
        }
    }
}

// q/k/v pair g (of pq query pairs, then pk key pairs, then the value pairs): its segment
// (0 q, 1 k, 2 v), its two rows there, and its frequency index j. q and k rows pair as RoPE
// rotates them ((2j, 2j+1) interleaved, or (j, j + hd/2) within a head); v rows pair in order.
struct QkvPair {
    int seg, r0, r1, j;
};

__device__ __forceinline__ QkvPair qkv_pair(int g, int pq, int pk, int hd, int interleaved) {
    int half = hd / 2;
    QkvPair p;
    p.seg = g < pq ? 0 : (g < pq + pk ? 1 : 2);
    int pr = g - (p.seg > 0 ? pq : 0) - (p.seg > 1 ? pk : 0);
    p.j = pr % half;
    if (p.seg == 2) {
        p.r0 = 2 * pr;
        p.r1 = p.r0 + 1;
    } else {
        int base = (pr / half) * hd;
        p.r0 = base + (interleaved ? 2 * p.j : p.j);
        p.r1 = base + (interleaved ? 2 * p.j + 1 : p.j + half);
    }
    return p;
}

// Keep (v, i) in (best, idx) when it is larger, or equal at a lower index (argmax's first
// maximum).
__device__ __forceinline__ void take_max(float v, int i, float& best, int& idx) {
    if (v > best || (v == best && i < idx)) {
        best = v;
        idx = i;
    }
}

// q, k and v of n <= MAX_TOK tokens from RMSNorm(x) in one launch, with RoPE and the cache write
// fused: each warp computes a pair of rows that rotate together ((2j, 2j+1) interleaved, or
// (j, j + hd/2)), rotates them by the token's position (table `cs`, as in rope_kv) and writes q
// to `s.y[0]`, k and v to cache row meta[0] + t of `kc`, `vc`. v's rows pair up unrotated.
template <int T>
__device__ void qkv_rope(Segs s, const float* x, int n, int k, const float* nw, float eps, const int* meta,
                         const float* cs, int hd, int interleaved, float* kc, float* vc) {
    extern __shared__ float xs[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int half = hd / 2, pairs = (s.rows[0] + s.rows[1] + s.rows[2]) / 2;
    int g = blockIdx.x * nwarps + warp;
    size_t rb = row_bytes<T>(k);
    QkvPair pair = qkv_pair(g, s.rows[0] / 2, s.rows[1] / 2, hd, interleaved);
    int seg = pair.seg, r0 = pair.r0, r1 = pair.r1, j = pair.j;
    const u8* w = seg == 0 ? s.w[0] : (seg == 1 ? s.w[1] : s.w[2]);
    const float* bias = seg == 0 ? s.bias[0] : (seg == 1 ? s.bias[1] : s.bias[2]);
    float pre[PRE][8];
    if (g < pairs) {
#pragma unroll
        for (int i = 0; i < PRE; i++)
            if (lane + 32 * i < k / 8) dq8<T>(w + (size_t)r0 * rb, lane + 32 * i, pre[i]);
    }
    GRID_SYNC();
    prep_input(xs, x, n, k, 1, nw, eps, nullptr);
    if (g >= pairs) return;
    float a0[MAX_TOK], a1[MAX_TOK];
#pragma unroll
    for (int t = 0; t < MAX_TOK; t++) a0[t] = a1[t] = 0.f;
    row_dot<T>(w + (size_t)r0 * rb, pre, true, xs, n, k, a0);
    row_dot<T>(w + (size_t)r1 * rb, pre, false, xs, n, k, a1);
    int kvd = s.rows[1];
#pragma unroll
    for (int t = 0; t < MAX_TOK; t++) {
        if (t < n) {
            float v0 = warp_sum(a0[t]), v1 = warp_sum(a1[t]);
            if (lane == 0) {
                if (bias) {
                    v0 += bias[r0];
                    v1 += bias[r1];
                }
                if (seg < 2) {
                    const float* c = cs + ((size_t)meta[1 + t] * half + j) * 2;
                    float y0 = v0 * c[0] - v1 * c[1], y1 = v1 * c[0] + v0 * c[1];
                    v0 = y0;
                    v1 = y1;
                }
                float* y = seg == 0 ? s.y[0] + (size_t)t * s.rows[0] : (seg == 1 ? kc : vc) + (size_t)(meta[0] + t) * kvd;
                y[r0] = v0;
                y[r1] = v1;
            }
        }
    }
}

// y[t, r] (+)= W[r] · x[t] (+ bias[r]) for any n: 64x64 tiles, 256 threads of 4x4 outputs.
template <int T>
__device__ void matmul(const u8* w, const float* x, float* y, const float* bias, int rows, int k, int n, int acc) {
    __shared__ float ws[64][33];
    __shared__ float xt[64][33];
    GRID_SYNC();
    int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    int r0 = blockIdx.x * 64, t0 = blockIdx.y * 64;
    size_t rb = row_bytes<T>(k);
    float a[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) a[i][j] = 0.f;
    int lr = tid >> 2, lc = tid & 3;
    for (int k0 = 0; k0 < k; k0 += 32) {
        float tmp[8];
        if (r0 + lr < rows) dq8<T>(w + (size_t)(r0 + lr) * rb, k0 / 8 + lc, tmp);
        else
            for (int i = 0; i < 8; i++) tmp[i] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) ws[lr][lc * 8 + i] = tmp[i];
        const float* xr = x + (size_t)(t0 + lr) * k + k0 + lc * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) xt[lr][lc * 8 + i] = (t0 + lr < n) ? xr[i] : 0.f;
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < 32; kk++) {
            float wv[4], xv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) wv[i] = ws[ty * 4 + i][kk];
#pragma unroll
            for (int j = 0; j < 4; j++) xv[j] = xt[tx * 4 + j][kk];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) a[i][j] += wv[i] * xv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = r0 + ty * 4 + i;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int t = t0 + tx * 4 + j;
            if (t >= n) continue;
            float v = a[i][j] + (bias ? bias[r] : 0.f);
            float* o = y + (size_t)t * rows + r;
            *o = acc ? *o + v : v;
        }
    }
}

// out[t] = W[ids[t]] (embedding lookup), one block per token.
template <int T>
__device__ void embed(const u8* w, const int* ids, int k, float* out) {
    GRID_SYNC();
    int t = blockIdx.x;
    const u8* row = w + (size_t)ids[t] * row_bytes<T>(k);
    for (int c = threadIdx.x; c < k / 8; c += blockDim.x) {
        float v[8];
        dq8<T>(row, c, v);
#pragma unroll
        for (int i = 0; i < 8; i++) out[(size_t)t * k + c * 8 + i] = v[i];
    }
}

#define INSTANTIATE(T, name)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MV_MIN_BLOCKS) matvec_##name(Segs s, const float* x, int n, int k, int mode, \
                                                                    const float* nw, float eps, const float* up,    \
                                                                    int acc, int rpw) {                             \
        matvec<T>(s, x, n, k, mode, nw, eps, up, acc, rpw);                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) matmul_##name(const u8* w, const float* x, float* y,          \
                                                                    const float* bias, int rows, int k, int n,      \
                                                                    int acc) {                                      \
        matmul<T>(w, x, y, bias, rows, k, n, acc);                                                                  \
    }                                                                                                               \
    extern "C" __global__ void embed_##name(const u8* w, const int* ids, int k, float* out) { embed<T>(w, ids, k, out); } \
    extern "C" __global__ void __launch_bounds__(256, MV_MIN_BLOCKS)                                                \
        qkv_rope_##name(Segs s, const float* x, int n, int k, const float* nw, float eps, const int* meta,          \
                        const float* cs, int hd, int interleaved, float* kc, float* vc) {                           \
        qkv_rope<T>(s, x, n, k, nw, eps, meta, cs, hd, interleaved, kc, vc);                                        \
    }

INSTANTIATE(T_F32, f32)
INSTANTIATE(T_F16, f16)
INSTANTIATE(T_BF16, bf16)
INSTANTIATE(T_Q4_0, q4_0)
INSTANTIATE(T_Q4_1, q4_1)
INSTANTIATE(T_Q5_0, q5_0)
INSTANTIATE(T_Q5_1, q5_1)
INSTANTIATE(T_Q8_0, q8_0)
INSTANTIATE(T_Q4_K, q4_k)
INSTANTIATE(T_Q5_K, q5_k)
INSTANTIATE(T_Q6_K, q6_k)

// out[t] = RMSNorm(x[t]) * w, one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, int k, float* out) {
    GRID_SYNC();
    const float* xr = x + (size_t)blockIdx.x * k;
    float ss = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (int i = threadIdx.x; i < k; i += blockDim.x) out[(size_t)blockIdx.x * k + i] = xr[i] * r * w[i];
}

// g = silu(g) * u over len elements.
extern "C" __global__ void silu_mul(float* g, const float* u, int len) {
    GRID_SYNC();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

// Rotate q and k of token blockIdx.x by its position, and write its k and v to cache row
// meta[0] + t. `cs` holds (cos, sin) for every position and frequency, computed on the host as
// the CPU backend computes them.
extern "C" __global__ void rope_kv(float* q, const float* k, const float* v, float* kc, float* vc, const int* meta,
                                   int nh, int nkv, int hd, const float* cs, int interleaved) {
    GRID_SYNC();
    int t = blockIdx.x, pos = meta[1 + t], half = hd / 2, kvd = nkv * hd;
    size_t slot = (size_t)(meta[0] + t) * kvd;
    const float* row = cs + (size_t)pos * half * 2;
    for (int i = threadIdx.x; i < (nh + nkv) * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float c = row[2 * j], s = row[2 * j + 1];
        int i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + half;
        if (h < nh) {
            float* qh = q + (size_t)t * nh * hd + h * hd;
            float x0 = qh[i0], x1 = qh[i1];
            qh[i0] = x0 * c - x1 * s;
            qh[i1] = x1 * c + x0 * s;
        } else {
            h -= nh;
            const float* kh = k + (size_t)t * kvd + h * hd;
            float x0 = kh[i0], x1 = kh[i1];
            kc[slot + h * hd + i0] = x0 * c - x1 * s;
            kc[slot + h * hd + i1] = x1 * c + x0 * s;
        }
    }
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) vc[slot + i] = v[(size_t)t * kvd + i];
}

// Attention, split over the keys (flash-decoding): block (query token t * nh + head, split s)
// covers keys [s*span, (s+1)*span), span = 32 * ATT_WARPS: each warp takes 32 keys, one per lane
// (scores need no shuffles, and the key and value loads are all independent), then writes its
// partial output and (max, sum); the last block of a query to finish merges the splits into
// `out` (a counter per query, left at zero). Query t sees keys j <= meta[0] + t, or those with
// mask[t * L + j] when a tree mask is given (L = meta[0] + n). Splits past L return at once.
extern "C" __global__ void __launch_bounds__(128) attn(const float* q, const float* kc, const float* vc, const int* meta,
                                                       int n, int nh, int nkv, int hd, float scale, const u8* mask,
                                                       int span, float* po, float* pml, int* counters, float* out) {
    __shared__ float sm[ATT_WARPS][2];
    __shared__ float sacc[ATT_WARPS][32 * ATT_MAXD];
    __shared__ __align__(16) float qs[32 * ATT_MAXD];
    __shared__ int last;
    GRID_SYNC();
    int qi = blockIdx.x, t = qi / nh, h = qi % nh, s = blockIdx.y, nsplit = gridDim.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int L = meta[0] + n, kvh = h / (nh / nkv), kvd = nkv * hd, nd = hd / 32;
    int live = min(nsplit, (L + span - 1) / span);
    int j0 = s * span;
    if (j0 >= L) return;
    int j1 = min(L, j0 + span);
    if (!mask) j1 = min(j1, meta[0] + t + 1);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[(size_t)t * nh * hd + h * hd + d] * scale;
    __syncthreads();
    int jw = j0 + warp * 32, j = jw + lane;
    bool ok = j < j1 && (!mask || mask[(size_t)t * L + j]);
    float score = -INFINITY;
    if (ok) {
        const float4* kr = (const float4*)(kc + (size_t)j * kvd + kvh * hd);
        const float4* q4 = (const float4*)qs;
        float d = 0.f;
        for (int i = 0; i < hd / 4; i++) {
            float4 a = kr[i], b = q4[i];
            d += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
        score = d;
    }
    float m = warp_max(score);
    float p = ok ? expf(score - m) : 0.f;
    float l = warp_sum(p);
    float acc[ATT_MAXD];
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++) acc[i] = 0.f;
    int nk = min(32, j1 - jw);  // keys of this warp inside the split (uniform across the warp)
#pragma unroll 8
    for (int jj = 0; jj < 32; jj++) {
        if (jj >= nk) break;
        float pj = __shfl_sync(0xffffffffu, p, jj);
        const float* vr = vc + (size_t)(jw + jj) * kvd + kvh * hd;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++)
            if (i < nd) acc[i] += pj * vr[lane + 32 * i];
    }
    if (lane == 0) {
        sm[warp][0] = nk > 0 ? m : -INFINITY;
        sm[warp][1] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++)
        if (i < nd) sacc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w][0]);
    size_t part = (size_t)qi * nsplit + s;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm[w][0] != -INFINITY) a += sacc[w][d] * expf(sm[w][0] - M);
        po[part * hd + d] = a;
    }
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm[w][0] != -INFINITY) sum += sm[w][1] * expf(sm[w][0] - M);
        pml[part * 2] = M;
        pml[part * 2 + 1] = sum;
    }
    // The last of the query's live splits merges them.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[qi], 1) == live - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* ml = pml + (size_t)qi * nsplit * 2;
    float MM = -INFINITY;
    for (int p = 0; p < live; p++) MM = fmaxf(MM, __ldcg(ml + 2 * p));
    float sum = 0.f;
    for (int p = 0; p < live; p++) {
        float mp = __ldcg(ml + 2 * p);
        if (mp != -INFINITY) sum += __ldcg(ml + 2 * p + 1) * expf(mp - MM);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int p = 0; p < live; p++) {
            float mp = __ldcg(ml + 2 * p);
            if (mp != -INFINITY) a += __ldcg(po + ((size_t)qi * nsplit + p) * hd + d) * expf(mp - MM);
        }
        out[(size_t)qi * hd + d] = sum > 0.f ? a / sum : 0.f;
    }
    if (threadIdx.x == 0) counters[qi] = 0;
}

// out[t] = argmax of row t (the lowest index among equal maxima), one block per row.
extern "C" __global__ void argmax(const float* x, int k, int* out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    GRID_SYNC();
    const float* r = x + (size_t)blockIdx.x * k;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        float v = r[i];
        if (v > best) { best = v; idx = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        take_max(ov, oi, best, idx);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { bv[warp] = best; bi[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            take_max(bv[w], bi[w], best, idx);
        out[blockIdx.x] = idx;
    }
}

// Keep tree nodes: cache rows base + keep[i] move to base + i, in order (keep ascending).
extern "C" __global__ void keep_rows(float* kc, float* vc, const int* keep, int nkeep, int base, int kvd) {
    GRID_SYNC();
    for (int i = 0; i < nkeep; i++) {
        size_t d = (size_t)(base + i) * kvd, s = (size_t)(base + keep[i]) * kvd;
        if (d != s)
            for (int e = threadIdx.x; e < kvd; e += blockDim.x) {
                kc[d + e] = kc[s + e];
                vc[d + e] = vc[s + e];
            }
        __syncthreads();
    }
}
