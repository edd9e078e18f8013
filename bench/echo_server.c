/*
 * echo_server.c: the floor for `make bench-rtt`.
 *
 * A minimal vfio-user "echo" server that makes the same system calls per
 * message as vmsi-server's I/O loop, so that the difference between the two
 * round trips is the cost of the Python code, not of the kernel:
 *
 *   epoll_wait(epfd, events, 4, -1)        reactor wakeup (selectors.EpollSelector,
 *                                          maxevents = number of registered fds)
 *   recvmsg(fd, {name: 110 bytes,          Channel.receive: recvmsg_into a 1 MiB
 *                iov: 1 MiB,               buffer with room for 1024 SCM_RIGHTS fds,
 *                control: CMSG_SPACE(4096)},  MSG_CMSG_CLOEXEC
 *           MSG_CMSG_CLOEXEC)
 *   sendto(fd, reply, len, 0, NULL, 0)     Channel.send: socket.send (glibc send())
 *
 * Verify with: strace -f -e trace=epoll_wait,recvmsg,sendto,sendmsg on both.
 *
 * Protocol: VERSION gets major 0, minor 0 and a short capability JSON;
 * REGION_READ gets offset/region/count echoed plus `count` zero bytes; any other
 * command gets a header-only error reply (flags REPLY|ERROR, errno EINVAL).
 * Requests flagged NO_REPLY are not answered. One client at a time: a second
 * one is accepted and closed at once (like vmsi-server refusing a busy device).
 *
 * Usage: echo_server SOCKET_PATH   (runs until SIGTERM/SIGINT)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_SIZE (1u << 20)            /* Channel(read_size=1 << 20) */
#define MAX_FDS_PER_READ 1024           /* channel.MAX_FDS_PER_READ */
#define HEADER_SIZE 16
#define REGION_ACCESS_FIXED 16
#define MAX_XFER (1u << 20)             /* advertised max_data_xfer_size */

#define CMD_VERSION 1
#define CMD_REGION_READ 9
#define FLAG_REPLY 0x1u
#define FLAG_NO_REPLY 0x10u
#define FLAG_ERROR 0x20u

struct header {
    uint16_t id;
    uint16_t command;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
} __attribute__((packed));

static const char version_json[] =
    "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";

static unsigned char in_buf[READ_SIZE];
/* Reassembly of messages split across reads (never happens with a synchronous
 * client, but the server must not answer garbage if it does). */
static unsigned char pending[READ_SIZE + HEADER_SIZE + REGION_ACCESS_FIXED];
static size_t pending_len;
static unsigned char out_buf[HEADER_SIZE + REGION_ACCESS_FIXED + MAX_XFER];
static unsigned char control[CMSG_SPACE(MAX_FDS_PER_READ * sizeof(int))];

