// One greedy decode step of a whole Llama-family model in one persistent launch.
//
// At batch 1 a step is ~150 matrix-vector products of a few hundred KB each: launched one by one
// they are latency-bound (about 8 µs each on an H200, where the weights of a whole step stream
// in 18 µs). Here one cooperative launch keeps every block resident and runs the phases back to
// back, separated by a grid-wide barrier:
//   per block: q/k/v + RoPE + cache write | attention | o-proj + residual
//              | gate/up + SwiGLU | down + residual
//   then the output head with the argmax, the next token id left on the device.
// Each phase spreads its rows over every warp of the grid; every block recomputes the normalised
// input in its own shared memory (a few KB), so no phase needs a barrier of its own. Attention
// spreads 32-key chunks of every head over all SMs (on a few SMs it was bound by their share of
// the bandwidth: 21 µs a block instead of 3.5). The next block's weights and cache are
// prefetched into L2 while the current one runs, by the warps that would otherwise idle through
// a grid barrier (issued up front they cost every block 3.3 µs). Activations written inside
// the launch are read with ld.global.cg (from L2, never from a block's stale L1).
//
// Appended to kernels.cu by the build (one NVRTC program): it reuses dq8, warp_sum, block_sum.

// Weights of one decoder block (`DLayer` in mega.rs, field for field).
struct DLayer {
    const float* attn_norm;
    const float* ffn_norm;
    const u8* w[7];  // q, k, v, o, gate, up, down
    const float* bias[3];
    float* kc;
    float* vc;
    int ty[7];
    int pad;
};

// The model, the sequence's scratch and the step's state (`DModel` in mega.rs).
struct DModel {
    const DLayer* layers;
    const u8* embed;
    const u8* out;
    const float* norm;
    const float* rope;
    float* x;        // [dim] residual stream
    float* q;        // [nh * hd]
    float* att;      // [nh * hd]
    float* h;        // [hidden] SwiGLU output
    float* logits;   // [vocab], or null
    float* po;       // attention partials [nh][chunks of 32 keys][hd]
    float* pml;      // [nh][chunks][2]: (max, sum)
    float* best_v;   // [gridDim.x] per-block maxima of the head
    int* best_i;
    int* ids;        // [0]: the step's input token, replaced by its argmax
    int* meta;       // [0]: cached positions (the token's position), [1]: steps taken
    int* tokens;     // tokens[meta[1]] = the argmax
    unsigned* bar;   // [0]: barrier arrivals, [1]: blocks done (both left at zero)
    int dim, hidden, nh, nkv, hd, vocab, n_layer, interleaved;
    int t_embed, t_out;
    long long* timing;  // null, or block 0's clock at each phase boundary (AUGUR_CUDA_TIMING)
    float eps, scale;
    int stage;  // bytes of staged weights per warp and buffer (0: none)
    int pad;
};

// Block 0's clock at the next phase boundary, when timing is asked for.
#define STAMP()                                                                           \
    do {                                                                                  \
        if (m.timing && blockIdx.x == 0 && threadIdx.x == 0) m.timing[stamp] = clock64(); \
        stamp++;                                                                          \
    } while (0)

#ifndef DK_SPIN_NS
#define DK_SPIN_NS 0  // sleep between polls of a grid barrier (tuning knob)
#endif
#ifndef DK_MIN_BLOCKS
#define DK_MIN_BLOCKS 1  // blocks per SM the register budget must allow (tuning knob)
#endif
#ifndef DK_KB_MAX
#define DK_KB_MAX 16  // most keys whose values the attention loads at once (tuning knob)
#endif
#ifndef DK_UNROLL_ROWS
#define DK_UNROLL_ROWS 2  // rows' worth of weight chunks a warp loads at once (tuning knob)
#endif
#ifndef DK_MAX_CHUNKS
#define DK_MAX_CHUNKS 16  // most attention partials per head (tuning knob)
#endif
#ifndef DK_HEAD_ROWS
#define DK_HEAD_ROWS 4  // output-head rows a warp loads at once (tuning knob)
#endif
#ifndef DK_PREFETCH
#define DK_PREFETCH 1  // prefetch the next block's weights and cache into L2 (tuning knob)
#endif
#define DK_THREADS 256
#define DK_WARPS (DK_THREADS / 32)

__device__ __forceinline__ size_t rb_any(int ty, int k) {
    switch (ty) {
        case T_F32: return row_bytes<T_F32>(k);
        case T_F16: return row_bytes<T_F16>(k);
        case T_BF16: return row_bytes<T_BF16>(k);
        case T_Q4_0: return row_bytes<T_Q4_0>(k);
        case T_Q4_1: return row_bytes<T_Q4_1>(k);
        case T_Q5_0: return row_bytes<T_Q5_0>(k);
        case T_Q5_1: return row_bytes<T_Q5_1>(k);
        case T_Q8_0: return row_bytes<T_Q8_0>(k);
        case T_Q4_K: return row_bytes<T_Q4_K>(k);
        case T_Q5_K: return row_bytes<T_Q5_K>(k);
        default: return row_bytes<T_Q6_K>(k);
    }
}

