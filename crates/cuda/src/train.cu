// The training ops of augur-core on the device (`train.rs` is the host side): every primitive op
// the autograd rules use, in f32 and f64 (`_f32` / `_f64` entry points of one template), plus
// copies between any two layouts and float types. Matrix products go through cuBLAS and 16-bit
// attention through `flash.cu`; the attention here is the general path (any head width, score
// bias, ALiBi, f32/f64). No headers, as in kernels.cu.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define THREADS 256
#define MAX_RANK 8
#define INFINITY __int_as_float(0x7f800000)

enum { D_F32 = 0, D_F64 = 1, D_F16 = 2, D_BF16 = 3 };

// A strided view: the storage index of element i (row-major over `shape`) is
// offset + Σ idx_d · stride_d.
struct Lay {
    i64 shape[MAX_RANK];
    i64 stride[MAX_RANK];
    i64 offset;
    int rank;
    int pad;
};

__device__ __forceinline__ i64 lay_off(const Lay& l, i64 i) {
    i64 off = l.offset;
    if (i < 0x7fffffffLL) {
        // 32-bit division where the index allows (several times cheaper than 64-bit).
        unsigned int j = (unsigned int)i;
        for (int d = l.rank - 1; d >= 0; d--) {
            unsigned int s = (unsigned int)l.shape[d], q = j / s;
            off += (i64)(j - q * s) * l.stride[d];
            j = q;
        }
        return off;
    }
    for (int d = l.rank - 1; d >= 0; d--) {
        i64 s = l.shape[d];
        i64 q = i / s;
        off += (i - q * s) * l.stride[d];
        i = q;
    }
    return off;
}

__device__ __forceinline__ float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f32_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

#define GRID_STRIDE(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Reads and writes of any float type, computing in T (float, or double for f64).
template <typename T> __device__ __forceinline__ T ldv(const void* p, int ty, i64 i) {
    if (ty == D_F32) return (T)((const float*)p)[i];
    if (ty == D_F64) return (T)((const double*)p)[i];
    if (ty == D_BF16) return (T)bf16_to_f32(((const u16*)p)[i]);
    return (T)f16_to_f32(((const u16*)p)[i]);
}
template <typename T> __device__ __forceinline__ void stv(void* p, int ty, i64 i, T v) {
    if (ty == D_F32) ((float*)p)[i] = (float)v;
    else if (ty == D_F64) ((double*)p)[i] = (double)v;
    else if (ty == D_BF16) ((u16*)p)[i] = f32_to_bf16((float)v);
    else ((u16*)p)[i] = f32_to_f16((float)v);
}
__device__ __forceinline__ i64 at(const Lay& l, i64 i) { return l.rank == 1 && l.stride[0] == 1 ? l.offset + i : lay_off(l, i); }

// Flat and starting on a multiple of eight elements: eight at a time move as one 16-byte access
// per 16-bit operand and two per f32 one (allocations are 256-byte aligned). `train/mod.rs`'s
// `Lay::flat8` is the same test, to size the grid.
__device__ __forceinline__ bool flat8(const Lay& l) { return l.rank == 1 && l.stride[0] == 1 && (l.offset & 7) == 0; }

// Rows of d elements (d/2 a multiple of eight) that are contiguous runs starting on multiples of
// eight: `Lay::rope_rows8` in train/mod.rs is the same test.
__device__ __forceinline__ bool rope_rows8(const Lay& l, int d) {
    bool ok = d % 16 == 0 && l.stride[l.rank - 1] == 1 && l.shape[l.rank - 1] % d == 0 && (l.offset & 7) == 0;
    for (int k = 0; k + 1 < l.rank; k++) ok = ok && (l.stride[k] & 7) == 0;
    return ok;
}

