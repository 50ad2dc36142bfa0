// QuantizeLinear and DequantizeLinear with one scale and zero point (per-axis parameters are
// rewritten by the importer into element-wise float ops and a cast).
// Quantize (mode 0): y = saturate(round_half_even(x * inv_scale) + zero_point), x f32 or i32,
//   y uint8 or int8 packed 4 per u32: one thread per output word.
// Dequantize (mode 1): y = f32(x - zero_point) * scale, x uint8/int8 (packed) or i32, y f32:
//   one thread per element.
// p = [n elements, mode, x kind (0 u8, 1 i8, 2 i32, 3 f32), y kind (0 u8, 1 i8, 3 f32),
//      scale bits, zero point (i32 bits)]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

fn load(i: u32) -> i32 {
    let kind = p[2];
    if (kind == 2u) {
        return bitcast<i32>(x[i]);
    }
    let b = (x[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    if (kind == 1u) {
        return (bitcast<i32>(b << 24u)) >> 24u;
    }
    return i32(b);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let n = p[0];
    let scale = bitcast<f32>(p[4]);
    let zp = bitcast<i32>(p[5]);
    if (p[1] == 1u) {
        if (t < n) {
            y[t] = bitcast<u32>(f32(load(t) - zp) * scale);
        }
        return;
    }
    if (t * 4u >= n) {
        return;
    }
    var lo = -128.0;
    var hi = 127.0;
    if (p[3] == 0u) {
        lo = 0.0;
        hi = 255.0;
    }
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let e = t * 4u + j;
        if (e >= n) {
            break;
        }
        var v: f32;
        if (p[2] == 3u) {
            v = bitcast<f32>(x[e]);
        } else {
            v = f32(bitcast<i32>(x[e]));
        }
        let q = i32(clamp(round(v * scale) + f32(zp), lo, hi));
        word |= (bitcast<u32>(q) & 0xffu) << (8u * j);
    }
    y[t] = word;
}