// out[i] = W_i[row_i] · xs for R rows (same block type), k inputs in shared memory, summed over
// the warp (every lane gets them). The R rows' loads are issued together, so a warp waits for
// one memory round trip per chunk step rather than R. Per lane, chunk sums are added up in
// order (as dot_chunk).
template <int T, int R>
__device__ __forceinline__ void wdot(const u8* const* w, const int* row, const float* xs, int k, float* out) {
    size_t rb = row_bytes<T>(k);
    float a[R];
#pragma unroll
    for (int r = 0; r < R; r++) a[r] = 0.f;
    // U chunks per row in flight: about four rows' worth of loads at a time.
    constexpr int U = R >= DK_UNROLL_ROWS ? 1 : DK_UNROLL_ROWS / R;
    int chunks = k / 8;
    for (int c0 = threadIdx.x & 31; c0 < chunks; c0 += 32 * U) {
        float v[U][R][8];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < R; r++)
                if (c0 + 32 * u < chunks) dq8<T>(w[r] + (size_t)row[r] * rb, c0 + 32 * u, v[u][r]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c >= chunks) break;
            float4 x0 = *(const float4*)(xs + c * 8), x1 = *(const float4*)(xs + c * 8 + 4);
#pragma unroll
            for (int r = 0; r < R; r++)
                a[r] += v[u][r][0] * x0.x + v[u][r][1] * x0.y + v[u][r][2] * x0.z + v[u][r][3] * x0.w + v[u][r][4] * x1.x +
                        v[u][r][5] * x1.y + v[u][r][6] * x1.z + v[u][r][7] * x1.w;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = warp_sum(a[r]);
}

template <int R> __device__ void wdot_any(int ty, const u8* const* w, const int* row, const float* xs, int k, float* out) {
    switch (ty) {
        case T_F32: wdot<T_F32, R>(w, row, xs, k, out); break;
        case T_F16: wdot<T_F16, R>(w, row, xs, k, out); break;
        case T_BF16: wdot<T_BF16, R>(w, row, xs, k, out); break;
        case T_Q4_0: wdot<T_Q4_0, R>(w, row, xs, k, out); break;
        case T_Q4_1: wdot<T_Q4_1, R>(w, row, xs, k, out); break;
        case T_Q5_0: wdot<T_Q5_0, R>(w, row, xs, k, out); break;
        case T_Q5_1: wdot<T_Q5_1, R>(w, row, xs, k, out); break;
        case T_Q8_0: wdot<T_Q8_0, R>(w, row, xs, k, out); break;
        case T_Q4_K: wdot<T_Q4_K, R>(w, row, xs, k, out); break;
        case T_Q5_K: wdot<T_Q5_K, R>(w, row, xs, k, out); break;
        default: wdot<T_Q6_K, R>(w, row, xs, k, out); break;
    }
}

// One row.
__device__ __forceinline__ float wdot1(int ty, const u8* w, int row, const float* xs, int k) {
    float o;
    wdot_any<1>(ty, &w, &row, xs, k, &o);
    return o;
}

// Two rows, of two matrices that may differ in type.
__device__ __forceinline__ void wdot2(const int* ty, const u8* const* w, const int* row, const float* xs, int k, float* out) {
    if (ty[0] == ty[1]) {
        wdot_any<2>(ty[0], w, row, xs, k, out);
    } else {
        out[0] = wdot1(ty[0], w[0], row[0], xs, k);
        out[1] = wdot1(ty[1], w[1], row[1], xs, k);
    }
}

__device__ void dq8_any(int ty, const u8* row, int c, float* o) {
    switch (ty) {
        case T_F32: dq8<T_F32>(row, c, o); break;
        case T_F16: dq8<T_F16>(row, c, o); break;
        case T_BF16: dq8<T_BF16>(row, c, o); break;
        case T_Q4_0: dq8<T_Q4_0>(row, c, o); break;
        case T_Q4_1: dq8<T_Q4_1>(row, c, o); break;
        case T_Q5_0: dq8<T_Q5_0>(row, c, o); break;
        case T_Q5_1: dq8<T_Q5_1>(row, c, o); break;
        case T_Q8_0: dq8<T_Q8_0>(row, c, o); break;
        case T_Q4_K: dq8<T_Q4_K>(row, c, o); break;
        case T_Q5_K: dq8<T_Q5_K>(row, c, o); break;
        default: dq8<T_Q6_K>(row, c, o); break;
    }
}

// The next grid-wide barrier of this launch (`arrivals` counts the arrivals it waits for):
// returns once every block has arrived, with the writes made before it visible. The block's
// writes are ordered before thread 0's release-add by the CTA barrier (release is cumulative);
// thread 0's acquire-load orders what follows. While thread 0 polls, warps 1.. of the block run
// `idle` (prefetches and table copies that no phase waits for).
template <class F> __device__ __forceinline__ void grid_barrier(unsigned* ctr, unsigned& arrivals, F idle) {
    __syncthreads();
    arrivals += gridDim.x;
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ctr) : "memory");
        unsigned v;
        do {
#if DK_SPIN_NS > 0
            __nanosleep(DK_SPIN_NS);
#endif
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
        } while (v < arrivals);
    } else if (threadIdx.x >= 32) {
        idle();
    }
    __syncthreads();
}

