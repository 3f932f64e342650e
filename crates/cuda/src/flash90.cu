// FlashAttention for Hopper (sm_90a), forward and backward: the products on `wgmma`, issued by
// a warpgroup (4 warps) for 64 rows at a time, with B, and for q k^T also A, read by the tensor
// cores straight from shared memory; p stays in registers as the A operand of p v. Appended to
// flash.cu (same program, its helpers and `FaArgs`); compiled only for sm_90a. The descriptor
// strides below can be overridden through AUGUR_CUDA_DEFINES: a wrong one must fail the tests.
//
// Forward block: 2 warpgroups (256 threads) over F3_BM = 128 query rows, F3_BN = 128 keys per tile,
// head width 128. Shared memory, 1024-aligned: q, then two buffers of k and two of v, each tile
// as two 64-column halves of 128-byte rows with the 128-byte swizzle (16-byte chunk c of row r
// at c ^ (r % 8)), the layout `wgmma` reads as K-major (q, k) and, transposed, as MN-major (v).
// Accumulators: thread (warp w of its warpgroup, lane 4g + t) holds d[4n + e] = row 16w + g +
// 8(e / 2), column 8n + 2t + e % 2, the layout of mma.m16n8 per 8 columns; the A fragment
// of p for keys 16kk.. is the accumulators of columns 16kk.., as in the mma.sync kernel above.

#define F3_BM 128
#define F3_BN 128
#define F3_THREADS 256
#define F3_TILE (F3_BN * 128 * 2)  // bytes of one 128 x 128 tile of 16-bit values
// Descriptor strides (bytes): rows of a swizzle atom are 128 bytes apart, atoms of 8 rows 1024;
// v's two 64-column halves (MN atoms) lie one half-tile apart.
#ifndef F3_SBO
#define F3_SBO 1024
#endif
#ifndef F3_V_LBO
#define F3_V_LBO (F3_BN * 128)
#endif
#ifndef F3_V_SBO
#define F3_V_SBO 1024
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define WG_D64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WG_REGS \
    "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
    "}"

#define WG_D32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_REGS32 \
    "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
    "}"

// A shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ u64 f3_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// d (+)= A x B, m64n128k16, both from shared memory, K-major; `acc` 0 overwrites d.
template <bool BF> __device__ __forceinline__ void f3_ss(float* d, u64 da, u64 db, int acc) {
#define F3_SS(TY)                                                                                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_REGS          \
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                             \
                 : WG_D64                                                                      \
                 : "l"(da), "l"(db), "r"(acc)                                                  \
                 : "memory")
    if constexpr (BF) F3_SS("bf16");
    else F3_SS("f16");
#undef F3_SS
}

// d += A x B, m64n128k16, A (4 registers of this thread's fragment) x B from shared memory,
// MN-major (transposed).
template <bool BF> __device__ __forceinline__ void f3_rs(float* d, const u32* a, u64 db) {
#define F3_RS(TY)                                                                                 \
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_REGS            \
                 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"                                   \
                 : WG_D64                                                                      \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)                         \
                 : "memory")
    if constexpr (BF) F3_RS("bf16");
    else F3_RS("f16");
#undef F3_RS
}

// d (+)= A x B, m64n64k16, both from shared memory; TA / TB 1 read A / B MN-major.
template <bool BF, int TA, int TB> __device__ __forceinline__ void f3_ss64(float* d, u64 da, u64 db, int acc) {
#define F3_SS64(TY)                                                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_REGS32         \
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                        \
                 : WG_D32                                                                      \
                 : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB)                                \
                 : "memory")
    if constexpr (BF) F3_SS64("bf16");
    else F3_SS64("f16");
#undef F3_SS64
}

__device__ __forceinline__ void f3_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void f3_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void f3_wait() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keep the compiler from moving register work across the asynchronous products.
// A use of a product's A registers after its wait, so that the compiler keeps them (the tensor
// cores read them until then) rather than giving them to another value.
template <int N> __device__ __forceinline__ void f3_keep(const u32 (*a)[4]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" ::"r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]) : "memory");
}