static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static int send_all(int fd, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void reply_header(const struct header *req, uint32_t size, uint32_t flags,
                         uint32_t err)
{
    struct header h = { req->id, req->command, size, flags, err };
    memcpy(out_buf, &h, sizeof h);
}

/* Build and send the answer to one complete message; -1 when the client is gone. */
static int answer(int fd, const unsigned char *msg)
{
    struct header req;
    memcpy(&req, msg, sizeof req);
    if (req.flags & FLAG_NO_REPLY)
        return 0;
    if ((req.flags & 0xf) != 0)      /* a reply or unknown type: never answer */
        return 0;
    size_t len = HEADER_SIZE;
    if (req.command == CMD_VERSION) {
        uint16_t major = 0, minor = 0;
        len = HEADER_SIZE + 4 + sizeof version_json;   /* JSON + its NUL */
        reply_header(&req, (uint32_t)len, FLAG_REPLY, 0);
        memcpy(out_buf + HEADER_SIZE, &major, 2);
        memcpy(out_buf + HEADER_SIZE + 2, &minor, 2);
        memcpy(out_buf + HEADER_SIZE + 4, version_json, sizeof version_json);
    } else if (req.command == CMD_REGION_READ
               && req.size == HEADER_SIZE + REGION_ACCESS_FIXED) {
        uint32_t count;
        memcpy(&count, msg + HEADER_SIZE + 12, 4);
        if (count > MAX_XFER) {
            reply_header(&req, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, EINVAL);
        } else {
            len = HEADER_SIZE + REGION_ACCESS_FIXED + count;
            reply_header(&req, (uint32_t)len, FLAG_REPLY, 0);
            memcpy(out_buf + HEADER_SIZE, msg + HEADER_SIZE, REGION_ACCESS_FIXED);
            memset(out_buf + HEADER_SIZE + REGION_ACCESS_FIXED, 0, count);
        }
    } else {
        reply_header(&req, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, EINVAL);
    }
    return send_all(fd, out_buf, len);
}

/* Answer every complete message in data[0:len]; returns bytes consumed or -1. */
static long answer_all(int fd, const unsigned char *data, size_t len)
{
    size_t pos = 0;
    while (len - pos >= HEADER_SIZE) {
        uint32_t size;
        memcpy(&size, data + pos + 4, 4);
        if (size < HEADER_SIZE || size > sizeof pending - HEADER_SIZE)
            return -1;                   /* broken framing: drop the client */
        if (len - pos < size)
            break;
        if (answer(fd, data + pos) < 0)
            return -1;
        pos += size;
    }
    return (long)pos;
}

/* One recvmsg, like Channel.receive; -1 on EOF or error. */
static int on_readable(int fd)
{
    struct sockaddr_un name;
    struct iovec iov = { in_buf, sizeof in_buf };
    struct msghdr mh = {
        .msg_name = &name, .msg_namelen = sizeof name,
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control, .msg_controllen = sizeof control,
    };
    ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    /* Close any fds that came along; the echo server has no use for them. */
    if (n >= 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                int *fds = (int *)CMSG_DATA(c);
                for (size_t i = 0; i < nfds; i++)
                    close(fds[i]);
            }
        }
    }
    if (n <= 0)
        return -1;
    long used;
    if (pending_len == 0) {
        used = answer_all(fd, in_buf, (size_t)n);
        if (used < 0)
            return -1;
        if ((size_t)used < (size_t)n) {
            pending_len = (size_t)n - (size_t)used;
            if (pending_len > sizeof pending)
                return -1;
            memcpy(pending, in_buf + used, pending_len);
        }
        return 0;
    }
    if (pending_len + (size_t)n > sizeof pending)
        return -1;
    memcpy(pending + pending_len, in_buf, (size_t)n);
    pending_len += (size_t)n;
    used = answer_all(fd, pending, pending_len);
    if (used < 0)
        return -1;
    memmove(pending, pending + used, pending_len - (size_t)used);
    pending_len -= (size_t)used;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "echo_server: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, path);

    struct sigaction sa = { .sa_handler = on_signal };   /* no SA_RESTART: wake epoll */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);                            /* as CPython does */

    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lfd < 0) {
        perror("socket");
        return 1;
    }
    unlink(path);
    mode_t old = umask(0177);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind");
        return 1;
    }
    umask(old);
    if (listen(lfd, 4) < 0) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

    int cfd = -1;
    struct epoll_event ready[4];
    while (!stopping) {
        int n = epoll_wait(ep, ready, 4, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0)
                    continue;
                if (cfd >= 0) {                  /* busy: one client at a time */
                    close(c);
                    continue;
                }
                cfd = c;
                pending_len = 0;
                struct epoll_event cev = { .events = EPOLLIN, .data.fd = cfd };
                epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
            } else if (fd == cfd) {
                if (on_readable(cfd) < 0) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, cfd, NULL);
                    close(cfd);
                    cfd = -1;
                }
            }
        }
    }
    if (cfd >= 0)
        close(cfd);
    close(lfd);
    unlink(path);
    return 0;
}