// Pull `bytes` at `p` into L2, 128-byte line t of every nt (t counts the threads sharing it).
__device__ __forceinline__ void prefetch_l2(const void* p, size_t bytes, size_t t, size_t nt) {
    if (!DK_PREFETCH) return;
    for (size_t off = t * 128; off < bytes; off += nt * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"((const u8*)p + off));
}

// Every thread of the grid pulls its share of `bytes` at `p` into L2.
__device__ __forceinline__ void prefetch_all(const void* p, size_t bytes) {
    prefetch_l2(p, bytes, (size_t)blockIdx.x * blockDim.x + threadIdx.x, (size_t)gridDim.x * blockDim.x);
}

// Bytes of matrix i (q, k, v, o, gate, up, down) of a block.
__device__ __forceinline__ size_t matrix_bytes(const DModel& m, const DLayer* L, int i) {
    int qd = m.nh * m.hd, kvd = m.nkv * m.hd;
    const int rows[7] = {qd, kvd, kvd, m.dim, m.hidden, m.hidden, m.dim};
    const int ks[7] = {m.dim, m.dim, m.dim, qd, m.dim, m.dim, m.hidden};
    return (size_t)rows[i] * rb_any(L->ty[i], ks[i]);
}

// Share `part` (0..4, one per grid barrier of a block) of what the next block needs in L2: its
// q/k/v, o and the key cache, gate and the value cache, up, down; or, when `next` is null, a
// fifth of the output head. Run by warps 1.. of every block while a barrier waits.
__device__ void prefetch_part(const DModel& m, const DLayer* next, int part, int pos) {
    size_t nt = (size_t)gridDim.x * (blockDim.x - 32), t = (size_t)blockIdx.x * (blockDim.x - 32) + threadIdx.x - 32;
    if (!next) {
        size_t head = (size_t)m.vocab * rb_any(m.t_out, m.dim), fifth = ((head + 4) / 5 + 127) & ~(size_t)127;
        size_t from = min(head, part * fifth);
        prefetch_l2(m.out + from, min(fifth, head - from), t, nt);
        return;
    }
    size_t cache = (size_t)pos * m.nkv * m.hd * 4;
    switch (part) {
        case 0:
            for (int i = 0; i < 3; i++) prefetch_l2(next->w[i], matrix_bytes(m, next, i), t, nt);
            break;
        case 1:
            prefetch_l2(next->w[3], matrix_bytes(m, next, 3), t, nt);
            prefetch_l2(next->kc, cache, t, nt);
            break;
        case 2:
            prefetch_l2(next->w[4], matrix_bytes(m, next, 4), t, nt);
            prefetch_l2(next->vc, cache, t, nt);
            break;
        default: prefetch_l2(next->w[part + 2], matrix_bytes(m, next, part + 2), t, nt); break;
    }
}

// Copy block table entry `src` (global) to `dst` (shared), by the warp whose lane `i` (0..31) is
// this thread.
__device__ __forceinline__ void copy_layer(DLayer* dst, const DLayer* src, int i) {
    for (int w = i; w < (int)(sizeof(DLayer) / 4); w += 32) ((u32*)dst)[w] = __ldg((const u32*)src + w);
}

// xs = src (k floats written earlier in this launch), then RMSNorm(xs) * nw unless nw is null.
// The norm weights go to `wn` (shared) in the same pass, so their loads overlap the input's.
__device__ void stage_input(float* xs, float* wn, const float* src, int k, const float* nw, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        float v = __ldcg(src + i);
        if (nw) wn[i] = nw[i];
        xs[i] = v;
        ss += v * v;
    }
    if (nw) {
        ss = block_sum(ss);
        float r = 1.0f / sqrtf(ss / (float)k + eps);
        for (int i = threadIdx.x; i < k; i += blockDim.x) xs[i] = xs[i] * r * wn[i];
    }
    __syncthreads();
}

// Weight staging. A phase's weights do not depend on the grid barrier before it, only its input
// does, so each warp copies the rows of its items for the next weight phase into its own
// shared-memory buffer (cp.async, two buffers per warp) when the current phase starts, and reads
// them from there instead of making L2 round trips after the barrier. Weight phases: 0 q/k/v
// (pairs of rows, `qkv_pair`), 1 o, 2 gate/up (row g of each), 3 down; phase p uses buffer
// p % 2. A row travels as the 16-byte-aligned span that holds it (16-byte copies, its bytes at
// the same offset mod 16 as in global memory; the uploads pad each matrix to 16 bytes). Items
// that do not fit what is left of a buffer are read from global memory as before; `stage_slot`
// decides the same way on both sides.

// The weight rows of item g of weight phase ph of block L.
struct Rows {
    const u8* w[2];
    int rb[2];
    int n;
};

__device__ __forceinline__ int phase_items(const DModel& m, int ph) {
    return ph == 0 ? m.nh * m.hd / 2 + m.nkv * m.hd : (ph == 2 ? m.hidden : m.dim);
}