__device__ __forceinline__ float h16_to_f32(int ty, u16 h) { return ty == D_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_h16(int ty, float f) { return ty == D_BF16 ? f32_to_bf16(f) : f32_to_f16(f); }

// v[0..8] = elements i..i+8 of a flat array of type ty (i a multiple of 8).
template <typename T> __device__ __forceinline__ void ld8(const void* p, int ty, i64 i, T* v) {
    if (ty == D_F32) {
        float4 a = *(const float4*)((const float*)p + i), b = *(const float4*)((const float*)p + i + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else if (ty == D_F64) {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = (T)((const double*)p)[i + k];
    } else {
        uint4 a = *(const uint4*)((const u16*)p + i);
        u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = (T)h16_to_f32(ty, (u16)(w[k] & 0xffffu));
            v[2 * k + 1] = (T)h16_to_f32(ty, (u16)(w[k] >> 16));
        }
    }
}
template <typename T> __device__ __forceinline__ void st8(void* p, int ty, i64 i, const T* v) {
    if (ty == D_F32) {
        *(float4*)((float*)p + i) = make_float4((float)v[0], (float)v[1], (float)v[2], (float)v[3]);
        *(float4*)((float*)p + i + 4) = make_float4((float)v[4], (float)v[5], (float)v[6], (float)v[7]);
    } else if (ty == D_F64) {
#pragma unroll
        for (int k = 0; k < 8; k++) ((double*)p)[i + k] = (double)v[k];
    } else {
        u32 w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = (u32)f32_to_h16(ty, (float)v[2 * k]) | ((u32)f32_to_h16(ty, (float)v[2 * k + 1]) << 16);
        *(uint4*)((u16*)p + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// Eight elements per thread along the innermost dimension: one index computation per eight.
// Same-type copies move the bits (no conversion).
template <int S, int D> __device__ void copy8(const void* src, Lay sl, void* dst, Lay dl, i64 n) {
    i64 ss = sl.stride[sl.rank - 1], ds = dl.stride[dl.rank - 1];
    GRID_STRIDE(t, n / 8) {
        i64 i = t * 8, s = lay_off(sl, i), d = lay_off(dl, i);
        // Both runs contiguous and aligned (a transpose that keeps the innermost dimension):
        // one vector access each.
        if (ss == 1 && ds == 1 && ((s | d) & 7) == 0) {
            if (S == D_F64 || D == D_F64) {
                double v[8];
                ld8<double>(src, S, s, v);
                st8<double>(dst, D, d, v);
            } else {
                float v[8];
                ld8<float>(src, S, s, v);
                st8<float>(dst, D, d, v);
            }
            continue;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (S == D && (S == D_F16 || S == D_BF16)) ((u16*)dst)[d + k * ds] = ((const u16*)src)[s + k * ss];
            else if (S == D && S == D_F32) ((float*)dst)[d + k * ds] = ((const float*)src)[s + k * ss];
            else stv<double>(dst, D, d + k * ds, ldv<double>(src, S, s + k * ss));
        }
    }
}

// dst[dl(i)] = src[sl(i)] converted, for the n elements of the shared shape.
extern "C" __global__ void copy_any(const void* src, int sty, Lay sl, void* dst, int dty, Lay dl, i64 n) {
    // Whole groups of eight along the innermost dimension of both layouts (Lay::merged gives
    // them the same dims).
    bool sflat = sl.rank == 1 && sl.stride[0] == 1, dflat = dl.rank == 1 && dl.stride[0] == 1;
    if (!(sflat && dflat) && sl.shape[sl.rank - 1] % 8 == 0) {
#define C8(S, D) if (sty == S && dty == D) { copy8<S, D>(src, sl, dst, dl, n); return; }
#define ROW(S) C8(S, D_F32) C8(S, D_F64) C8(S, D_F16) C8(S, D_BF16)
        ROW(D_F32) ROW(D_F64) ROW(D_F16) ROW(D_BF16)
#undef ROW
#undef C8
    }
    // Contiguous to contiguous (a conversion): eight elements a thread where aligned, else one.
    if (sflat && dflat && flat8(sl) && flat8(dl) && n % 8 == 0) {
        if (sty == D_F64 || dty == D_F64) {
            GRID_STRIDE(t, n / 8) { double v[8]; ld8<double>(src, sty, sl.offset + t * 8, v); st8<double>(dst, dty, dl.offset + t * 8, v); }
        } else {
            GRID_STRIDE(t, n / 8) { float v[8]; ld8<float>(src, sty, sl.offset + t * 8, v); st8<float>(dst, dty, dl.offset + t * 8, v); }
        }
        return;
    }
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 s = sflat ? sl.offset + i : lay_off(sl, i);
        i64 d = dflat ? dl.offset + i : lay_off(dl, i);
        if (sty == D_F32 && dty == D_BF16) ((u16*)dst)[d] = f32_to_bf16(((const float*)src)[s]);
        else if (sty == D_BF16 && dty == D_F32) ((float*)dst)[d] = bf16_to_f32(((const u16*)src)[s]);
        else stv<double>(dst, dty, d, ldv<double>(src, sty, s));
    }
}

// ---- elementwise ------------------------------------------------------------------------------

// UnaryOp in ops/mod.rs, in declaration order.
enum { U_NEG, U_EXP, U_LOG, U_SQRT, U_RECIP, U_SQR, U_ABS, U_SILU, U_SIGMOID, U_TANH, U_RELU, U_GELU, U_SILU_GRAD, U_GELU_GRAD, U_STEP, U_SIGN };
enum { B_ADD, B_SUB, B_MUL, B_DIV, B_MAX };

__device__ __forceinline__ float ex(float x) { return __expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }

template <typename T> __device__ __forceinline__ T unary_op(int op, T x) {
    const T one = (T)1;
    const T c = (T)0.7978845608028654, k = (T)0.044715;
    switch (op) {
        case U_NEG: return -x;
        case U_EXP: return ex(x);
        case U_LOG: return log(x);
        case U_SQRT: return sqrt(x);
        case U_RECIP: return one / x;
        case U_SQR: return x * x;
        case U_ABS: return x < (T)0 ? -x : x;
        case U_SILU: return x / (one + ex(-x));
        case U_SIGMOID: return one / (one + ex(-x));
        case U_TANH: return tanh(x);
        case U_RELU: return x > (T)0 ? x : (T)0;
        case U_GELU: {
            T t = one - (T)2 / (ex((T)2 * c * (x + k * x * x * x)) + one);
            return (T)0.5 * x * (one + t);
        }
        case U_SILU_GRAD: {
            T s = one / (one + ex(-x));
            return s * (one + x * (one - s));
        }
        case U_GELU_GRAD: {
            T t = one - (T)2 / (ex((T)2 * c * (x + k * x * x * x)) + one);
            return (T)0.5 * (one + t) + (T)0.5 * x * (one - t * t) * c * (one + (T)3 * k * x * x);
        }
        case U_STEP: return x > (T)0 ? one : (T)0;
        default: return x > (T)0 ? one : (x < (T)0 ? -one : (T)0);
    }
}

template <typename T> __device__ __forceinline__ T binary_op(int op, T a, T b) {
    switch (op) {
        case B_ADD: return a + b;
        case B_SUB: return a - b;
        case B_MUL: return a * b;
        case B_DIV: return a / b;
        default: return a > b || b != b ? a : b;  // Rust's max: a NaN operand loses
    }
}


// The elementwise kernels compute in T and read and write any float type in any layout (`Lay`),
// so 16-bit activations under autocast are neither converted nor copied first.
// The output is always flat; flat inputs on a multiple of eight go eight at a time.
template <typename T> __device__ void unary_t(const void* x, int xt, Lay lx, void* out, int ot, i64 n, int op) {
    if (flat8(lx) && n % 8 == 0) {
        GRID_STRIDE(t, n / 8) {
            T v[8];
            ld8<T>(x, xt, lx.offset + t * 8, v);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = unary_op<T>(op, v[k]);
            st8<T>(out, ot, t * 8, v);
        }
        return;
    }
    GRID_STRIDE(i, n) stv<T>(out, ot, i, unary_op<T>(op, ldv<T>(x, xt, at(lx, i))));
}

template <typename T> __device__ void affine_t(const void* x, int xt, Lay lx, void* out, int ot, i64 n, double mul, double add) {
    if (flat8(lx) && n % 8 == 0) {
        GRID_STRIDE(t, n / 8) {
            T v[8];
            ld8<T>(x, xt, lx.offset + t * 8, v);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = v[k] * (T)mul + (T)add;
            st8<T>(out, ot, t * 8, v);
        }
        return;
    }
    GRID_STRIDE(i, n) stv<T>(out, ot, i, ldv<T>(x, xt, at(lx, i)) * (T)mul + (T)add);
}

// mode 1: b is a contiguous block repeated every m elements (a bias), a in any layout;
// 3: both in any layout (broadcast views).
template <typename T> __device__ void binary_t(const void* a, int at_, Lay la, const void* b, int bt, Lay lb, void* out, int ot, i64 n, int op, int mode, i64 m) {
    // Eight at a time when both are flat: b of the same shape, or a bias of whole eights (mode 3
    // passes m = 0).
    if (flat8(la) && flat8(lb) && n % 8 == 0 && m % 8 == 0) {
        GRID_STRIDE(t, n / 8) {
            T x[8], y[8];
            ld8<T>(a, at_, la.offset + t * 8, x);
            ld8<T>(b, bt, mode == 1 ? lb.offset + (t * 8) % m : lb.offset + t * 8, y);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = binary_op<T>(op, x[k], y[k]);
            st8<T>(out, ot, t * 8, x);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        i64 ib = mode == 1 ? lb.offset + i % m : at(lb, i);
        stv<T>(out, ot, i, binary_op<T>(op, ldv<T>(a, at_, at(la, i)), ldv<T>(b, bt, ib)));
    }
}

// x: [rows / seq, seq, d] in any layout, tables [seq, d/2] in T; the output contiguous.
template <typename T> __device__ void rope_t(const void* x, int xt, Lay lx, const T* cs, const T* sn, void* out, int ot, i64 rows, int seq, int d, int interleaved) {
    int half = d / 2;
    if (!interleaved && rope_rows8(lx, d)) {
        // Eight pairs a thread: each half of a row is a contiguous, aligned run.
        int per = half / 8;
        GRID_STRIDE(p, rows * per) {
            i64 row = p / per;
            int i = (int)(p - row * per) * 8, t = (int)(row % seq);
            i64 src = lay_off(lx, row * d);
            T x0[8], x1[8];
            ld8<T>(x, xt, src + i, x0);
            ld8<T>(x, xt, src + i + half, x1);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                T c = cs[t * half + i + k], s = sn[t * half + i + k], a = x0[k];
                x0[k] = a * c - x1[k] * s;
                x1[k] = a * s + x1[k] * c;
            }
            st8<T>(out, ot, row * d + i, x0);
            st8<T>(out, ot, row * d + i + half, x1);
        }
        return;
    }
    GRID_STRIDE(p, rows * half) {
        i64 row = p / half;
        int i = (int)(p - row * half), t = (int)(row % seq);
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        T c = cs[t * half + i], s = sn[t * half + i];
        T x0 = ldv<T>(x, xt, at(lx, row * d + a)), x1 = ldv<T>(x, xt, at(lx, row * d + b));
        stv<T>(out, ot, row * d + a, x0 * c - x1 * s);
        stv<T>(out, ot, row * d + b, x0 * s + x1 * c);
    }
}

// ---- reductions -------------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Sum (or max) over all threads of the block; every thread gets the result. `sh` holds 32 T.
template <typename T> __device__ T block_reduce(T v, bool is_max, T* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    T r = lane < nw ? sh[lane] : (is_max ? (T)-INFINITY : (T)0);
    r = is_max ? warp_max(r) : warp_sum(r);
    return r;
}

// Sum or max of each row of `n` (one warp per row).
template <typename T> __device__ void reduce_rows_t(const T* x, T* out, i64 rows, i64 n, int is_max) {
    i64 row = blockIdx.x * (i64)(blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    T acc = is_max ? (T)-INFINITY : (T)0;
    for (i64 j = lane; j < n; j += 32) {
        T v = x[row * n + j];
        acc = is_max ? (v > acc ? v : acc) : acc + v;
    }
    acc = is_max ? warp_max(acc) : warp_sum(acc);
    if (lane == 0) out[row] = acc;
}

// out[j] += Σ_r x[r·m + j] over this block's rows (out zeroed first; blocks of 32×8 threads).
template <typename T> __device__ void reduce_cols_t(const T* x, T* out, i64 rows, i64 m) {
    __shared__ T sh[8][33];
    i64 j = blockIdx.x * 32 + (threadIdx.x & 31);
    int ty = threadIdx.x >> 5;
    T acc = (T)0;
    if (j < m)
        for (i64 r = blockIdx.y * 8 + ty; r < rows; r += (i64)gridDim.y * 8) acc += x[r * m + j];
    sh[ty][threadIdx.x & 31] = acc;
    __syncthreads();
    if (ty == 0 && j < m) {
        for (int t = 1; t < 8; t++) acc += sh[t][threadIdx.x & 31];
        atomicAdd(&out[j], acc);
    }
}

// out[0] += Σ x (out zeroed first).
template <typename T> __device__ void reduce_all_t(const T* x, T* out, i64 n) {
    __shared__ T sh[32];
    T acc = (T)0;
    GRID_STRIDE(i, n) acc += x[i];
    acc = block_reduce(acc, false, sh);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// out[o] = Σ_r x[ol(o) + rl(r)]: any sum down to a broadcastable shape (thread per output).
template <typename T> __device__ void reduce_strided_t(const T* x, Lay ol, Lay rl, T* out, i64 outs, i64 red) {
    GRID_STRIDE(o, outs) {
        i64 base = lay_off(ol, o);
        T acc = (T)0;
        for (i64 r = 0; r < red; r++) acc += x[base + lay_off(rl, r)];
        out[o] = acc;
    }
}

// ---- fused row ops (one block per row) ----------------------------------------------------------

template <typename T> __device__ void softmax_t(const T* x, T* out, i64 n, int logm) {
    __shared__ T sh[32];
    const T* r = x + blockIdx.x * n;
    T* o = out + blockIdx.x * n;
    T mx = (T)-INFINITY;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) mx = r[j] > mx ? r[j] : mx;
    mx = block_reduce(mx, true, sh);
    if (mx == (T)-INFINITY) mx = (T)0;
    T z = (T)0;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) z += ex(r[j] - mx);
    z = block_reduce(z, false, sh);
    if (logm) {
        T lz = log(z);
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) o[j] = r[j] - mx - lz;
    } else {
        T inv = (T)1 / z;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) o[j] = ex(r[j] - mx) * inv;
    }
}

// Mean (zero for RMSNorm) and 1/sqrt(var + eps) of a row.
template <typename T> __device__ void row_stats(const T* r, i64 n, int center, double eps, T* sh, T* mu, T* rs) {
    T s = (T)0;
    if (center) {
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) s += r[j];
        s = block_reduce(s, false, sh);
    }
    T m = s / (T)n;
    T v = (T)0;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) v += (r[j] - m) * (r[j] - m);
    v = block_reduce(v, false, sh);
    *mu = m;
    *rs = (T)1 / sqrt(v / (T)n + (T)eps);
}

