/*
 * C tests of the fedge ABI: error paths (NULL, wrong sizes, bad handles), bundle verification,
 * envelopes and telemetry. Run by targets/ffi/tests/c_abi.rs under valgrind.
 *
 *   test_ffi MODEL.onnx BUNDLE OPERATOR.pub(32 raw bytes)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedge.h"

static int failures = 0;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void test_errors(const char *model_path) {
    fedge_model *m = NULL;
    char buf[256];
    size_t n = 0;

    /* NULL everywhere. */
    CHECK(fedge_model_load_path(NULL, 1, &m) == FEDGE_ERR_NULL);
    CHECK(fedge_model_load_path(model_path, 1, NULL) == FEDGE_ERR_NULL);
    CHECK(fedge_model_load_bytes(NULL, 10, 1, &m) == FEDGE_ERR_NULL);
    CHECK(fedge_model_counts(NULL, &n, &n) == FEDGE_ERR_NULL);
    CHECK(fedge_model_run(NULL, NULL, 0, NULL, 0) == FEDGE_ERR_NULL);
    CHECK(fedge_last_error(NULL, 10, NULL) == FEDGE_ERR_NULL);
    CHECK(fedge_result_text(FEDGE_OK, buf, 0, NULL) == FEDGE_ERR_BUFFER_TOO_SMALL);
    CHECK(m == NULL); /* out-params untouched on failure */

    /* A missing file and garbage bytes. */
    CHECK(fedge_model_load_path("/nonexistent/model.onnx", 1, &m) == FEDGE_ERR_IO);
    CHECK(fedge_last_error(buf, sizeof buf, &n) == FEDGE_OK && n > 0);
    unsigned char junk[64];
    memset(junk, 0x5a, sizeof junk);
    CHECK(fedge_model_load_bytes(junk, sizeof junk, 1, &m) == FEDGE_ERR_MODEL);
    CHECK(m == NULL);

    /* A real model with wrong inputs. */
    CHECK(fedge_model_load_path(model_path, 1, &m) == FEDGE_OK);
    size_t n_in = 0, n_out = 0;
    CHECK(fedge_model_counts(m, &n_in, &n_out) == FEDGE_OK && n_in == 1 && n_out >= 1);
    fedge_tensor info;
    char small[1];
    CHECK(fedge_model_input(m, 0, &info, small, sizeof small) == FEDGE_ERR_BUFFER_TOO_SMALL);
    CHECK(fedge_model_input(m, 7, &info, buf, sizeof buf) == FEDGE_ERR_INVALID_ARGUMENT);
    CHECK(fedge_model_input(m, 0, &info, buf, sizeof buf) == FEDGE_OK);
    CHECK(info.dtype == FEDGE_DTYPE_F32 && info.rank == 4);

    /* ppocr_cls takes x: float32[batch, 3, 48, 192]. */
    fedge_tensor in = info;
    in.shape[0] = 1;
    in.shape[1] = 3;
    in.shape[2] = 48;
    in.shape[3] = 192;
    in.byte_len = 3 * 48 * 192 * sizeof(float);
    float *data = calloc(3 * 48 * 192, sizeof(float));
    in.data = (uint8_t *)data;
    float out_small[1];
    fedge_tensor out;
    memset(&out, 0, sizeof out);
    out.data = (uint8_t *)out_small;
    out.byte_len = sizeof out_small;

    fedge_tensor wrong = in;
    wrong.byte_len -= 4; /* size does not match the shape */
    CHECK(fedge_model_run(m, &wrong, 1, &out, 1) == FEDGE_ERR_INPUT);
    wrong = in;
    wrong.dtype = 99;
    CHECK(fedge_model_run(m, &wrong, 1, &out, 1) == FEDGE_ERR_INVALID_ARGUMENT);
    wrong = in;
    wrong.rank = 9;
    CHECK(fedge_model_run(m, &wrong, 1, &out, 1) == FEDGE_ERR_INVALID_ARGUMENT);
    CHECK(fedge_model_run(m, &in, 0, &out, 1) == FEDGE_ERR_INPUT);
    CHECK(fedge_model_run(m, &in, 1, &out, 0) == FEDGE_ERR_INVALID_ARGUMENT);
    CHECK(fedge_model_run(m, &in, 1, &out, 1) == FEDGE_ERR_BUFFER_TOO_SMALL);
    CHECK(out.byte_len == sizeof out_small); /* untouched */
    float out_big[4096];
    out.data = (uint8_t *)out_big;
    out.byte_len = sizeof out_big;
    CHECK(fedge_model_run(m, &in, 1, &out, 1) == FEDGE_OK);
    CHECK(out.dtype == FEDGE_DTYPE_F32 && out.rank >= 1 && out.byte_len > 0);

    /* A handle of the wrong type. */
    fedge_signer *s = NULL;
    unsigned char doc[128];
    size_t doc_len = 0;
    CHECK(fedge_signer_generate(doc, sizeof doc, &doc_len, &s) == FEDGE_OK);
    CHECK(fedge_model_counts((const fedge_model *)s, &n_in, &n_out) == FEDGE_ERR_BAD_HANDLE);
    uint8_t key[32];
    CHECK(fedge_signer_public_key((const fedge_signer *)m, &key) == FEDGE_ERR_BAD_HANDLE);
    unsigned long long garbage[8] = {0};
    CHECK(fedge_model_counts((const fedge_model *)garbage, &n_in, &n_out) == FEDGE_ERR_BAD_HANDLE);
    fedge_signer_free(s);
    fedge_model_free(m);
    fedge_model_free(NULL);
    fedge_signer_free(NULL);
    free(data);
}

