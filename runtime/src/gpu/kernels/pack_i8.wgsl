// Packs an int8/uint8 operand of a quantized matrix product into rows of 4 bytes per u32 along
// k (zero padded), in the signed domain (uint8 values are shifted by -128: x ^ 0x80).
// p = [words, rows, K, K4, offset, row stride, k stride, unsigned, rank,
//      bsize[4], bstride[4]]   (strides in elements)
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

fn byte_at(i: u32) -> u32 {
    return (x[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = gid.x + gid.y * nwg.x * 64u;
    if (w >= p[0]) {
        return;
    }
    let rows = p[1];
    let K = p[2];
    let K4 = p[3];
    let k4 = w % K4;
    let t = w / K4;
    let r = t % rows;
    var rest = t / rows;
    var base = p[4] + r * p[5];
    for (var d = 3i; d >= 0; d--) {
        let k = u32(d);
        let size = p[9u + k];
        let coord = rest % size;
        rest = rest / size;
        base += coord * p[13u + k];
    }
    let flip = select(0u, 0x80u, p[7] != 0u);
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let k = k4 * 4u + j;
        if (k < K) {
            word |= ((byte_at(base + k * p[6]) ^ flip) & 0xffu) << (8u * j);
        }
    }
    y[w] = word;
}