template <typename T> __device__ void norm_t(const T* x, const T* w, const T* b, T* out, i64 n, double eps, int center) {
    __shared__ T sh[32];
    const T* r = x + blockIdx.x * n;
    T mu, rs;
    row_stats(r, n, center, eps, sh, &mu, &rs);
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) out[blockIdx.x * n + j] = (r[j] - mu) * rs * w[j] + (b ? b[j] : (T)0);
}

// dx per row; dw, db summed over this block's `per` rows in shared memory (2n T), then added
// to the zeroed outputs.
template <typename T> __device__ void norm_bwd_t(const T* x, const T* w, const T* g, T* dx, T* dw, T* db, i64 rows, i64 n, double eps, int center, i64 per) {
    __shared__ T sh[32];
    extern __shared__ unsigned char smem_raw[];
    T* sw = (T*)smem_raw;
    T* sb = sw + n;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) sw[j] = sb[j] = (T)0;
    for (i64 row = blockIdx.x * per; row < rows && row < (blockIdx.x + 1) * per; row++) {
        const T* r = x + row * n;
        const T* gr = g + row * n;
        T mu, rs;
        row_stats(r, n, center, eps, sh, &mu, &rs);
        T mg = (T)0, mgx = (T)0;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            T xh = (r[j] - mu) * rs, gw = gr[j] * w[j];
            mg += gw;
            mgx += gw * xh;
            sw[j] += gr[j] * xh;
            sb[j] += gr[j];
        }
        mg = block_reduce(mg, false, sh);
        mgx = block_reduce(mgx, false, sh);
        mg = center ? mg / (T)n : (T)0;
        mgx = mgx / (T)n;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            T xh = (r[j] - mu) * rs;
            dx[row * n + j] = rs * (gr[j] * w[j] - mg - xh * mgx);
        }
    }
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
        atomicAdd(&dw[j], sw[j]);
        if (db) atomicAdd(&db[j], sb[j]);
    }
}

