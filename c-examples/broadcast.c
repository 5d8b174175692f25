/*
 * Broadcast across a local job: the root fills a buffer with values known in closed form,
 * every other rank fills its buffer with a sentinel, and each rank checks every element after
 * the broadcast.
 *
 *   usage: broadcast [world-size]      (default 4)
 *
 * 1. blocking float32 broadcast from the last rank (a root other than 0) over a buffer larger
 *    than one pipeline chunk: element i is i % 65536 + 0.5;
 * 2. non-blocking uint8 broadcast from rank 0, polled with mr_test: element i is
 *    (i * 7 + 3) % 256;
 * 3. a barrier, and a zero-length broadcast (valid with a NULL buffer).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "local_job.h"

#define F32_COUNT ((size_t)(3u << 19) + 1u)
#define U8_COUNT ((size_t)100003)

static float f32_value(size_t i)
{
    return (float)(i % 65536) + 0.5f;
}

static uint8_t u8_value(size_t i)
{
    return (uint8_t)((i * 7 + 3) % 256);
}

static int check_f32_from_last(mr_comm *comm, int rank, int nranks)
{
    const int root = nranks - 1;
    float *buf = malloc(F32_COUNT * sizeof *buf);
    if (buf == NULL)
        return 1;
    for (size_t i = 0; i < F32_COUNT; i++)
        buf[i] = rank == root ? f32_value(i) : -1.0f;

    mr_result r = mr_broadcast(comm, buf, F32_COUNT, MR_FLOAT32, root);
    int bad = 0;
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_broadcast(float32, root %d): %s: %s\n", rank, root,
                mr_result_string(r), mr_last_error());
        bad = 1;
    }
    for (size_t i = 0; r == MR_OK && i < F32_COUNT; i++) {
        if (buf[i] != f32_value(i)) {
            fprintf(stderr, "rank %d: float32 broadcast: element %zu is %.1f, want %.1f\n",
                    rank, i, (double)buf[i], (double)f32_value(i));
            bad = 1;
            break;
        }
    }
    free(buf);
    return bad;
}

static int check_u8_nonblocking(mr_comm *comm, int rank)
{
    uint8_t *buf = malloc(U8_COUNT);
    if (buf == NULL)
        return 1;
    for (size_t i = 0; i < U8_COUNT; i++)
        buf[i] = rank == 0 ? u8_value(i) : 0;

    mr_request *req = NULL;
    mr_result r = mr_ibroadcast(comm, buf, U8_COUNT, MR_UINT8, 0, &req);
    if (r == MR_OK) {
        int done = 0;
        while (!done && r == MR_OK)
            r = mr_test(req, &done);
        /* mr_wait frees the request and returns the op's result, also after mr_test failed. */
        mr_result waited = mr_wait(req);
        if (r == MR_OK)
            r = waited;
    }
    int bad = 0;
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_ibroadcast(uint8, root 0): %s: %s\n", rank,
                mr_result_string(r), mr_last_error());
        bad = 1;
    }
    for (size_t i = 0; r == MR_OK && i < U8_COUNT; i++) {
        if (buf[i] != u8_value(i)) {
            fprintf(stderr, "rank %d: uint8 broadcast: element %zu is %u, want %u\n", rank, i,
                    (unsigned)buf[i], (unsigned)u8_value(i));
            bad = 1;
            break;
        }
    }
    free(buf);
    return bad;
}

static int rank_main(mr_comm *comm, int rank, int nranks)
{
    int failed = check_f32_from_last(comm, rank, nranks);
    failed |= check_u8_nonblocking(comm, rank);
    CHECK_MR(rank, mr_barrier(comm));
    CHECK_MR(rank, mr_broadcast(comm, NULL, 0, MR_INT32, 0));
    return failed;
}

int main(int argc, char **argv)
{
    int nranks = local_job_world_size(argc, argv);
    if (nranks == 0)
        return 2;
    int failed = local_job_run(nranks, rank_main);
    printf("broadcast (mapreduce %s): %d ranks, float32 x %zu from rank %d, uint8 x %zu from "
           "rank 0 (non-blocking), barrier: %s\n",
           mr_version(), nranks, F32_COUNT, nranks - 1, U8_COUNT,
           failed == 0 ? "OK" : "FAILED");
    if (failed != 0)
        fprintf(stderr, "broadcast: %d of %d ranks failed\n", failed, nranks);
    return failed == 0 ? 0 : 1;
}
