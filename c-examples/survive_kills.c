/*
 * A host program that leaves SIGPIPE at its default disposition (as C and C++ programs do)
 * survives a relay or a peer being SIGKILLed in the middle of its collectives.
 *
 *   survive_kills relay [world]   under c-examples/with-relays.sh: the first relay of
 *                                 RELAY_PIDS is killed mid-run; every rank must finish every
 *                                 all-reduce with MR_OK and the right result.
 *   survive_kills peer [world]    the last rank is killed mid-run; every other rank must get
 *                                 an error code back, and none may die of a signal.
 *
 * The ranks are fork()ed before the library is used and join through mr_comm_init_env; the
 * launcher itself never touches the library, so it can kill and reap freely.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mapreduce.h"

#define DEADLINE_S 240
#define COUNT (1 << 20) /* floats per all-reduce: 4 MiB */
#define RELAY_ITERS 40

static float value(int rank, size_t i, int it)
{
    return (float)((rank + 1) * (int)((i + (size_t)it) % 13));
}

/* One rank's life. Returns its exit code. */
static int rank_main(int relay_mode, int rank, int world, int started_fd)
{
    mr_comm *comm = NULL;
    mr_result r = mr_comm_init_env(&comm);
    if (r != MR_OK) {
        fprintf(stderr, "rank %d: init: %s: %s\n", rank, mr_result_string(r), mr_last_error());
        return 1;
    }
    float *buf = malloc(COUNT * sizeof *buf);
    if (buf == NULL)
        return 1;
    char one = 1;
    if (write(started_fd, &one, 1) != 1)
        return 1;
    close(started_fd);
    int status = 1;
    float ranks = (float)(world * (world + 1) / 2);
    /* Peer mode runs until the lost peer turns into an error (bounded by the alarm). */
    for (int it = 0; relay_mode ? it < RELAY_ITERS : 1; it++) {
        for (size_t i = 0; i < COUNT; i++)
            buf[i] = value(rank, i, it);
        r = mr_allreduce(comm, buf, COUNT, MR_FLOAT32, MR_SUM);
        if (r != MR_OK) {
            if (relay_mode) {
                fprintf(stderr, "rank %d: all-reduce %d failed after a relay was killed: %s: %s\n",
                        rank, it, mr_result_string(r), mr_last_error());
            } else {
                printf("rank %d: all-reduce %d reported the lost peer: %s\n", rank, it,
                       mr_result_string(r));
                status = 0;
            }
            goto out;
        }
        for (size_t i = 0; i < COUNT; i++) {
            float want = ranks * (float)((i + (size_t)it) % 13);
            if (buf[i] != want) {
                fprintf(stderr, "rank %d: all-reduce %d: element %zu is %g, expected %g\n", rank,
                        it, i, (double)buf[i], (double)want);
                goto out;
            }
        }
    }
    status = 0;
out:
    free(buf);
    r = mr_comm_destroy(comm);
    if (r != MR_OK && relay_mode) {
        fprintf(stderr, "rank %d: destroy: %s: %s\n", rank, mr_result_string(r), mr_last_error());
        status = 1;
    }
    return status;
}

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(s, (struct sockaddr *)&a, &len) != 0) {
        perror("free port");
        return -1;
    }
    close(s);
    return ntohs(a.sin_port);
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "relay") != 0 && strcmp(argv[1], "peer") != 0)) {
        fprintf(stderr, "usage: %s relay|peer [world]\n", argv[0]);
        return 2;
    }
    int relay_mode = strcmp(argv[1], "relay") == 0;
    int world = argc > 2 ? atoi(argv[2]) : 4;
    if (world < 2 || world > 64) {
        fprintf(stderr, "world size must be 2..64\n");
        return 2;
    }
    pid_t relay_victim = 0;
    if (relay_mode) {
        const char *pids = getenv("RELAY_PIDS");
        if (pids == NULL || (relay_victim = (pid_t)atol(pids)) <= 0) {
            fprintf(stderr, "relay mode runs under c-examples/with-relays.sh (RELAY_PIDS)\n");
            return 2;
        }
    }
    int port = free_port();
    if (port < 0)
        return 1;
    char boot[64], size_text[16];
    snprintf(boot, sizeof boot, "127.0.0.1:%d", port);
    snprintf(size_text, sizeof size_text, "%d", world);
    setenv("MR_BOOTSTRAP", boot, 1);
    setenv("MR_WORLD_SIZE", size_text, 1);
    setenv("MR_SHM_DISABLE", "1", 1); /* one host: force TCP, where SIGPIPE can happen */
    /* Many streams and small chunks: many writes in flight when the victim dies. */
    setenv("MR_STREAMS", "4", 0);
    setenv("MR_CHUNK_BYTES", "16384", 0);
    if (!relay_mode && getenv("MR_TOKEN") == NULL)
        setenv("MR_TOKEN", "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e", 1);
    alarm(DEADLINE_S);
    int started[2];
    if (pipe(started) != 0) {
        perror("pipe");
        return 1;
    }
    fflush(NULL);
    pid_t pids[64];
    for (int rank = 0; rank < world; rank++) {
        pids[rank] = fork();
        if (pids[rank] < 0) {
            perror("fork");
            return 1;
        }
        if (pids[rank] == 0) {
            char rank_text[16];
            snprintf(rank_text, sizeof rank_text, "%d", rank);
            setenv("MR_RANK", rank_text, 1);
            close(started[0]);
            _exit(rank_main(relay_mode, rank, world, started[1]));
        }
    }
    close(started[1]);
    /* Every rank is in its loop: kill at a random moment of the next ~150 ms. */
    for (int n = 0; n < world;) {
        char b;
        ssize_t got = read(started[0], &b, 1);
        if (got == 1) {
            n++;
        } else if (got == 0 || errno != EINTR) {
            break; /* a rank died before starting: reaped and reported below */
        }
    }
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    struct timespec pause = {0, (long)(rand() % 150) * 1000000L};
    nanosleep(&pause, NULL);
    pid_t victim = relay_mode ? relay_victim : pids[world - 1];
    printf("killing %s (pid %ld) after %ld ms\n", relay_mode ? "relay 0" : "the last rank",
           (long)victim, pause.tv_nsec / 1000000L);
    fflush(stdout);
    kill(victim, SIGKILL);

    int failed = 0;
    for (int rank = 0; rank < world; rank++) {
        int st = 0;
        while (waitpid(pids[rank], &st, 0) < 0 && errno == EINTR) {
        }
        if (!relay_mode && rank == world - 1)
            continue; /* the victim */
        if (WIFSIGNALED(st)) {
            fprintf(stderr, "rank %d was killed by signal %d%s\n", rank, WTERMSIG(st),
                    WTERMSIG(st) == SIGPIPE ? " (SIGPIPE)" : "");
            failed++;
        } else if (WEXITSTATUS(st) != 0) {
            fprintf(stderr, "rank %d exited with status %d\n", rank, WEXITSTATUS(st));
            failed++;
        }
    }
    if (failed) {
        fprintf(stderr, "%d rank(s) failed\n", failed);
        return 1;
    }
    printf("%s killed: every surviving rank %s\n", relay_mode ? "relay" : "peer",
           relay_mode ? "completed with correct results" : "got an error code");
    return 0;
}