template <typename T> __device__ void gather_t(const T* table, const u32* ids, T* out, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) out[i] = table[(i64)ids[i / dim] * dim + i % dim];
}

template <typename T> __device__ void scatter_add_t(const T* g, const u32* ids, T* out, i64 n, i64 dim) {
    GRID_STRIDE(i, n * dim) atomicAdd(&out[(i64)ids[i / dim] * dim + i % dim], g[i]);
}

// The max and Σ exp(x − max) of one row of c elements of type xt, with every thread of the block.
template <typename T> __device__ void row_lse(const void* x, int xt, i64 base, i64 c, T* sh, T& mx, T& z) {
    mx = (T)-INFINITY;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        T v = ldv<T>(x, xt, base + j);
        mx = v > mx ? v : mx;
    }
    mx = block_reduce(mx, true, sh);
    z = (T)0;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) z += ex(ldv<T>(x, xt, base + j) - mx);
    z = block_reduce(z, false, sh);
}

// loss[0] += (lse(row) − row[target]) · inv_count over the rows whose target is not -1. The
// logits are read in their own type (16-bit under autocast), contiguous rows of c.
template <typename T> __device__ void ce_fwd_t(const void* x, int xt, const int* targets, T* loss, i64 c, double inv_count) {
    __shared__ T sh[32];
    int t = targets[blockIdx.x];
    if (t < 0) return;
    i64 base = blockIdx.x * c;
    T mx, z;
    row_lse<T>(x, xt, base, c, sh, mx, z);
    if (threadIdx.x == 0) atomicAdd(loss, (mx + log(z) - ldv<T>(x, xt, base + t)) * (T)inv_count);
}

