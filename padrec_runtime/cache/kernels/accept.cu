// The accept step of a greedy fused-chain round, one block per row (padrec_runtime/cache/rounds.py loads it):
// the target's grammar-masked pick at every verify position (first maximum wins, as numpy's argmax), the
// accepted count, the bonus token and from them the next chain call's inputs, written straight into that
// call's bound input buffers, each row's tokens from its column col0 on. `accept_reference` in rounds.py is
// the same computation in array ops (the GPU test compares the two). A pick's item slot is the slot of the trie
// node it leads to from its position's table row (node_slot), so the slot needs no token-id rule (any layout).
extern "C" __global__ void padrec_accept(
        const float* logits, long long row_stride, long long pos_stride, const bool* mask,
        const long long* tokens, const long long* rows, const long long* left, const unsigned short* banned,
        const long long* path, const bool* ends, const long long* next_node, const long long* row_of,
        const long long* is_leaf, const long long* node_slot, const int* col0, int T1, int V, int D, int n_ban,
        int P, int* out_ids, int* out_slot, int* out_last, int* out_node, int* out_left, unsigned short* out_banned) {
    extern __shared__ int picks[];  // (T1,)
    __shared__ int s_acc;
    __shared__ long long s_reached;
    const unsigned short NEG_INF = 0xFC00;  // float16 -inf
    const long long b = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int m = warp; m < T1; m += warps) {  // one warp per verify position
        const float* x = logits + b * row_stride + m * pos_stride;
        const bool* ok = mask + (b * T1 + m) * V;
        float best = __int_as_float(0xff800000);
        int arg = V;
        for (int v = lane; v < V; v += 32) {
            float val = ok[v] ? x[v] : __int_as_float(0xff800000);
            if (val > best || (val == best && v < arg)) { best = val; arg = v; }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float ob = __shfl_down_sync(0xffffffffu, best, off);
            int oa = __shfl_down_sync(0xffffffffu, arg, off);
            if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
        }
        if (lane == 0) picks[m] = arg;
    }
    __syncthreads();
    const int K = T1 - 1;
    if (threadIdx.x == 0) {
        int acc = 0;
        while (acc < K && picks[acc] == tokens[b * K + acc]) acc++;
        long long reached = next_node[rows[b * T1 + acc] * V + picks[acc]];
        s_acc = acc;
        s_reached = reached;
        out_last[b] = col0[b] + acc;
        out_node[b] = (int)row_of[reached];
        out_left[b] = (int)(left[b * T1 + acc] - is_leaf[reached]);
    }
    __syncthreads();
    const long long at = b * T1 + s_acc;
    for (int j = threadIdx.x; j < n_ban; j += blockDim.x) out_banned[b * n_ban + j] = banned[at * n_ban + j];
    for (int m = threadIdx.x; m < T1; m += blockDim.x) {
        out_ids[b * P + col0[b] + m] = picks[m];
        out_slot[b * P + col0[b] + m] = (int)node_slot[next_node[rows[b * T1 + m] * V + picks[m]]];
    }
    __syncthreads();
    if (threadIdx.x == 0 && is_leaf[s_reached]) {  // the bonus token completes an item
        for (int d = 0; d < D; d++)  // the item's path from the root (D: the longest item's tokens)
            if (ends[at * D + d]) out_banned[b * n_ban + path[at * D + d]] = NEG_INF;
        out_banned[b * n_ban + s_reached] = NEG_INF;
    }
}
