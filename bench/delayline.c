/* delayline: forward Ethernet frames between pairs of interfaces after a fixed delay.
 *
 * Used by bench/netns.sh to emulate long links where the kernel has no netem:
 *
 *     delayline DELAY_US IF_A1 IF_B1 [IF_A2 IF_B2 ...]
 *
 * Every frame received on IF_Ak is sent out of IF_Bk DELAY_US microseconds later, and the other
 * way round; order is kept per direction. Packet sockets carry a virtio-net header
 * (PACKET_VNET_HDR), so TSO/GSO super-frames pass through whole with their offload metadata.
 * Each direction queues at most QUEUE_BYTES; beyond that frames are dropped, like a full link
 * buffer. Runs until SIGTERM/SIGINT. Needs CAP_NET_RAW (root) in the interfaces' namespace.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_IFS 64
#define FRAME_MAX (65536 + 64)
#define QUEUE_BYTES (32u << 20)

struct frame {
    struct frame *next;
    uint64_t due_ns;
    size_t len;
    unsigned char data[];
};

struct queue { /* one direction: frames received on `in`, sent on `out` */
    int in, out;
    struct frame *head, *tail;
    size_t bytes;
    unsigned long dropped;
};

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int open_if(const char *name)
{
    int one = 1;
    unsigned idx = if_nametoindex(name);
    if (!idx) {
        fprintf(stderr, "delayline: no interface %s\n", name);
        exit(1);
    }
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
    if (s < 0 || setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0 ||
        setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0) {
        perror("delayline: packet socket");
        exit(1);
    }
    int buf = 16 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf);
    setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf);
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)idx};
    if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("delayline: bind");
        exit(1);
    }
    return s;
}

/* Send every frame of q that is due; stop at the first that is not, or when the device
 * pushes back (it is retried on the next round). */
static void flush(struct queue *q, uint64_t now)
{
    while (q->head && q->head->due_ns <= now) {
        struct frame *f = q->head;
        if (send(q->out, f->data, f->len, 0) < 0) {
            if (errno == EAGAIN || errno == ENOBUFS || errno == EINTR)
                return;
            q->dropped++; /* e.g. EMSGSIZE: give up on this frame */
        }
        q->head = f->next;
        if (!q->head)
            q->tail = NULL;
        q->bytes -= f->len;
        free(f);
    }
}

int main(int argc, char **argv)
{
    if (argc < 4 || (argc - 2) % 2 != 0 || (argc - 2) > MAX_IFS) {
        fprintf(stderr, "usage: delayline DELAY_US IF_A1 IF_B1 [IF_A2 IF_B2 ...]\n");
        return 2;
    }
    uint64_t delay = strtoull(argv[1], NULL, 10) * 1000u;
    int nifs = argc - 2, nq = nifs;
    int socks[MAX_IFS];
    struct queue qs[MAX_IFS];
    struct pollfd pfds[MAX_IFS];
    for (int i = 0; i < nifs; i++)
        socks[i] = open_if(argv[2 + i]);
    for (int i = 0; i < nifs; i++) { /* queue i: in = socks[i], out = its partner */
        qs[i] = (struct queue){.in = socks[i], .out = socks[i ^ 1]};
        pfds[i] = (struct pollfd){.fd = socks[i], .events = POLLIN};
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    static unsigned char buf[FRAME_MAX];
    while (!stop) {
        uint64_t now = now_ns(), next = UINT64_MAX;
        for (int i = 0; i < nq; i++) {
            flush(&qs[i], now);
            if (qs[i].head && qs[i].head->due_ns < next)
                next = qs[i].head->due_ns;
        }
        int timeout = 100;
        if (next != UINT64_MAX)
            timeout = next <= now ? 0 : (int)((next - now + 999999) / 1000000);
        if (timeout > 100)
            timeout = 100;
        if (poll(pfds, (nfds_t)nifs, timeout) < 0 && errno != EINTR)
            break;
        now = now_ns();
        for (int i = 0; i < nifs; i++) {
            if (!(pfds[i].revents & POLLIN))
                continue;
            for (;;) {
                ssize_t n = recv(socks[i], buf, sizeof buf, 0);
                if (n <= 0)
                    break;
                struct queue *q = &qs[i];
                if (q->bytes + (size_t)n > QUEUE_BYTES) {
                    q->dropped++;
                    continue;
                }
                struct frame *f = malloc(sizeof *f + (size_t)n);
                if (!f) {
                    q->dropped++;
                    continue;
                }
                f->next = NULL;
                f->due_ns = now + delay;
                f->len = (size_t)n;
                memcpy(f->data, buf, (size_t)n);
                if (q->tail)
                    q->tail->next = f;
                else
                    q->head = f;
                q->tail = f;
                q->bytes += (size_t)n;
            }
        }
    }
    for (int i = 0; i < nq; i++)
        if (qs[i].dropped)
            fprintf(stderr, "delayline: %s -> %s: %lu frames dropped\n", argv[2 + i],
                    argv[2 + (i ^ 1)], qs[i].dropped);
    return 0;
}