// dx = (softmax(row) − onehot(target)) · g[0] · inv_count, written in dx's type dt; zero rows
// for ignored targets.
template <typename T> __device__ void ce_bwd_t(const void* x, int xt, const int* targets, const T* g, void* dx, int dt, i64 c, double inv_count) {
    __shared__ T sh[32];
    int t = targets[blockIdx.x];
    i64 base = blockIdx.x * c;
    if (t < 0) {
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) stv<T>(dx, dt, base + j, (T)0);
        return;
    }
    T mx, z;
    row_lse<T>(x, xt, base, c, sh, mx, z);
    T s = g[0] * (T)inv_count, inv = s / z;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) stv<T>(dx, dt, base + j, ex(ldv<T>(x, xt, base + j) - mx) * inv - (j == t ? s : (T)0));
}

// ---- general attention (one block per query row; scores in shared memory) ---------------------

struct AttnArgs {
    const void *q, *k, *v, *bias, *out, *lse, *dout;
    const u8* allow;
    const float* alibi;
    void *o, *l, *dq, *dk, *dv, *dbias;
    int batch, heads, kv_heads, q_len, k_len, dim, causal, pad;
    double scale;
};

// The additive term of (h, i, j), or false when masked out.
template <typename T> __device__ __forceinline__ bool attn_term(const AttnArgs& a, int h, int i, int j, T* t) {
    if (a.causal && j > i + a.k_len - a.q_len) return false;
    if (a.allow && !a.allow[(i64)i * a.k_len + j]) return false;
    T b = (T)0;
    if (a.bias) b += ((const T*)a.bias)[((i64)h * a.q_len + i) * a.k_len + j];
    if (a.alibi) {
        int qi = i + a.k_len - a.q_len;
        b -= (T)a.alibi[h] * (T)(qi > j ? qi - j : j - qi);
    }
    *t = b;
    return true;
}