template <int N> __device__ __forceinline__ void f3_pin(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// Copy ROWS rows of 128 values (global row stride 128) into a swizzled tile at shared byte
// address `s` (two halves of ROWS 128-byte rows); rows at or past `valid` are zero-filled.
template <int ROWS> __device__ __forceinline__ void f3_load(u32 s, const u16* g, int valid) {
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * 16; i += F3_THREADS) {
        const int r = i / 16, c = i % 16;
        const u32 dst = s + (c / 8) * (ROWS * 128) + r * 128 + (((c % 8) ^ (r % 8)) << 4);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(g + (size_t)(r < valid ? r : 0) * 128 + c * 8),
                     "r"(r < valid ? 16 : 0)
                     : "memory");
    }
}

template <bool BF> __device__ __forceinline__ void fa3_forward(const FaArgs& a) {
    constexpr int D = 128, NC = F3_BN / 8;
    extern __shared__ __align__(16) u8 f3_smem[];
    const u32 base = (smem_u32(f3_smem) + 1023) & ~1023u;
    const u32 sq = base, sk = sq + F3_TILE, sv = sk + 2 * F3_TILE;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int nqb = (a.q_len + F3_BM - 1) / F3_BM;
    const int q0 = (nqb - 1 - (int)blockIdx.x) * F3_BM;  // the longest causal rows start first
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (a.heads / a.kv_heads);
    const size_t qrow = (size_t)(b * a.heads + h) * a.q_len;
    const u16* K = (const u16*)a.k + (size_t)(b * a.kv_heads + hk) * a.k_len * D;
    const u16* V = (const u16*)a.v + (size_t)(b * a.kv_heads + hk) * a.k_len * D;
    const int off = a.k_len - a.q_len;
    const int kend = a.causal ? min(a.k_len, q0 + F3_BM + off) : a.k_len;
    const int ntiles = (kend + F3_BN - 1) / F3_BN;
    const float sl = a.scale * LOG2E;
    // This thread's two rows (g and g + 8 of its warp's 16) within the block.
    const int r0 = wg * 64 + warp * 16 + g;

    f3_load<F3_BM>(sq, (const u16*)a.q + (qrow + q0) * D, a.q_len - q0);
    f3_load<F3_BN>(sk, K, a.k_len);
    f3_load<F3_BN>(sv, V, a.k_len);
    cp_commit();

    float o[64], s[64];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};
    const u32 qa = sq + wg * 64 * 128;

    for (int j = 0; j < ntiles; j++) {
        const int buf = j & 1, k0 = j * F3_BN;
        cp_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // tile j is in; every warpgroup is done with tile j - 1's buffer
        if (j + 1 < ntiles) {
            f3_load<F3_BN>(sk + (buf ^ 1) * F3_TILE, K + (size_t)(k0 + F3_BN) * D, a.k_len - k0 - F3_BN);
            f3_load<F3_BN>(sv + (buf ^ 1) * F3_TILE, V + (size_t)(k0 + F3_BN) * D, a.k_len - k0 - F3_BN);
            cp_commit();
        }
        const u32 kb = sk + buf * F3_TILE, vb = sv + buf * F3_TILE;

        // s = q k^T: 8 steps of 16 along the head width (4 per 64-column half).
        f3_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 koff = (kk / 4) * (F3_TILE / 2) + (kk % 4) * 32;
            f3_ss<BF>(s, f3_desc(qa + koff, 16, F3_SBO), f3_desc(kb + koff, 16, F3_SBO), kk > 0);
        }
        f3_commit();
        f3_wait();
        f3_pin<64>(s);

        if (k0 + F3_BN > a.k_len || (a.causal && k0 + F3_BN - 1 > q0 + off) || a.allow) {
#pragma unroll
            for (int n = 0; n < NC; n++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (!visible(a, q0 + r0 + 8 * (e / 2), k0 + n * 8 + 2 * t + e % 2)) s[4 * n + e] = -FA_INF;
        }
        // Online softmax on the raw scores, as in fa_forward.
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float mx = m[hr];
#pragma unroll
            for (int n = 0; n < NC; n++) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * hr], s[4 * n + 2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float mb = mx == -FA_INF ? 0.f : mx * sl;
            const float alpha = ex2(m[hr] * sl - mb);
            m[hr] = mx;
            float rs = 0.f;
#pragma unroll
            for (int n = 0; n < NC; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float p = ex2(fmaf(s[4 * n + 2 * hr + e], sl, -mb));
                    s[4 * n + 2 * hr + e] = p;
                    rs += p;
                }
            l[hr] = l[hr] * alpha + rs;
#pragma unroll
            for (int n = 0; n < D / 8; n++) o[4 * n + 2 * hr] *= alpha, o[4 * n + 2 * hr + 1] *= alpha;
        }
        u32 pa[F3_BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < F3_BN / 16; kk++) {
            pa[kk][0] = pack2<BF>(s[8 * kk + 0], s[8 * kk + 1]);
            pa[kk][1] = pack2<BF>(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = pack2<BF>(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = pack2<BF>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        // o += p v: 8 steps of 16 keys; a step's 16 rows of v start 16 * 128 bytes apart.
        f3_fence();
#pragma unroll
        for (int kk = 0; kk < F3_BN / 16; kk++) f3_rs<BF>(o, pa[kk], f3_desc(vb + kk * 16 * 128, F3_V_LBO, F3_V_SBO));
        f3_commit();
        f3_wait();
        f3_pin<64>(o);
        f3_keep<F3_BN / 16>(pa);
    }

    u16* O = (u16*)a.o + qrow * D;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float sum = l[hr];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int qi = q0 + r0 + 8 * hr;
        if (qi >= a.q_len) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(u32*)(O + (size_t)qi * D + n * 8 + 2 * t) = pack2<BF>(o[4 * n + 2 * hr] * inv, o[4 * n + 2 * hr + 1] * inv);
        if (t == 0) ((float*)a.lse)[qrow + qi] = sum > 0.f ? (m[hr] * sl + __log2f(sum)) * LN2 : -FA_INF;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 order on wgmma): block (128 keys, kv head, batch); warpgroup w owns
// keys 64w.. and their dk, dv, and walks 64-row query steps of every query head that reads them:
//   s^T = k q^T and dp^T = v do^T (m64n64, keys as rows), p^T = exp(s^T scale - lse),
//   ds^T = p^T (dp^T - delta), dv += p^T do and dk += ds^T q (p^T, ds^T from registers),
//   then dq = ds k with ds^T staged in shared memory ([key][query], read MN-major), each
//   warpgroup taking 64 of dq's 128 columns, added to the f32 dq_acc.
// Shared memory (1024-aligned): k, v (128 x 128 tiles), two buffers each of q and do (64 x 128),
// ds^T (128 rows of 64 queries), two buffers each of 64 lse and 64 delta values.

#define F3B_BR 64
#define F3B_HALF (F3B_BR * 128)  // bytes of a 64-row tile's 64-column half

template <bool BF> __device__ __forceinline__ void fa3_backward(const FaArgs& a) {
    constexpr int D = 128, NQ = F3B_BR / 8;
    extern __shared__ __align__(16) u8 f3_smem[];
    const u32 base = (smem_u32(f3_smem) + 1023) & ~1023u;
    const u32 sk = base, sv = sk + F3_TILE, sq = sv + F3_TILE, sdo = sq + 2 * 2 * F3B_HALF, sds = sdo + 2 * 2 * F3B_HALF;
    float* const sl = (float*)(f3_smem + (sds + 2 * F3B_HALF - smem_u32(f3_smem)));  // lse, 2 buffers
    float* const sd = sl + 2 * F3B_BR;                                                // delta, 2 buffers
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int k0 = blockIdx.x * F3_BN, hk = blockIdx.y, b = blockIdx.z;
    const int group = a.heads / a.kv_heads, off = a.k_len - a.q_len;
    const size_t kvrow = (size_t)(b * a.kv_heads + hk) * a.k_len + k0;
    const float slog = a.scale * LOG2E;
    // This thread's two key rows within the block (and within its warpgroup's 64).
    const int kr = 16 * warp + g, kb = 64 * wg + kr;

    const int qstart = a.causal ? max(0, k0 - off) / F3B_BR : 0;
    const int nqt = (a.q_len + F3B_BR - 1) / F3B_BR;
    const int steps = group * (nqt - qstart);
    if (steps <= 0) return;

    auto fetch = [&](int i, int buf) {
        const int h = hk * group + i / (nqt - qstart), q0 = (qstart + i % (nqt - qstart)) * F3B_BR;
        const size_t row = (size_t)(b * a.heads + h) * a.q_len + q0;
        f3_load<F3B_BR>(sq + buf * 2 * F3B_HALF, (const u16*)a.q + row * D, a.q_len - q0);
        f3_load<F3B_BR>(sdo + buf * 2 * F3B_HALF, (const u16*)a.dout + row * D, a.q_len - q0);
        if (threadIdx.x < 2 * F3B_BR) {
            const int r = threadIdx.x % F3B_BR;
            const bool in = q0 + r < a.q_len;
            const float* src = (const float*)(threadIdx.x < F3B_BR ? a.lse : a.delta) + row + (in ? r : 0);
            float* dst = (threadIdx.x < F3B_BR ? sl : sd) + buf * F3B_BR + r;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(in ? 4 : 0) : "memory");
        }
    };
    f3_load<F3_BN>(sk, (const u16*)a.k + kvrow * D, a.k_len - k0);
    f3_load<F3_BN>(sv, (const u16*)a.v + kvrow * D, a.k_len - k0);
    fetch(0, 0);
    cp_commit();

    float dk[64], dv[64];
#pragma unroll
    for (int i = 0; i < 64; i++) dk[i] = dv[i] = 0.f;
    const u32 ka = sk + wg * 64 * 128, va = sv + wg * 64 * 128;

    for (int it = 0; it < steps; it++) {
        const int buf = it & 1;
        cp_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // step it is in; step it - 1 is done with the other buffers and ds
        if (it + 1 < steps) {
            fetch(it + 1, buf ^ 1);
            cp_commit();
        }
        const int h = hk * group + it / (nqt - qstart), q0 = (qstart + it % (nqt - qstart)) * F3B_BR;
        const u32 qs = sq + buf * 2 * F3B_HALF, dos = sdo + buf * 2 * F3B_HALF;

        float st[32], dpt[32];
        f3_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 ko = (kk / 4) * (F3_TILE / 2) + (kk % 4) * 32, qo = (kk / 4) * F3B_HALF + (kk % 4) * 32;
            f3_ss64<BF, 0, 0>(st, f3_desc(ka + ko, 16, F3_SBO), f3_desc(qs + qo, 16, F3_SBO), kk > 0);
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 ko = (kk / 4) * (F3_TILE / 2) + (kk % 4) * 32, qo = (kk / 4) * F3B_HALF + (kk % 4) * 32;
            f3_ss64<BF, 0, 0>(dpt, f3_desc(va + ko, 16, F3_SBO), f3_desc(dos + qo, 16, F3_SBO), kk > 0);
        }
        f3_commit();
        f3_wait();
        f3_pin<32>(st);
        f3_pin<32>(dpt);

        // p^T and ds^T; column c = 8n + 2t + e % 2 is query q0 + c. A query that sees no key has
        // lse = -inf and p = 0.
        const bool edge = k0 + F3_BN > a.k_len || q0 + F3B_BR > a.q_len || (a.causal && k0 + F3_BN - 1 > q0 + off) || a.allow;
        u32 pa[F3B_BR / 16][4], sa[F3B_BR / 16][4];
#pragma unroll
        for (int n = 0; n < NQ; n++) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = 8 * n + 2 * t + e % 2;
                const float lse = sl[buf * F3B_BR + c];
                const float lb = lse == -FA_INF ? FA_INF : lse * LOG2E;
                p[e] = ex2(fmaf(st[4 * n + e], slog, -lb));
                if (edge && !visible(a, q0 + c, k0 + kb + 8 * (e / 2))) p[e] = 0.f;
                ds[e] = p[e] * (dpt[4 * n + e] - sd[buf * F3B_BR + c]);
            }
            // The A fragment of keys-by-queries step n / 2: accumulators of columns 16(n/2)..
            pa[n / 2][2 * (n % 2)] = pack2<BF>(p[0], p[1]);
            pa[n / 2][2 * (n % 2) + 1] = pack2<BF>(p[2], p[3]);
            sa[n / 2][2 * (n % 2)] = pack2<BF>(ds[0], ds[1]);
            sa[n / 2][2 * (n % 2) + 1] = pack2<BF>(ds[2], ds[3]);
            // ds^T rows to shared memory: key row kb (+8), queries 8n + 2t, 8n + 2t + 1.
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                const int r = kb + 8 * hr;
                const u32 at = sds + r * 128 + ((n ^ (r % 8)) << 4) + 4 * t;
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(sa[n / 2][2 * (n % 2) + hr]) : "memory");
            }
        }
        // dv += p^T do, dk += ds^T q: 4 steps of 16 queries; B MN-major (transposed).
        f3_fence();
