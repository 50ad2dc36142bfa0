// Numeric casts between uint8, int8, i32 and f32 with Rust's `as` semantics (tract's Cast):
// integers widen or wrap, floats to integers truncate and saturate (NaN to 0).
// 8-bit outputs are packed 4 per u32, one thread per output word; otherwise one per element.
// p = [n elements, x kind, y kind]   (kinds: 0 u8, 1 i8, 2 i32, 3 f32)
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

fn byte_at(i: u32) -> u32 {
    return (x[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
}

// The value as i32 (integer inputs) or the bits of f32 (float input).
fn as_i32(i: u32) -> i32 {
    let k = p[1];
    if (k == 0u) {
        return i32(byte_at(i));
    }
    if (k == 1u) {
        return bitcast<i32>(byte_at(i) << 24u) >> 24u;
    }
    if (k == 2u) {
        return bitcast<i32>(x[i]);
    }
    let f = bitcast<f32>(x[i]);
    if (f != f) {
        return 0;
    }
    return i32(clamp(f, -2147483648.0, 2147483520.0));
}

fn as_f32(i: u32) -> f32 {
    if (p[1] == 3u) {
        return bitcast<f32>(x[i]);
    }
    return f32(as_i32(i));
}

fn to_byte(i: u32, lo: f32, hi: f32) -> u32 {
    if (p[1] == 3u) {
        let f = bitcast<f32>(x[i]);
        if (f != f) {
            return 0u;
        }
        return bitcast<u32>(i32(clamp(trunc(f), lo, hi))) & 0xffu;
    }
    return bitcast<u32>(as_i32(i)) & 0xffu;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let n = p[0];
    let yk = p[2];
    if (yk >= 2u) {
        if (t < n) {
            if (yk == 2u) {
                y[t] = bitcast<u32>(as_i32(t));
            } else {
                y[t] = bitcast<u32>(as_f32(t));
            }
        }
        return;
    }
    if (t * 4u >= n) {
        return;
    }
    var lo = -128.0;
    var hi = 127.0;
    if (yk == 0u) {
        lo = 0.0;
        hi = 255.0;
    }
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let e = t * 4u + j;
        if (e >= n) {
            break;
        }
        word |= to_byte(e, lo, hi) << (8u * j);
    }
    y[t] = word;
}