__device__ __forceinline__ Rows phase_rows(const DModel& m, const DLayer* L, int ph, int g) {
    Rows r;
    if (ph == 0) {
        QkvPair p = qkv_pair(g, m.nh * m.hd / 2, m.nkv * m.hd / 2, m.hd, m.interleaved);
        size_t rb = rb_any(L->ty[p.seg], m.dim);
        r.w[0] = L->w[p.seg] + (size_t)p.r0 * rb;
        r.w[1] = L->w[p.seg] + (size_t)p.r1 * rb;
        r.rb[0] = r.rb[1] = (int)rb;
        r.n = 2;
    } else if (ph == 2) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            size_t rb = rb_any(L->ty[4 + i], m.dim);
            r.w[i] = L->w[4 + i] + (size_t)g * rb;
            r.rb[i] = (int)rb;
        }
        r.n = 2;
    } else {
        int i = ph == 1 ? 3 : 6;
        size_t rb = rb_any(L->ty[i], ph == 1 ? m.nh * m.hd : m.hidden);
        r.w[0] = r.w[1] = L->w[i] + (size_t)g * rb;
        r.rb[0] = r.rb[1] = (int)rb;
        r.n = 1;
    }
    return r;
}

// Bytes of the 16-byte-aligned span that holds `rb` bytes at `w`.
__device__ __forceinline__ int span16(const u8* w, int rb) {
    return (int)((((size_t)w + rb + 15) & ~(size_t)15) - ((size_t)w & ~(size_t)15));
}

// Whether an item's rows have a place in the warp's buffer: at `off`, which moves past them.
// The first item that has none closes the buffer for the rest of the phase.
__device__ __forceinline__ bool stage_slot(const DModel& m, const Rows& r, int& off, bool& open) {
    if (!open) return false;
    int need = span16(r.w[0], r.rb[0]) + (r.n > 1 ? span16(r.w[1], r.rb[1]) : 0);
    if (off + need > m.stage) {
        open = false;
        return false;
    }
    off += need;
    return true;
}

// This warp's staging buffer b.
__device__ __forceinline__ u8* stage_buf(const DModel& m, float* after, int b) {
    size_t base = ((size_t)after + 15) & ~(size_t)15;
    return (u8*)base + ((threadIdx.x >> 5) * 2 + b) * (size_t)m.stage;
}

// Point ws / rs (row pointers and indices, as `wdot` takes them) at the staged copy of item rw's
// rows in buffer `buf` when the item has its slot there (`stage_slot`); else leave them.
__device__ __forceinline__ void use_staged(const DModel& m, const Rows& rw, u8* buf, int& off, bool& open, const u8** ws, int* rs) {
    int at = off;
    if (!stage_slot(m, rw, off, open)) return;
    ws[0] = buf + at + ((size_t)rw.w[0] & 15);
    ws[1] = buf + at + span16(rw.w[0], rw.rb[0]) + ((size_t)rw.w[1] & 15);
    rs[0] = rs[1] = 0;
}

// Queue the copies of this warp's rows of weight phase ph of block L (none when L is null),
// as one cp.async group of every thread.
__device__ void stage_phase(const DModel& m, const DLayer* L, int ph, u8* buf) {
    int lane = threadIdx.x & 31, W = gridDim.x * DK_WARPS, off = 0;
    bool open = L && m.stage > 0;
    for (int g = blockIdx.x * DK_WARPS + (threadIdx.x >> 5); open && g < phase_items(m, ph); g += W) {
        Rows r = phase_rows(m, L, ph, g);
        int at = off;
        if (!stage_slot(m, r, off, open)) break;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (i == r.n) break;
            u32 dst = (u32)__cvta_generic_to_shared(buf + at);
            const u8* src = (const u8*)((size_t)r.w[i] & ~(size_t)15);
            int n = span16(r.w[i], r.rb[i]);
            for (int b = 16 * lane; b < n; b += 32 * 16)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + b), "l"(src + b) : "memory");
            at += n;
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Wait for this warp's copies of the current phase (all but the group queued last).
__device__ __forceinline__ void staged_wait() {
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncwarp();
}

// Keys per attention chunk with nkeys cached keys; the attention phase and the merge of its
// partials (`stage_attention`) must cut the keys alike.
__device__ __forceinline__ int attn_span(int nkeys) {
    return 32 * max(1, (nkeys + 32 * DK_MAX_CHUNKS - 1) / (32 * DK_MAX_CHUNKS));
}

// One round of a warp's online softmax: lane's score d (ok: it has a key) joins the running max
// mx and sum l; returns the lane's weight and sets r, the factor for what came before (0 on the
// first round).
__device__ __forceinline__ float softmax_round(bool ok, float d, float& mx, float& l, float& r) {
    float score = ok ? d : -INFINITY, mnew = fmaxf(mx, warp_max(score));
    float p = ok ? expf(score - mnew) : 0.f;
    r = expf(mx - mnew);
    l = l * r + warp_sum(p);
    mx = mnew;
    return p;
}

// The result of chunk c of head h (nd of the N values in acc per lane; running max mx, sum l):
// the head's output when it has one chunk, else a partial for `stage_attention`.
template <int N> __device__ __forceinline__ void attn_store(const DModel& m, int h, int c, int nchunk, int nd, const float (&acc)[N], float mx, float l) {
    int lane = threadIdx.x & 31, hd = 32 * nd;
    size_t part = (size_t)h * nchunk + c;
#pragma unroll
    for (int i = 0; i < N; i++) {
        if (i == nd) break;
        if (nchunk == 1)
            m.att[h * hd + lane + 32 * i] = acc[i] / l;
        else
            m.po[part * hd + lane + 32 * i] = acc[i];
    }
    if (nchunk > 1 && lane == 0) *(float2*)(m.pml + part * 2) = make_float2(mx, l);
}