template <typename T> __device__ void attn_fwd_t(AttnArgs a) {
    __shared__ T sh[32];
    extern __shared__ unsigned char smem_raw[];
    T* p = (T*)smem_raw;  // k_len scores, then probabilities
    int row = blockIdx.x, i = row % a.q_len, bh = row / a.q_len, h = bh % a.heads, b = bh / a.heads;
    i64 kv = ((i64)b * a.kv_heads + h / (a.heads / a.kv_heads)) * a.k_len * a.dim;
    const T* q = (const T*)a.q + (i64)row * a.dim;
    const T *k = (const T*)a.k + kv, *v = (const T*)a.v + kv;
    T mx = (T)-INFINITY;
    for (int j = threadIdx.x; j < a.k_len; j += blockDim.x) {
        T t, s = (T)-INFINITY;
        if (attn_term<T>(a, h, i, j, &t)) {
            s = (T)0;
            for (int d = 0; d < a.dim; d++) s += q[d] * k[(i64)j * a.dim + d];
            s = s * (T)a.scale + t;
        }
        p[j] = s;
        mx = s > mx ? s : mx;
    }
    mx = block_reduce(mx, true, sh);
    T z = (T)0;
    for (int j = threadIdx.x; j < a.k_len; j += blockDim.x) {
        T e = mx == (T)-INFINITY || p[j] == (T)-INFINITY ? (T)0 : ex(p[j] - mx);
        p[j] = e;
        z += e;
    }
    z = block_reduce(z, false, sh);
    __syncthreads();
    T inv = z == (T)0 ? (T)0 : (T)1 / z;
    T* o = (T*)a.o + (i64)row * a.dim;
    for (int d = threadIdx.x; d < a.dim; d += blockDim.x) {
        T acc = (T)0;
        for (int j = 0; j < a.k_len; j++) acc += p[j] * v[(i64)j * a.dim + d];
        o[d] = acc * inv;
    }
    if (threadIdx.x == 0) ((T*)a.l)[row] = z == (T)0 ? (T)-INFINITY : mx + log(z);
}

