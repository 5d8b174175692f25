/*
 * All-reduce across a local job: every rank contributes rank-dependent values whose reduction
 * is known in closed form, and checks every element of the result.
 *
 *   usage: allreduce [world-size]      (default 4)
 *
 * 1. blocking float32 sum over a buffer larger than one pipeline chunk and not a multiple of
 *    anything: element i of rank r is (r + 1) * (i % 100 + 1), so the sum is
 *    P (P + 1) / 2 * (i % 100 + 1) -- integer-valued, hence exact in float32;
 * 2. non-blocking int64 max polled with mr_test: element i of rank r is r * 1000 + i % 7;
 * 3. float64 average: element i of rank r is 2 r + i, so the average is P - 1 + i.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "local_job.h"

#define SUM_COUNT ((size_t)(1u << 20) + 3u)
#define MAX_COUNT ((size_t)1000)
#define AVG_COUNT ((size_t)4097)

static int check_sum_f32(mr_comm *comm, int rank, int nranks)
{
    float *buf = malloc(SUM_COUNT * sizeof *buf);
    if (buf == NULL)
        return 1;
    for (size_t i = 0; i < SUM_COUNT; i++)
        buf[i] = (float)(rank + 1) * (float)(i % 100 + 1);

    mr_result r = mr_allreduce(comm, buf, SUM_COUNT, MR_FLOAT32, MR_SUM);
    int bad = 0;
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_allreduce(float32, sum): %s: %s\n", rank,
                mr_result_string(r), mr_last_error());
        bad = 1;
    }
    const float ranks_sum = (float)nranks * (float)(nranks + 1) / 2.0f;
    for (size_t i = 0; r == MR_OK && i < SUM_COUNT; i++) {
        float want = ranks_sum * (float)(i % 100 + 1);
        if (buf[i] != want) {
            fprintf(stderr, "rank %d: float32 sum: element %zu is %.1f, want %.1f\n", rank, i,
                    (double)buf[i], (double)want);
            bad = 1;
            break;
        }
    }
    free(buf);
    return bad;
}

static int check_max_i64_nonblocking(mr_comm *comm, int rank, int nranks)
{
    int64_t buf[MAX_COUNT];
    for (size_t i = 0; i < MAX_COUNT; i++)
        buf[i] = (int64_t)rank * 1000 + (int64_t)(i % 7);

    mr_request *req = NULL;
    CHECK_MR(rank, mr_iallreduce(comm, buf, MAX_COUNT, MR_INT64, MR_MAX, &req));
    int done = 0;
    mr_result r = MR_OK;
    while (!done && r == MR_OK)
        r = mr_test(req, &done);
    /* mr_wait frees the request and returns the op's result, also after mr_test failed. */
    mr_result waited = mr_wait(req);
    if (r == MR_OK)
        r = waited;
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_iallreduce(int64, max): %s: %s\n", rank,
                mr_result_string(r), mr_last_error());
        return 1;
    }
    for (size_t i = 0; i < MAX_COUNT; i++) {
        int64_t want = (int64_t)(nranks - 1) * 1000 + (int64_t)(i % 7);
        if (buf[i] != want) {
            fprintf(stderr, "rank %d: int64 max: element %zu is %lld, want %lld\n", rank, i,
                    (long long)buf[i], (long long)want);
            return 1;
        }
    }
    return 0;
}

static int check_avg_f64(mr_comm *comm, int rank, int nranks)
{
    double *buf = malloc(AVG_COUNT * sizeof *buf);
    if (buf == NULL)
        return 1;
    for (size_t i = 0; i < AVG_COUNT; i++)
        buf[i] = 2.0 * rank + (double)i;

    mr_result r = mr_allreduce(comm, buf, AVG_COUNT, MR_FLOAT64, MR_AVG);
    int bad = 0;
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_allreduce(float64, avg): %s: %s\n", rank,
                mr_result_string(r), mr_last_error());
        bad = 1;
    }
    for (size_t i = 0; r == MR_OK && i < AVG_COUNT; i++) {
        double want = (double)(nranks - 1) + (double)i;
        if (buf[i] != want) {
            fprintf(stderr, "rank %d: float64 avg: element %zu is %f, want %f\n", rank, i,
                    buf[i], want);
            bad = 1;
            break;
        }
    }
    free(buf);
    return bad;
}

static int rank_main(mr_comm *comm, int rank, int nranks)
{
    int my_rank = -1, size = -1;
    CHECK_MR(rank, mr_comm_rank(comm, &my_rank));
    CHECK_MR(rank, mr_comm_size(comm, &size));
    if (my_rank != rank || size != nranks) {
        fprintf(stderr, "rank %d: communicator says rank %d of %d\n", rank, my_rank, size);
        return 1;
    }
    int failed = check_sum_f32(comm, rank, nranks);
    failed |= check_max_i64_nonblocking(comm, rank, nranks);
    failed |= check_avg_f64(comm, rank, nranks);
    return failed;
}

int main(int argc, char **argv)
{
    int nranks = local_job_world_size(argc, argv);
    if (nranks == 0)
        return 2;
    int failed = local_job_run(nranks, rank_main);
    printf("allreduce (mapreduce %s): %d ranks, float32 sum x %zu, int64 max x %zu "
           "(non-blocking), float64 avg x %zu: %s\n",
           mr_version(), nranks, SUM_COUNT, MAX_COUNT, AVG_COUNT,
           failed == 0 ? "OK" : "FAILED");
    if (failed != 0)
        fprintf(stderr, "allreduce: %d of %d ranks failed\n", failed, nranks);
    return failed == 0 ? 0 : 1;
}