// A round's values: key u (at v + u * stride, this lane's dims lane + 32 i) for the 32 keys
// from v, clamped to the round's nk keys (a key past them has weight 0).
template <int ND> __device__ __forceinline__ void attn_load_v(const float* v, int stride, int nk, float (&vv)[32][ND]) {
#pragma unroll
    for (int u = 0; u < 32; u++) {
        const float* row = v + (size_t)min(u, nk - 1) * stride;
#pragma unroll
        for (int i = 0; i < ND; i++) vv[u][i] = __ldcg(row + 32 * i);
    }
}

// Attention of the step's query (m.q) against cache rows 0..pos in chunks of `span` keys, 32 at
// a time, one key per lane (online softmax across a chunk's rounds), for head_dim 32 ND. Chunk
// c of head h is item h * nchunk + c, taken by warp item / gridDim.x of block item % gridDim.x:
// the chunks spread over every SM, so the cache streams at the device's bandwidth rather than a
// few SMs'. Each warp writes its partial (max, sum, unnormalised output), which the next phase
// merges (`stage_attention`). Chunks are 32 keys up to 512 cached keys and grow beyond, so that
// a head never has more than DK_MAX_CHUNKS partials (`attn_span`). A round is one L2 round trip
// where head_dim is 64 or less: the query (lane i holds dims i + 32 e, shuffled to the lane
// that needs them), the round's keys and their values (which do not depend on the scores) are
// all loaded before the first is used.
template <int ND> __device__ void attn_items(const DModel& m, const DLayer* L, int pos) {
    static_assert(ND <= 2, "head_dim above 64 takes attn_generic");
    constexpr int HD = 32 * ND;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nkeys = pos + 1, span = attn_span(nkeys);
    int nchunk = (nkeys + span - 1) / span;
    int kvd = m.nkv * HD, group = m.nh / m.nkv;
    for (int it = blockIdx.x + warp * gridDim.x; it < m.nh * nchunk; it += gridDim.x * DK_WARPS) {
        int h = it / nchunk, c = it % nchunk, kvh = h / group;
        float q[ND], acc[ND];
#pragma unroll
        for (int i = 0; i < ND; i++) {
            q[i] = __ldcg(m.q + h * HD + lane + 32 * i) * m.scale;  // scaled first, as `attn`
            acc[i] = 0.f;
        }
        float mx = -INFINITY, l = 0.f;
        for (int j0 = c * span; j0 < min((c + 1) * span, nkeys); j0 += 32) {
            int nk = min(32, nkeys - j0);
            bool ok = lane < nk;
            const float4* kr = (const float4*)(L->kc + (size_t)(j0 + (ok ? lane : nk - 1)) * kvd + kvh * HD);
            const float* vb = L->vc + (size_t)j0 * kvd + kvh * HD + lane;
            float4 k[HD / 4];
            float vv[32][ND];
#pragma unroll
            for (int f = 0; f < HD / 4; f++) k[f] = __ldcg(kr + f);
            attn_load_v<ND>(vb, kvd, nk, vv);
            float d = 0.f;
#pragma unroll
            for (int f = 0; f < HD / 4; f++) {
                int e = 4 * f;  // dims e .. e + 3 sit in lane e % 32, register e / 32
                float qx = __shfl_sync(0xffffffffu, q[e / 32], e % 32), qy = __shfl_sync(0xffffffffu, q[e / 32], e % 32 + 1);
                float qz = __shfl_sync(0xffffffffu, q[e / 32], e % 32 + 2), qw = __shfl_sync(0xffffffffu, q[e / 32], e % 32 + 3);
                d += k[f].x * qx + k[f].y * qy + k[f].z * qz + k[f].w * qw;
            }
            float r, p = softmax_round(ok, d, mx, l, r);
#pragma unroll
            for (int i = 0; i < ND; i++) acc[i] *= r;
#pragma unroll
            for (int u = 0; u < 32; u++) {
                float pu = __shfl_sync(0xffffffffu, p, u);  // 0 past the round's keys
#pragma unroll
                for (int i = 0; i < ND; i++) acc[i] += pu * vv[u][i];
            }
        }
        attn_store(m, h, c, nchunk, ND, acc, mx, l);
    }
}

// acc[i] += sum over the warp's nk keys (at most 32) of p_j * V[j][lane + 32 i], key j's weight
// p in lane j; KB keys' loads issued together.
template <int ND> __device__ __forceinline__ void attn_pv(const float* v, int stride, int nk, float p, float* acc) {
    constexpr int KB = 32 / ND > DK_KB_MAX ? DK_KB_MAX : 32 / ND;
    int lane = threadIdx.x & 31;
    for (int j0 = 0; j0 < nk; j0 += KB) {
        float vv[KB][ND], pj[KB];
#pragma unroll
        for (int u = 0; u < KB; u++) {
            int jj = min(j0 + u, nk - 1);  // past the warp's keys: a valid row, weight 0
            float pu = __shfl_sync(0xffffffffu, p, jj);
            pj[u] = j0 + u < nk ? pu : 0.f;
#pragma unroll
            for (int i = 0; i < ND; i++) vv[u][i] = __ldcg(v + (size_t)jj * stride + lane + 32 * i);
        }
#pragma unroll
        for (int u = 0; u < KB; u++)
#pragma unroll
            for (int i = 0; i < ND; i++) acc[i] += pj[u] * vv[u][i];
    }
}

