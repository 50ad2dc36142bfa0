// Max / average pooling, NCDHW (2D as D = 1, 1D as D = H = 1), f32 or (max only) uint8/int8.
// f32: one thread per output element; 8-bit (packed 4 per u32): one thread per output word.
// p = [n_out, N, C, D, H, W, OD, OH, OW, KD, KH, KW, sd, sh, sw, dd, dh, dw, pd, ph, pw,
//      kind (0 max, 1 sum, 2 average excluding padding, 3 average including padding),
//      ld, lh, lw (padded extent of each axis: taps at or past it are not counted by kind 3),
//      element type (0 f32, 1 u8, 2 i8)]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

// Input element `i` as f32 (8-bit values are exact in f32).
fn load(i: u32) -> f32 {
    let t = p[25];
    if (t == 0u) {
        return bitcast<f32>(x[i]);
    }
    let byte = (x[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    if (t == 2u) {
        return f32(bitcast<i32>(byte << 24u) >> 24u);
    }
    return f32(byte);
}

// Taps k < K of a window starting at `start` (padded coordinates) with `start + k * d < limit`.
fn taps(start: u32, K: u32, d: u32, limit: u32) -> u32 {
    var n = 0u;
    for (var k = 0u; k < K; k++) {
        if (start + k * d < limit) {
            n += 1u;
        }
    }
    return n;
}

// Output element `i`.
fn pooled(i: u32) -> f32 {
    let D = p[3];
    let H = p[4];
    let W = p[5];
    let OD = p[6];
    let OH = p[7];
    let OW = p[8];
    let KD = p[9];
    let KH = p[10];
    let KW = p[11];
    let kind = p[21];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let oz = (i / (OW * OH)) % OD;
    let nc = i / (OW * OH * OD);
    let base = nc * D * H * W;
    var acc = 0.0;
    if (kind == 0u) {
        acc = -3.4028235e38;
    }
    var count = 0u;
    for (var kz = 0u; kz < KD; kz++) {
        let iz = i32(oz * p[12] + kz * p[15]) - i32(p[18]);
        if (iz < 0 || iz >= i32(D)) {
            continue;
        }
        for (var ky = 0u; ky < KH; ky++) {
            let iy = i32(oy * p[13] + ky * p[16]) - i32(p[19]);
            if (iy < 0 || iy >= i32(H)) {
                continue;
            }
            let row = base + (u32(iz) * H + u32(iy)) * W;
            for (var kx = 0u; kx < KW; kx++) {
                let ix = i32(ox * p[14] + kx * p[17]) - i32(p[20]);
                if (ix < 0 || ix >= i32(W)) {
                    continue;
                }
                let v = load(row + u32(ix));
                if (kind == 0u) {
                    acc = max(acc, v);
                } else {
                    acc += v;
                }
                count += 1u;
            }
        }
    }
    if (kind == 2u) {
        acc = acc / f32(max(count, 1u));
    } else if (kind == 3u) {
        acc = acc / f32(taps(oz * p[12], KD, p[15], p[22]) * taps(oy * p[13], KH, p[16], p[23])
            * taps(ox * p[14], KW, p[17], p[24]));
    }
    return acc;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let n = p[0];
    if (p[25] == 0u) {
        if (t < n) {
            y[t] = bitcast<u32>(pooled(t));
        }
        return;
    }
    let first = t * 4u;
    if (first >= n) {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        if (first + j < n) {
            word |= (bitcast<u32>(i32(pooled(first + j))) & 0xffu) << (j * 8u);
        }
    }
    y[t] = word;
}