// dq of the row; dk, dv and dbias added atomically into zeroed buffers.
template <typename T> __device__ void attn_bwd_t(AttnArgs a) {
    __shared__ T sh[32];
    extern __shared__ unsigned char smem_raw[];
    T* p = (T*)smem_raw;   // probabilities
    T* ds = p + a.k_len;   // score gradients
    int row = blockIdx.x, i = row % a.q_len, bh = row / a.q_len, h = bh % a.heads, b = bh / a.heads;
    i64 kv = ((i64)b * a.kv_heads + h / (a.heads / a.kv_heads)) * a.k_len * a.dim;
    const T* q = (const T*)a.q + (i64)row * a.dim;
    const T* g = (const T*)a.dout + (i64)row * a.dim;
    const T* o = (const T*)a.out + (i64)row * a.dim;
    const T *k = (const T*)a.k + kv, *v = (const T*)a.v + kv;
    T lse = ((const T*)a.lse)[row];
    T delta = (T)0;
    for (int d = threadIdx.x; d < a.dim; d += blockDim.x) delta += g[d] * o[d];
    delta = block_reduce(delta, false, sh);
    for (int j = threadIdx.x; j < a.k_len; j += blockDim.x) {
        T t, pj = (T)0, dsj = (T)0;
        if (lse != (T)-INFINITY && attn_term<T>(a, h, i, j, &t)) {
            T s = (T)0, dp = (T)0;
            for (int d = 0; d < a.dim; d++) {
                s += q[d] * k[(i64)j * a.dim + d];
                dp += g[d] * v[(i64)j * a.dim + d];
            }
            pj = ex(s * (T)a.scale + t - lse);
            dsj = pj * (dp - delta);
        }
        p[j] = pj;
        ds[j] = dsj;
        if (a.dbias && dsj != (T)0) atomicAdd((T*)a.dbias + ((i64)h * a.q_len + i) * a.k_len + j, dsj);
    }
    __syncthreads();
    T* dq = (T*)a.dq + (i64)row * a.dim;
    for (int d = threadIdx.x; d < a.dim; d += blockDim.x) {
        T acc = (T)0;
        for (int j = 0; j < a.k_len; j++) acc += ds[j] * k[(i64)j * a.dim + d];
        dq[d] = acc * (T)a.scale;
    }
    T *dk = (T*)a.dk + kv, *dv = (T*)a.dv + kv;
    for (i64 e = threadIdx.x; e < (i64)a.k_len * a.dim; e += blockDim.x) {
        int j = (int)(e / a.dim), d = (int)(e % a.dim);
        if (p[j] != (T)0) atomicAdd(&dv[e], p[j] * g[d]);
        if (ds[j] != (T)0) atomicAdd(&dk[e], ds[j] * q[d] * (T)a.scale);
    }
}

// ---- optimizer --------------------------------------------------------------------------------

// AdamW as PyTorch computes it (the host loop in augur-nn's optim.rs), on f32 master weights.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2, float eps, float decay,
                                 float bias1, float bias2_sqrt) {
    float step = lr / bias1;
    GRID_STRIDE(i, n) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.f - b1) * gi;
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step * mi / (sqrtf(vi) / bias2_sqrt + eps);
    }
}

// ---- entry points -----------------------------------------------------------------------------

#define ELEMENTWISE(T, S)                                                                                                              \
    extern "C" __global__ void unary_##S(const void* x, int xt, Lay lx, void* out, int ot, i64 n, int op) { unary_t<T>(x, xt, lx, out, ot, n, op); } \
    extern "C" __global__ void affine_##S(const void* x, int xt, Lay lx, void* out, int ot, i64 n, double mul, double add) {                   \
        affine_t<T>(x, xt, lx, out, ot, n, mul, add);                                                                                          \
    }                                                                                                                                           \
    extern "C" __global__ void binary_##S(const void* a, int at_, Lay la, const void* b, int bt, Lay lb, void* out, int ot, i64 n, int op,    \
                                          int mode, i64 m) {                                                                                   \
        binary_t<T>(a, at_, la, b, bt, lb, out, ot, n, op, mode, m);                                                                           \
    }                                                                                                                                           \
    extern "C" __global__ void rope_##S(const void* x, int xt, Lay lx, const T* c, const T* s, void* out, int ot, i64 rows, int seq, int d,    \
                                        int il) {                                                                                              \
        rope_t<T>(x, xt, lx, c, s, out, ot, rows, seq, d, il);                                                                                 \
    }