// `attn_items` for head_dim above 64 (a multiple of 32 up to 32 ATT_MAXD): the query from L2 with
// each key, eight 16-byte loads of each in flight, then the values, DK_KB_MAX keys at a time.
__device__ void attn_generic(const DModel& m, const DLayer* L, int pos) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nkeys = pos + 1, span = attn_span(nkeys);
    int nchunk = (nkeys + span - 1) / span;
    int hd = m.hd, nd = hd / 32, kvd = m.nkv * hd, group = m.nh / m.nkv;
    for (int it = blockIdx.x + warp * gridDim.x; it < m.nh * nchunk; it += gridDim.x * DK_WARPS) {
        int h = it / nchunk, c = it % nchunk, kvh = h / group;
        float mx = -INFINITY, l = 0.f;
        float acc[ATT_MAXD];
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) acc[i] = 0.f;
        for (int j0 = c * span; j0 < min((c + 1) * span, nkeys); j0 += 32) {
            int j = j0 + lane;
            bool ok = j < nkeys;
            // q · k of this lane's key, q scaled first (as `attn`), eight 16-byte loads of each in
            // flight at a time (hd is a multiple of 32).
            const float4* kr = (const float4*)(L->kc + (size_t)(ok ? j : nkeys - 1) * kvd + kvh * hd);
            const float4* qr = (const float4*)(m.q + h * hd);
            float d = 0.f;
            for (int i0 = 0; i0 < hd / 4; i0 += 8) {
                float4 a[8], b[8];
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    a[e] = __ldcg(kr + i0 + e);
                    b[e] = __ldcg(qr + i0 + e);
                }
#pragma unroll
                for (int e = 0; e < 8; e++)
                    d += a[e].x * (b[e].x * m.scale) + a[e].y * (b[e].y * m.scale) + a[e].z * (b[e].z * m.scale) +
                         a[e].w * (b[e].w * m.scale);
            }
            float r, p = softmax_round(ok, d, mx, l, r);
#pragma unroll
            for (int i = 0; i < ATT_MAXD; i++) acc[i] *= r;
            int nk = min(32, nkeys - j0);
            const float* vbase = L->vc + (size_t)j0 * kvd + kvh * hd;
            switch (nd) {  // heads of 32 and 64 take `attn_items`
                case 3: attn_pv<3>(vbase, kvd, nk, p, acc); break;
                case 4: attn_pv<4>(vbase, kvd, nk, p, acc); break;
                case 5: attn_pv<5>(vbase, kvd, nk, p, acc); break;
                case 6: attn_pv<6>(vbase, kvd, nk, p, acc); break;
                case 7: attn_pv<7>(vbase, kvd, nk, p, acc); break;
                default: attn_pv<8>(vbase, kvd, nk, p, acc); break;
            }
        }
        attn_store(m, h, c, nchunk, nd, acc, mx, l);
    }
}

__device__ void attn_phase(const DModel& m, const DLayer* L, int pos) {
    switch (m.hd / 32) {
        case 1: attn_items<1>(m, L, pos); break;
        case 2: attn_items<2>(m, L, pos); break;
        default: attn_generic(m, L, pos); break;
    }
}

