// Packs the input of a quantized convolution as im2col rows of 4 bytes per u32 (zero padded
// along k), in the signed domain like pack_i8.wgsl (uint8 values are flipped: x ^ 0x80).
// One row per (n, group, oy, ox); k runs over (ci, ky, kx) in the kernel's OIHW order. Taps in
// the padding hold the input zero point, so they add nothing once zero points are folded in.
// NCHW data (1D as H = 1).
// p = [words, K, K4, N, C, H, W, OH, OW, KH, KW, sh, sw, dh, dw, ph, pw, groups, unsigned,
//      pad byte]
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
    let K = p[1];
    let K4 = p[2];
    let C = p[4];
    let H = p[5];
    let W = p[6];
    let OH = p[7];
    let OW = p[8];
    let KH = p[9];
    let KW = p[10];
    let G = p[17];
    let k4 = w % K4;
    let row = w / K4;
    let ox = row % OW;
    let oy = (row / OW) % OH;
    let g = (row / (OW * OH)) % G;
    let n = row / (OW * OH * G);
    let cig = C / G;
    let flip = select(0u, 0x80u, p[18] != 0u);
    let pad = p[19];
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let k = k4 * 4u + j;
        if (k >= K) {
            break;
        }
        let kx = k % KW;
        let ky = (k / KW) % KH;
        let ci = k / (KW * KH);
        let iy = i32(oy * p[11] + ky * p[13]) - i32(p[15]);
        let ix = i32(ox * p[12] + kx * p[14]) - i32(p[16]);
        var b = pad;
        if (iy >= 0 && iy < i32(H) && ix >= 0 && ix < i32(W)) {
            b = byte_at(((n * C + g * cig + ci) * H + u32(iy)) * W + u32(ix));
        }
        word |= ((b ^ flip) & 0xffu) << (8u * j);
    }
    y[w] = word;
}
