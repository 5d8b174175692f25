/*
 * Starts a whole job on this machine: one process per rank, rank 0 in the calling process.
 *
 * The other ranks are fork()ed before the library is used at all, so no process ever forks
 * with the library's threads running; rank 0 then creates the job id with mr_get_unique_id
 * and hands it to each of them through a pipe, as a real launcher would through a file or a
 * key-value store.
 */
#ifndef MAPREDUCE_EXAMPLES_LOCAL_JOB_H
#define MAPREDUCE_EXAMPLES_LOCAL_JOB_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mapreduce.h"

/* A job that has not finished after this long is killed (SIGALRM) and counts as failed. */
#define LOCAL_JOB_DEADLINE_S 300

/* What each rank runs; returns 0 when every check passed. */
typedef int (*rank_main_fn)(mr_comm *comm, int rank, int nranks);

/* Report a failed call with both the code and the detailed message. */
#define CHECK_MR(rank, call)                                                               \
    do {                                                                                   \
        mr_result r_ = (call);                                                             \
        if (r_ != MR_OK) {                                                                 \
            fprintf(stderr, "rank %d: %s failed: %s: %s\n", (rank), #call,                 \
                    mr_result_string(r_), mr_last_error());                                \
            return 1;                                                                      \
        }                                                                                  \
    } while (0)

/* World size from argv[1] (default 4). Returns 0 on a bad argument. */
static int local_job_world_size(int argc, char **argv)
{
    long n = 4;
    if (argc > 1) {
        char *end = NULL;
        n = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || n < 1 || n > 256) {
            fprintf(stderr, "usage: %s [world-size 1..256]\n", argv[0]);
            return 0;
        }
    }
    return (int)n;
}

static int read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Join the job as `rank`, run the rank's checks, leave the job. */
static int local_job_rank(rank_main_fn rank_main, const mr_unique_id *id, int rank, int nranks)
{
    mr_comm *comm = NULL;
    CHECK_MR(rank, mr_comm_init_rank(&comm, nranks, id, rank));
    int failed = rank_main(comm, rank, nranks);
    mr_result r = mr_comm_destroy(comm);
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: mr_comm_destroy: %s: %s\n", rank, mr_result_string(r),
                mr_last_error());
        failed = 1;
    }
    return failed;
}

/* Run `rank_main` on `nranks` processes. Returns the number of ranks that failed. */
static int local_job_run(int nranks, rank_main_fn rank_main)
{
    pid_t *pids = calloc((size_t)nranks, sizeof *pids);
    int *id_pipes = calloc((size_t)nranks, sizeof *id_pipes);
    if (pids == NULL || id_pipes == NULL) {
        perror("calloc");
        return nranks;
    }
    alarm(LOCAL_JOB_DEADLINE_S);
    fflush(NULL); /* nothing buffered may be printed twice */

    int failed = 0;
    for (int rank = 1; rank < nranks; rank++) {
        int fds[2];
        if (pipe(fds) != 0) {
            perror("pipe");
            failed++;
            id_pipes[rank] = -1;
            continue;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            close(fds[0]);
            close(fds[1]);
            failed++;
            id_pipes[rank] = -1;
            continue;
        }
        if (pid == 0) {
            /* Child: the write ends of earlier ranks' pipes are the parent's business. */
            for (int other = 1; other < rank; other++)
                if (id_pipes[other] >= 0)
                    close(id_pipes[other]);
            close(fds[1]);
            mr_unique_id id;
            if (read_full(fds[0], &id, sizeof id) != 0) {
                fprintf(stderr, "rank %d: no job id from rank 0\n", rank);
                _exit(1);
            }
            close(fds[0]);
            _exit(local_job_rank(rank_main, &id, rank, nranks) == 0 ? 0 : 1);
        }
        close(fds[0]);
        pids[rank] = pid;
        id_pipes[rank] = fds[1];
    }

    mr_unique_id id;
    mr_result r = mr_get_unique_id(&id);
    if (r != MR_OK) {
        fprintf(stderr, "rank 0: mr_get_unique_id: %s: %s\n", mr_result_string(r),
                mr_last_error());
        failed++;
    }
    for (int rank = 1; rank < nranks; rank++) {
        if (id_pipes[rank] < 0)
            continue;
        /* On failure the pipe closes empty and the child gives up. */
        if (r == MR_OK && write_full(id_pipes[rank], &id, sizeof id) != 0) {
            perror("write job id");
            failed++;
        }
        close(id_pipes[rank]);
    }
    if (r == MR_OK && local_job_rank(rank_main, &id, 0, nranks) != 0)
        failed++;

    for (int rank = 1; rank < nranks; rank++) {
        if (pids[rank] <= 0)
            continue;
        int status = 0;
        while (waitpid(pids[rank], &status, 0) < 0) {
            if (errno != EINTR) {
                perror("waitpid");
                status = -1;
                break;
            }
        }
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
            if (WIFSIGNALED(status))
                fprintf(stderr, "rank %d: killed by signal %d\n", rank, WTERMSIG(status));
            failed++;
        }
    }
    free(pids);
    free(id_pipes);
    return failed;
}

#endif /* MAPREDUCE_EXAMPLES_LOCAL_JOB_H */