#pragma unroll
        for (int kk = 0; kk < F3B_BR / 16; kk++) f3_rs<BF>(dv, pa[kk], f3_desc(dos + kk * 16 * 128, F3B_HALF, F3_V_SBO));
#pragma unroll
        for (int kk = 0; kk < F3B_BR / 16; kk++) f3_rs<BF>(dk, sa[kk], f3_desc(qs + kk * 16 * 128, F3B_HALF, F3_V_SBO));
        f3_commit();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // ds^T complete

        // dq[:, 64 wg..] = ds k: A = ds^T rows MN-major, B = k's half wg, MN-major; 8 steps of 16 keys.
        float dq[32];
        f3_fence();
#pragma unroll
        for (int kk = 0; kk < F3_BN / 16; kk++)
            f3_ss64<BF, 1, 1>(dq, f3_desc(sds + kk * 16 * 128, F3B_HALF, F3_V_SBO),
                              f3_desc(sk + wg * (F3_TILE / 2) + kk * 16 * 128, F3_TILE / 2, F3_V_SBO), kk > 0);
        f3_commit();
        f3_wait();
        f3_pin<64>(dv);
        f3_pin<64>(dk);
        f3_pin<32>(dq);
        f3_keep<F3B_BR / 16>(pa);
        f3_keep<F3B_BR / 16>(sa);
        // Rows 16 warp + g (+8) of this step, columns 64 wg + 8n + 2t (+1).
        float* acc = (float*)a.dq_acc + ((size_t)(b * a.heads + h) * a.q_len + q0) * D + 64 * wg;
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int r = 16 * warp + g + 8 * hr;
            if (q0 + r >= a.q_len) continue;