static void test_envelopes(void) {
    unsigned char doc[128];
    size_t doc_len = 0;
    fedge_signer *s = NULL;
    CHECK(fedge_signer_generate(doc, sizeof doc, &doc_len, &s) == FEDGE_OK);
    fedge_signer *s2 = NULL;
    CHECK(fedge_signer_from_pkcs8(doc, doc_len, &s2) == FEDGE_OK);
    uint8_t key[32], key2[32];
    CHECK(fedge_signer_public_key(s, &key) == FEDGE_OK);
    CHECK(fedge_signer_public_key(s2, &key2) == FEDGE_OK);
    CHECK(memcmp(key, key2, 32) == 0);
    CHECK(fedge_signer_from_pkcs8(doc, 10, &s2) == FEDGE_ERR_KEY);

    fedge_telemetry t;
    memset(&t, 0, sizeof t);
    t.uptime_s = 42;
    t.inferences = 1000;
    t.p99_us = 1234;
    unsigned char payload[128];
    size_t payload_len = 0;
    CHECK(fedge_telemetry_encode(&t, payload, 2, &payload_len) == FEDGE_ERR_BUFFER_TOO_SMALL);
    CHECK(fedge_telemetry_encode(&t, payload, sizeof payload, &payload_len) == FEDGE_OK);

    unsigned char wire[256];
    size_t wire_len = 0;
    CHECK(fedge_envelope_seal(s, FEDGE_KIND_TELEMETRY, "sensor-7", 5, 0, payload, payload_len, wire, 10, &wire_len) ==
          FEDGE_ERR_BUFFER_TOO_SMALL);
    CHECK(fedge_envelope_seal(s, 99, "sensor-7", 5, 0, payload, payload_len, wire, sizeof wire, &wire_len) ==
          FEDGE_ERR_INVALID_ARGUMENT);
    CHECK(fedge_envelope_seal(s, FEDGE_KIND_TELEMETRY, "bad/id", 5, 0, payload, payload_len, wire, sizeof wire,
                              &wire_len) == FEDGE_ERR_INVALID_ARGUMENT);
    CHECK(fedge_envelope_seal(s, FEDGE_KIND_TELEMETRY, "sensor-7", 5, 0, payload, payload_len, wire, sizeof wire,
                              &wire_len) == FEDGE_OK);

    fedge_envelope_view v;
    CHECK(fedge_envelope_open(wire, wire_len, wire_len - 1, &key, &v) == FEDGE_ERR_OVERSIZE);
    CHECK(fedge_envelope_open(wire, wire_len, sizeof wire, &key, &v) == FEDGE_OK);
    CHECK(v.kind == FEDGE_KIND_TELEMETRY && v.seq == 5 && v.sender_len == 8 && memcmp(v.sender, "sensor-7", 8) == 0);
    fedge_telemetry back;
    CHECK(fedge_telemetry_decode(v.payload, v.payload_len, &back) == FEDGE_OK);
    CHECK(back.uptime_s == 42 && back.inferences == 1000 && back.p99_us == 1234);
    CHECK(fedge_telemetry_decode(v.payload, v.payload_len - 1, &back) == FEDGE_ERR_MALFORMED);

    wire[wire_len / 2] ^= 1;
    CHECK(fedge_envelope_open(wire, wire_len, sizeof wire, &key, &v) != FEDGE_OK);
    wire[wire_len / 2] ^= 1;
    key[0] ^= 1;
    CHECK(fedge_envelope_open(wire, wire_len, sizeof wire, &key, &v) == FEDGE_ERR_BAD_SIGNATURE);
    CHECK(fedge_envelope_open(NULL, wire_len, sizeof wire, &key, &v) == FEDGE_ERR_NULL);
    CHECK(fedge_envelope_open(wire, wire_len, sizeof wire, NULL, &v) == FEDGE_ERR_NULL);
    fedge_signer_free(s);
    fedge_signer_free(s2);
}

static void test_bundle(const char *bundle_path, const char *pub_path) {
    size_t len = 0, key_len = 0;
    unsigned char *b = read_file(bundle_path, &len);
    unsigned char *k = read_file(pub_path, &key_len);
    CHECK(b != NULL && k != NULL && key_len == 32);
    if (!b || !k || key_len != 32) { free(b); free(k); return; }
    uint8_t key[32];
    memcpy(key, k, 32);
    fedge_bundle_info info;
    CHECK(fedge_bundle_verify(b, len, len - 1, &key, &info) == FEDGE_ERR_OVERSIZE);
    CHECK(fedge_bundle_verify(b, len, len, &key, &info) == FEDGE_OK);
    CHECK(info.version == 3 && strcmp((const char *)info.name, "ppocr_cls") == 0 && info.model_len > 1000);
    /* The model inside loads. */
    fedge_model *m = NULL;
    CHECK(fedge_model_load_bytes(info.model, info.model_len, 1, &m) == FEDGE_OK);
    fedge_model_free(m);
    /* One flipped byte anywhere in the model is caught. */
    b[len / 2] ^= 0x01;
    CHECK(fedge_bundle_verify(b, len, len, &key, &info) != FEDGE_OK);
    b[len / 2] ^= 0x01;
    /* A wrong signer. */
    key[31] ^= 0x80;
    CHECK(fedge_bundle_verify(b, len, len, &key, &info) == FEDGE_ERR_BAD_SIGNATURE);
    /* Truncated. */
    key[31] ^= 0x80;
    CHECK(fedge_bundle_verify(b, len - 100, len, &key, &info) != FEDGE_OK);
    free(b);
    free(k);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.onnx BUNDLE OPERATOR.pub\n", argv[0]);
        return 2;
    }
    printf("fedge %s\n", fedge_version());
    test_errors(argv[1]);
    test_envelopes();
    test_bundle(argv[2], argv[3]);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C checks passed\n");
    return 0;
}
