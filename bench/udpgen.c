/* udpgen: offer a UDP load from many source ports, as fast as one core can, with sendmmsg.
 *
 *   udpgen SRC DST DPORT SECONDS PAYLOAD_BYTES SOURCE_PORTS
 *
 * Crafts IPv4/UDP packets on an IPPROTO_RAW socket (so each packet can have its own source
 * port) and prints the number of packets the kernel accepted. Part of bench/forward.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s SRC DST DPORT SECONDS PAYLOAD_BYTES SOURCE_PORTS\n", argv[0]);
        return 2;
    }
    in_addr_t src = inet_addr(argv[1]), dst = inet_addr(argv[2]);
    int dport = atoi(argv[3]), payload = atoi(argv[5]), ports = atoi(argv[6]);
    double seconds = atof(argv[4]);
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("socket"); return 1; }
    int size = sizeof(struct iphdr) + sizeof(struct udphdr) + payload;
    static char packets[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr.s_addr = dst};
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        struct iphdr *ip = (struct iphdr *)packets[i];
        struct udphdr *udp = (struct udphdr *)(ip + 1);
        memset(packets[i], 'x', size);
        ip->version = 4; ip->ihl = 5; ip->tos = 0; ip->tot_len = htons(size);
        ip->id = 0; ip->frag_off = 0; ip->ttl = 64; ip->protocol = IPPROTO_UDP;
        ip->check = 0; ip->saddr = src; ip->daddr = dst;
        udp->dest = htons(dport); udp->len = htons(size - sizeof(struct iphdr)); udp->check = 0;
        iov[i].iov_base = packets[i]; iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to; msgs[i].msg_hdr.msg_namelen = sizeof to;
    }
    unsigned long sent = 0, next_port = 0;
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < BATCH; i++) {
            struct udphdr *udp = (struct udphdr *)(packets[i] + sizeof(struct iphdr));
            udp->source = htons(10000 + (next_port++ % ports));
        }
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) sent += n;
        else if (errno != ENOBUFS && errno != EAGAIN) { perror("sendmmsg"); return 1; }
    }
    printf("%lu\n", sent);
    return 0;
}