#pragma unroll
            for (int n = 0; n < 8; n++)
                asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(acc + (size_t)r * D + 8 * n + 2 * t),
                             "f"(dq[4 * n + 2 * hr] * a.scale), "f"(dq[4 * n + 2 * hr + 1] * a.scale)
                             : "memory");
        }
    }

    u16* DK = (u16*)a.dk + kvrow * D;
    u16* DV = (u16*)a.dv + kvrow * D;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int r = kb + 8 * hr;
        if (k0 + r >= a.k_len) continue;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            *(u32*)(DK + (size_t)r * D + 8 * n + 2 * t) = pack2<BF>(dk[4 * n + 2 * hr] * a.scale, dk[4 * n + 2 * hr + 1] * a.scale);
            *(u32*)(DV + (size_t)r * D + 8 * n + 2 * t) = pack2<BF>(dv[4 * n + 2 * hr], dv[4 * n + 2 * hr + 1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(F3_THREADS, 1) fa3_bwd_d128_bf16(const FaArgs a) { fa3_backward<true>(a); }
extern "C" __global__ void __launch_bounds__(F3_THREADS, 1) fa3_bwd_d128_f16(const FaArgs a) { fa3_backward<false>(a); }
extern "C" __global__ void __launch_bounds__(F3_THREADS, 1) fa3_fwd_d128_bf16(const FaArgs a) { fa3_forward<true>(a); }
extern "C" __global__ void __launch_bounds__(F3_THREADS, 1) fa3_fwd_d128_f16(const FaArgs a) { fa3_forward<false>(a); }

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