ELEMENTWISE(float, f32)
ELEMENTWISE(double, f64)
extern "C" __global__ void reduce_rows_f32(const float* x, float* out, i64 rows, i64 n, int mx) { reduce_rows_t<float>(x, out, rows, n, mx); }
extern "C" __global__ void reduce_rows_f64(const double* x, double* out, i64 rows, i64 n, int mx) { reduce_rows_t<double>(x, out, rows, n, mx); }
extern "C" __global__ void reduce_cols_f32(const float* x, float* out, i64 rows, i64 m) { reduce_cols_t<float>(x, out, rows, m); }
extern "C" __global__ void reduce_cols_f64(const double* x, double* out, i64 rows, i64 m) { reduce_cols_t<double>(x, out, rows, m); }
extern "C" __global__ void reduce_all_f32(const float* x, float* out, i64 n) { reduce_all_t<float>(x, out, n); }
extern "C" __global__ void reduce_all_f64(const double* x, double* out, i64 n) { reduce_all_t<double>(x, out, n); }
extern "C" __global__ void reduce_strided_f32(const float* x, Lay ol, Lay rl, float* out, i64 outs, i64 red) { reduce_strided_t<float>(x, ol, rl, out, outs, red); }
extern "C" __global__ void reduce_strided_f64(const double* x, Lay ol, Lay rl, double* out, i64 outs, i64 red) { reduce_strided_t<double>(x, ol, rl, out, outs, red); }
extern "C" __global__ void softmax_f32(const float* x, float* out, i64 n, int lg) { softmax_t<float>(x, out, n, lg); }
extern "C" __global__ void softmax_f64(const double* x, double* out, i64 n, int lg) { softmax_t<double>(x, out, n, lg); }
extern "C" __global__ void norm_f32(const float* x, const float* w, const float* b, float* out, i64 n, double eps, int c) { norm_t<float>(x, w, b, out, n, eps, c); }
extern "C" __global__ void norm_f64(const double* x, const double* w, const double* b, double* out, i64 n, double eps, int c) { norm_t<double>(x, w, b, out, n, eps, c); }
extern "C" __global__ void norm_bwd_f32(const float* x, const float* w, const float* g, float* dx, float* dw, float* db, i64 rows, i64 n, double eps, int c, i64 per) {
    norm_bwd_t<float>(x, w, g, dx, dw, db, rows, n, eps, c, per);
}
extern "C" __global__ void norm_bwd_f64(const double* x, const double* w, const double* g, double* dx, double* dw, double* db, i64 rows, i64 n, double eps, int c, i64 per) {
    norm_bwd_t<double>(x, w, g, dx, dw, db, rows, n, eps, c, per);
}
extern "C" __global__ void gather_f32(const float* t, const u32* ids, float* out, i64 n, i64 dim) { gather_t<float>(t, ids, out, n, dim); }
extern "C" __global__ void gather_f64(const double* t, const u32* ids, double* out, i64 n, i64 dim) { gather_t<double>(t, ids, out, n, dim); }
extern "C" __global__ void scatter_add_f32(const float* g, const u32* ids, float* out, i64 n, i64 dim) { scatter_add_t<float>(g, ids, out, n, dim); }
extern "C" __global__ void scatter_add_f64(const double* g, const u32* ids, double* out, i64 n, i64 dim) { scatter_add_t<double>(g, ids, out, n, dim); }
extern "C" __global__ void ce_fwd_f32(const void* x, int xt, const int* t, float* loss, i64 c, double ic) { ce_fwd_t<float>(x, xt, t, loss, c, ic); }
extern "C" __global__ void ce_fwd_f64(const void* x, int xt, const int* t, double* loss, i64 c, double ic) { ce_fwd_t<double>(x, xt, t, loss, c, ic); }
extern "C" __global__ void ce_bwd_f32(const void* x, int xt, const int* t, const float* g, void* dx, int dt, i64 c, double ic) { ce_bwd_t<float>(x, xt, t, g, dx, dt, c, ic); }
extern "C" __global__ void ce_bwd_f64(const void* x, int xt, const int* t, const double* g, void* dx, int dt, i64 c, double ic) { ce_bwd_t<double>(x, xt, t, g, dx, dt, c, ic); }
extern "C" __global__ void attn_fwd_f32(AttnArgs a) { attn_fwd_t<float>(a); }
extern "C" __global__ void attn_fwd_f64(AttnArgs a) { attn_fwd_t<double>(a); }
extern "C" __global__ void attn_bwd_f32(AttnArgs a) { attn_bwd_t<float>(a); }
extern "C" __global__ void attn_bwd_f64(AttnArgs a) { attn_bwd_t<double>(a); }
