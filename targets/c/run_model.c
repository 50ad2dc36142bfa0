/*
 * Example: run an ONNX model through the fedge C ABI.
 *
 *   run_model MODEL.onnx INPUT.bin OUTPUT.bin d0 d1 ...
 *
 * INPUT.bin holds the float32 input (little-endian) of shape d0 x d1 x ...; the first output is
 * written as raw float32 to OUTPUT.bin. Exit status 0 on success, 1 with a message otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedge.h"

static int die(const char *what, fedge_result r) {
    char text[256], detail[512];
    fedge_result_text(r, text, sizeof text, NULL);
    fedge_last_error(detail, sizeof detail, NULL);
    fprintf(stderr, "%s: %s (%u): %s\n", what, text, (unsigned)r, detail);
    return 1;
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.onnx INPUT.bin OUTPUT.bin d0 [d1 ...]\n", argv[0]);
        return 2;
    }
    fedge_model *model = NULL;
    fedge_result r = fedge_model_load_path(argv[1], 1, &model);
    if (r != FEDGE_OK) return die("load", r);

    size_t n_in = 0, n_out = 0;
    fedge_model_counts(model, &n_in, &n_out);
    char name[128];
    fedge_tensor info;
    r = fedge_model_input(model, 0, &info, name, sizeof name);
    if (r != FEDGE_OK) { fedge_model_free(model); return die("input", r); }
    printf("model: %zu input(s), %zu output(s); input 0 '%s' rank %u\n", n_in, n_out, name, info.rank);

    size_t in_len = 0;
    unsigned char *in_data = read_file(argv[2], &in_len);
    if (!in_data) { fedge_model_free(model); fprintf(stderr, "cannot read %s\n", argv[2]); return 1; }

    fedge_tensor input;
    memset(&input, 0, sizeof input);
    input.dtype = FEDGE_DTYPE_F32;
    input.rank = (uint32_t)(argc - 4);
    for (uint32_t i = 0; i < input.rank && i < FEDGE_MAX_RANK; i++) input.shape[i] = atoll(argv[4 + i]);
    input.data = in_data;
    input.byte_len = in_len;

    size_t cap = 1 << 20;
    fedge_tensor *outputs = calloc(n_out, sizeof *outputs);
    for (size_t k = 0; k < n_out; k++) { outputs[k].data = malloc(cap); outputs[k].byte_len = cap; }

    r = fedge_model_run(model, &input, 1, outputs, n_out);
    int status = 0;
    if (r != FEDGE_OK) {
        status = die("run", r);
    } else {
        printf("output 0: rank %u, %zu bytes\n", outputs[0].rank, outputs[0].byte_len);
        FILE *f = fopen(argv[3], "wb");
        if (!f || fwrite(outputs[0].data, 1, outputs[0].byte_len, f) != outputs[0].byte_len) status = 1;
        if (f) fclose(f);
    }
    for (size_t k = 0; k < n_out; k++) free(outputs[k].data);
    free(outputs);
    free(in_data);
    fedge_model_free(model);
    return status;
}
