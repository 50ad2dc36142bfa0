// An 8-bit lookup table (tract's LookupTable: an element-wise function of int8/uint8 values
// folded into 256 bytes): y = table[x], 4 bytes per u32, one thread per word.
// p = [n elements, table packed 4 bytes per word (64 words)]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t * 4u >= p[0]) {
        return;
    }
    let w = x[t];
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let b = (w >> (8u * j)) & 0xffu;
        let v = (p[1u + (b >> 2u)] >> ((b & 3u) * 8u)) & 0xffu;
        word |= v << (8u * j);
    }
    y[t] = word;
}