// xs = the attention output of every head (qd floats): written by the attention phase when a
// head has one chunk, else merged here from its partials (each block merges them itself, which
// costs a few KB of L2 reads but no merge step, with its atomics and round trips, between the
// attention and the barrier). Per head: MM = max of the chunks' maxima, tot = sum of l_c
// e^(m_c - MM), out = sum over chunks in order of po_c e^(m_c - MM), then out / tot. Each thread
// merges four adjacent values of one head, every partial's (max, sum) and values loaded at once:
// one L2 round trip (a warp per head computing the weights first, a block barrier, then the
// values took several and were 9% slower at 128 keys, 21% at 4096, with `attn_items`).
__device__ void stage_attention(const DModel& m, float* xs, int pos) {
    int nkeys = pos + 1, span = attn_span(nkeys);
    int nchunk = (nkeys + span - 1) / span, hd = m.hd, qd = m.nh * hd;
    if (nchunk == 1) {
        stage_input(xs, nullptr, m.att, qd, nullptr, 0.f);
        return;
    }
    for (int i = threadIdx.x; i < qd / 4; i += blockDim.x) {
        int h = 4 * i / hd, d = 4 * i % hd;
        const float2* ml = (const float2*)m.pml + (size_t)h * nchunk;
        const float4* po = (const float4*)(m.po + (size_t)h * nchunk * hd + d);
        float2 s[DK_MAX_CHUNKS];
        float4 o[DK_MAX_CHUNKS];
        float MM = -INFINITY;
#pragma unroll
        for (int c = 0; c < DK_MAX_CHUNKS; c++) {
            if (c >= nchunk) break;
            s[c] = __ldcg(ml + c);
            o[c] = __ldcg(po + (size_t)c * (hd / 4));
        }
#pragma unroll
        for (int c = 0; c < DK_MAX_CHUNKS; c++)
            if (c < nchunk) MM = fmaxf(MM, s[c].x);
        float tot = 0.f;
        float4 out = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int c = 0; c < DK_MAX_CHUNKS; c++) {
            if (c >= nchunk) break;
            float w = expf(s[c].x - MM);
            tot += s[c].y * w;
            out.x += o[c].x * w;
            out.y += o[c].y * w;
            out.z += o[c].z * w;
            out.w += o[c].w * w;
        }
        *(float4*)(xs + 4 * i) = make_float4(out.x / tot, out.y / tot, out.z / tot, out.w / tot);
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(DK_THREADS, DK_MIN_BLOCKS) decode_step(DModel m) {
    extern __shared__ __align__(16) float xs[];  // [width] the phase's input, then [dim] norm weights
    float* wn = xs + max(m.dim, max(m.hidden, m.nh * m.hd));
    __shared__ float bv[DK_WARPS];
    __shared__ int bi[DK_WARPS];
    __shared__ int last;
    // wn holds the norm weights; the staging buffers follow it (mega.rs sizes both).
    float* const after = wn + m.dim;
    // This block's and the next one's table entries: a block's fields are read many times per
    // phase, from shared memory rather than in dependent L2 round trips. The next entry is copied
    // during the first barrier of each block.
    __shared__ DLayer sl[2];
    stage_phase(m, m.layers, 0, stage_buf(m, after, 0));
    for (int i = 0; i < 7; i++) prefetch_all(m.layers[0].w[i], matrix_bytes(m, m.layers, i));
    if (threadIdx.x < 32) copy_layer(sl, m.layers, threadIdx.x);
    GRID_WAIT();
    unsigned arrivals = 0;
    int stamp = 0;
    STAMP();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int gw = blockIdx.x * DK_WARPS + warp, W = gridDim.x * DK_WARPS;
    int pos = m.meta[0], half = m.hd / 2, qd = m.nh * m.hd, kvd = m.nkv * m.hd;
    prefetch_all(m.layers[0].kc, (size_t)pos * kvd * 4);
    prefetch_all(m.layers[0].vc, (size_t)pos * kvd * 4);
    __syncthreads();
    for (int l = 0; l < m.n_layer; l++) {
        const DLayer* L = sl + (l & 1);
        // The next block (global, until its copy `ns` lands at the first barrier), or none.
        const DLayer* next = l + 1 < m.n_layer ? m.layers + l + 1 : nullptr;
        DLayer* ns = sl + ((l + 1) & 1);
        // q/k/v of RMSNorm(x), RoPE, cache write. Layer 0 builds x from the embedding itself.
        stage_phase(m, L, 1, stage_buf(m, after, 1));
        STAMP();
        if (l == 0) {
            int id = m.ids[0];
            if (id < 0 || id >= m.vocab) id = 0;  // a non-finite step before; the host reports it
            const u8* row = m.embed + (size_t)id * rb_any(m.t_embed, m.dim);
            for (int c = threadIdx.x; c < m.dim / 8; c += blockDim.x) {
                float v[8];
                dq8_any(m.t_embed, row, c, v);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    xs[c * 8 + i] = v[i];
                    if (blockIdx.x == 0) m.x[c * 8 + i] = v[i];
                }
            }
            __syncthreads();
            float ss = 0.f;
            for (int i = threadIdx.x; i < m.dim; i += blockDim.x) ss += xs[i] * xs[i];
            ss = block_sum(ss);
            float r = 1.0f / sqrtf(ss / (float)m.dim + m.eps);
            for (int i = threadIdx.x; i < m.dim; i += blockDim.x) xs[i] = xs[i] * r * L->attn_norm[i];
            __syncthreads();
        } else {
            stage_input(xs, wn, m.x, m.dim, L->attn_norm, m.eps);
        }
        STAMP();
        int pq = qd / 2, pk = kvd / 2;
        staged_wait();
        STAMP();
        int off = 0;
        bool open = m.stage > 0;
        for (int g = gw; g < pq + 2 * pk; g += W) {
            QkvPair pair = qkv_pair(g, pq, pk, m.hd, m.interleaved);
            int seg = pair.seg, r0 = pair.r0, r1 = pair.r1, j = pair.j;
            // The bias and the rotation, loaded before the dot products need them.
            const float* b = L->bias[seg];
            float b0 = b ? b[r0] : 0.f, b1 = b ? b[r1] : 0.f;
            float2 cs = seg < 2 ? *(const float2*)(m.rope + ((size_t)pos * half + j) * 2) : make_float2(1.f, 0.f);
            const u8* ws[2] = {L->w[seg], L->w[seg]};
            int rs[2] = {r0, r1};
            use_staged(m, phase_rows(m, L, 0, g), stage_buf(m, after, 0), off, open, ws, rs);
            float v[2];
            wdot_any<2>(L->ty[seg], ws, rs, xs, m.dim, v);
            float v0 = v[0], v1 = v[1];
            if (lane == 0) {
                if (b) {
                    v0 += b0;
                    v1 += b1;
                }
                if (seg < 2) {
                    float y0 = v0 * cs.x - v1 * cs.y, y1 = v1 * cs.x + v0 * cs.y;
                    v0 = y0;
                    v1 = y1;
                }
                float* y = seg == 0 ? m.q : (seg == 1 ? L->kc : L->vc) + (size_t)pos * kvd;
                y[r0] = v0;
                y[r1] = v1;
            }
        }
        STAMP();
        grid_barrier(m.bar, arrivals, [&] {
            if (next && threadIdx.x < 64) copy_layer(ns, next, threadIdx.x - 32);
            prefetch_part(m, next, 0, pos);
        });
        STAMP();
        attn_phase(m, L, pos);
        STAMP();
        grid_barrier(m.bar, arrivals, [&] { prefetch_part(m, next, 1, pos); });
        STAMP();
        // x += Wo · att
        stage_phase(m, L, 2, stage_buf(m, after, 0));
        STAMP();
        stage_attention(m, xs, pos);
        STAMP();
        staged_wait();
        STAMP();
        off = 0;
        open = m.stage > 0;
        for (int r = gw; r < m.dim; r += W) {
            const u8* ws[2] = {L->w[3], L->w[3]};
            int rs[2] = {r, r};
            use_staged(m, phase_rows(m, L, 1, r), stage_buf(m, after, 1), off, open, ws, rs);
            float v = wdot1(L->ty[3], ws[0], rs[0], xs, qd);
            if (lane == 0) m.x[r] = __ldcg(m.x + r) + v;
        }
        STAMP();
        grid_barrier(m.bar, arrivals, [&] { prefetch_part(m, next, 2, pos); });
        STAMP();
        // h = silu(gate · RMSNorm(x)) * (up · RMSNorm(x))
        stage_phase(m, L, 3, stage_buf(m, after, 1));
        STAMP();
        stage_input(xs, wn, m.x, m.dim, L->ffn_norm, m.eps);
        STAMP();
        staged_wait();
        STAMP();
        off = 0;
        open = m.stage > 0;
        for (int r = gw; r < m.hidden; r += W) {
            int rs[2] = {r, r};
            const u8* ws[2] = {L->w[4], L->w[5]};
            use_staged(m, phase_rows(m, L, 2, r), stage_buf(m, after, 0), off, open, ws, rs);
            float gu[2];
            wdot2(L->ty + 4, ws, rs, xs, m.dim, gu);
            float g = gu[0], u = gu[1];
            if (lane == 0) m.h[r] = g / (1.0f + expf(-g)) * u;
        }
        STAMP();
        grid_barrier(m.bar, arrivals, [&] { prefetch_part(m, next, 3, pos); });
        STAMP();
        // x += Wdown · h
        stage_phase(m, next ? ns : nullptr, 0, stage_buf(m, after, 0));
        STAMP();
        stage_input(xs, wn, m.h, m.hidden, nullptr, 0.f);
        STAMP();
        staged_wait();
        STAMP();
        off = 0;
        open = m.stage > 0;
        for (int r = gw; r < m.dim; r += W) {
            const u8* ws[2] = {L->w[6], L->w[6]};
            int rs[2] = {r, r};
            use_staged(m, phase_rows(m, L, 3, r), stage_buf(m, after, 1), off, open, ws, rs);
            float v = wdot1(L->ty[6], ws[0], rs[0], xs, m.hidden);
            if (lane == 0) m.x[r] = __ldcg(m.x + r) + v;
        }
        STAMP();
        grid_barrier(m.bar, arrivals, [&] { prefetch_part(m, next, 4, pos); });
        STAMP();
    }
    // The head and the argmax (the first maximum): per warp, per block, then the last block.
    stage_input(xs, wn, m.x, m.dim, m.norm, m.eps);
    float best = -INFINITY;
    int idx = 0x7fffffff;
    // DK_HEAD_ROWS rows at a time (r, r + W, ...; past the end: row r again, ignored).
    constexpr int HR = DK_HEAD_ROWS;
    for (int r = gw; r < m.vocab; r += HR * W) {
        const u8* ws[HR];
        int rs[HR];
#pragma unroll
        for (int i = 0; i < HR; i++) {
            ws[i] = m.out;
            rs[i] = r + i * W < m.vocab ? r + i * W : r;
        }
        float v[HR];
        wdot_any<HR>(m.t_out, ws, rs, xs, m.dim, v);
#pragma unroll
        for (int i = 0; i < HR; i++) {
            if (r + i * W >= m.vocab) break;
            if (lane == 0 && m.logits) m.logits[r + i * W] = v[i];
            take_max(v[i], r + i * W, best, idx);
        }
    }
    if (lane == 0) {
        bv[warp] = best;
        bi[warp] = idx;
    }
    __syncthreads();
    STAMP();
    if (threadIdx.x == 0) {
        for (int w = 1; w < DK_WARPS; w++) take_max(bv[w], bi[w], best, idx);
        m.best_v[blockIdx.x] = best;
        m.best_i[blockIdx.x] = idx;
        __threadfence();
        last = atomicAdd(&m.bar[1], 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) return;
    // Every block is past its last barrier: the counters can be reset for the next launch.
    __threadfence();
    for (int b = 0; b < (int)gridDim.x; b++) take_max(__ldcg(m.best_v + b), __ldcg(m.best_i + b), best, idx);
    m.ids[0] = idx;
    m.tokens[m.meta[1]] = idx;
    m.meta[0] = pos + 1;
    m.meta[1] += 1;
    m.bar[0] = 0;
    m.bar[1] = 0;
}
