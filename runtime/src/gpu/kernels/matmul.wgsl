// Batched, strided f32 matrix product C[b, m, n] = sum_k A[b, m, k] B[b, k, n], 16x16 tiles
// through workgroup memory. One workgroup per 16x16 block of C and batch entry (z).
// p = [M, N, K, nbatch, bsize[4], a bstride[4], b bstride[4], c bstride[4],
//      a_m, a_k, b_k, b_n, c_m, c_n]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let M = p[0];
    let N = p[1];
    let K = p[2];
    let row = wg.y * 16u + l.y;
    let col = wg.x * 16u + l.x;
    var rest = wg.z;
    var oa = 0u;
    var ob = 0u;
    var oc = 0u;
    for (var d = 3i; d >= 0; d--) {
        let k = u32(d);
        let size = p[4u + k];
        let coord = rest % size;
        rest = rest / size;
        oa += coord * p[8u + k];
        ob += coord * p[12u + k];
        oc += coord * p[16u + k];
    }
    let am = p[20];
    let ak = p[21];
    let bk = p[22];
    let bn = p[23];
    var acc = 0.0;
    for (var t = 0u; t < K; t += 16u) {
        let ka = t + l.x;
        var va = 0.0;
        if (row < M && ka < K) {
            va = a[oa + row * am + ka * ak];
        }
        ta[l.y][l.x] = va;
        let kb = t + l.y;
        var vb = 0.0;
        if (kb < K && col < N) {
            vb = b[ob + kb * bk + col * bn];
        }
        tb[l.y][l.x] = vb;
        workgroupBarrier();
        for (var k = 0u; k < 16u; k++) {
            acc += ta[l.y][k] * tb[k][l.x];
        }
        workgroupBarrier();
    }
    if (row < M && col < N) {
        c[oc + row * p[24] + col * p[25]] = acc;
    }
}
