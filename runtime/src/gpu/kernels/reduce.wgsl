// Reduction of f32 over any set of axes (the output keeps them as size-1 axes), one thread per
// output element. ops: 0 sum, 1 max, 2 min, 3 product, 4 mean of squares.
// p = [n_out, op, reduced count, out shape[6] @3, out strides in x[6] @9,
//      reduced shape[6] @15, reduced strides in x[6] @21]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    var rest = i;
    var base = 0u;
    for (var d = 5i; d >= 0; d--) {
        let k = u32(d);
        base += (rest % p[3u + k]) * p[9u + k];
        rest = rest / p[3u + k];
    }
    let op = p[1];
    let count = p[2];
    // Max and min start from the first element (offset `base`).
    var acc = 0.0;
    if (op == 1u || op == 2u) {
        acc = x[base];
    } else if (op == 3u) {
        acc = 1.0;
    }
    for (var r = 0u; r < count; r++) {
        var rr = r;
        var off = base;
        for (var d = 5i; d >= 0; d--) {
            let k = u32(d);
            off += (rr % p[15u + k]) * p[21u + k];
            rr = rr / p[15u + k];
        }
        let v = x[off];
        if (op == 0u) {
            acc += v;
        } else if (op == 1u) {
            acc = max(acc, v);
        } else if (op == 2u) {
            acc = min(acc, v);
        } else if (op == 3u) {
            acc *= v;
        } else {
            acc += v * v;
        }
    }
    if (op == 4u) {
        acc = acc / f32(count);
    }
    y[i] = acc;
}
