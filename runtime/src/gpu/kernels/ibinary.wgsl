// c = a op b with numpy broadcasting on integers: uint8, int8 (packed 4 per u32), uint16,
// int16 (2 per u32), i32, u32.
// Add, Sub and Mul wrap at the type's width, Div truncates toward zero, Max/Min compare in the
// type's own order (tract's integer semantics). One thread per output word (4, 2 or 1
// elements, so no two threads write the same word).
// p = [n, op, kind, shape[6], a strides[6], b strides[6]]
//     (kind: 0 u8, 1 i8, 2 i32, 3 u32, 4 u16, 5 i16;
// op codes as binary.wgsl, Pow excluded)
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<u32>;

// Element `i` of a (or b) as i32: bytes and halves zero- or sign-extended, words as they are.
fn load_a(i: u32) -> i32 {
    let k = p[2];
    if (k == 2u || k == 3u) {
        return bitcast<i32>(a[i]);
    }
    if (k >= 4u) {
        let half = (a[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
        if (k == 5u) {
            return bitcast<i32>(half << 16u) >> 16u;
        }
        return i32(half);
    }
    let byte = (a[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    if (k == 1u) {
        return bitcast<i32>(byte << 24u) >> 24u;
    }
    return i32(byte);
}

fn load_b(i: u32) -> i32 {
    let k = p[2];
    if (k == 2u || k == 3u) {
        return bitcast<i32>(b[i]);
    }
    if (k >= 4u) {
        let half = (b[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
        if (k == 5u) {
            return bitcast<i32>(half << 16u) >> 16u;
        }
        return i32(half);
    }
    let byte = (b[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    if (k == 1u) {
        return bitcast<i32>(byte << 24u) >> 24u;
    }
    return i32(byte);
}

// Output element `i` as the bits to store (the low byte or half for narrow kinds).
fn element(i: u32) -> u32 {
    var rest = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = 5i; d >= 0; d--) {
        let k = u32(d);
        let size = p[3u + k];
        let coord = rest % size;
        rest = rest / size;
        ia += coord * p[9u + k];
        ib += coord * p[15u + k];
    }
    let x = load_a(ia);
    let y = load_b(ib);
    if (p[2] == 3u) {
        let ux = bitcast<u32>(x);
        let uy = bitcast<u32>(y);
        switch p[1] {
            case 0u: { return ux + uy; }
            case 1u: { return ux - uy; }
            case 2u: { return ux * uy; }
            case 3u: { return ux / uy; }
            case 4u: { return max(ux, uy); }
            case 5u: { return min(ux, uy); }
            case 7u: { return uy - ux; }
            default: { return 0u; }
        }
    }
    var r = 0i;
    switch p[1] {
        case 0u: { r = x + y; }
        case 1u: { r = x - y; }
        case 2u: { r = x * y; }
        case 3u: { r = x / y; }
        case 4u: { r = max(x, y); }
        case 5u: { r = min(x, y); }
        case 7u: { r = y - x; }
        default: {}
    }
    return bitcast<u32>(r);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let n = p[0];
    let k = p[2];
    if (k == 2u || k == 3u) {
        if (t < n) {
            c[t] = element(t);
        }
        return;
    }
    // Elements per word and their width in bits.
    var per = 4u;
    var bits = 8u;
    if (k >= 4u) {
        per = 2u;
        bits = 16u;
    }
    let mask = (1u << bits) - 1u;
    let first = t * per;
    if (first >= n) {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < per; j++) {
        if (first + j < n) {
            word |= (element(first + j) & mask) << (j * bits);
        }
    }
    c[t] = word;
}
