/* The compiled fast lane of the vfio-user server (see fastlane/__init__.py).
 *
 * Python's per-message cost is mostly the interpreter waking up after a context
 * switch, not any one function, so the lane keeps whole round trips out of it:
 * vl_poller_wait runs the reactor's epoll_wait, reads each lane socket itself,
 * answers synchronous REGION_READs that fall in a read window from memory the
 * device keeps current, and hands each posted REGION_WRITE to Python as plain
 * values through one callback. At the first message it does not serve it stops
 * and leaves the rest of what it read (with any fds) for Python, so the order
 * of messages on a connection is always kept. Python re-enables the lane only
 * when its own protocol buffer is empty.
 */
#define _GNU_SOURCE
#include "lane.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* vfio-user wire facts (checked against the Python constants by a test). */
#define HEADER_SIZE 16
#define ACCESS_SIZE 32         /* header + offset u64 + region u32 + count u32 */
#define CMD_REGION_READ 9
#define CMD_REGION_WRITE 10
#define FLAG_REPLY 0x1
#define FLAG_NO_REPLY 0x10
#define MAX_SERVED_READ 4096   /* larger reads go to Python */
#define EVENTS_PER_WAIT 64

enum serve_result { LANE_DONE, LANE_PYTHON };

#define MAX_VF_FDS 64

struct vl_poller {
    int epfd;
    struct vl_lane **by_fd;
    int size;
    /* taps whose readiness vf.c handles: few, so a short list */
    int nvfs;
    int vf_fds[MAX_VF_FDS];
    struct vl_vf *vfs[MAX_VF_FDS];
};

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* ------------------------------------------------------------------ lanes */

struct vl_lane *vl_lane_new(int fd, size_t read_size)
{
    struct vl_lane *lane = calloc(1, sizeof(*lane));
    if (!lane)
        return NULL;
    lane->buf = malloc(read_size);
    if (!lane->buf) {
        free(lane);
        return NULL;
    }
    lane->fd = fd;
    lane->cap = read_size;
    return lane;
}

void vl_lane_free(struct vl_lane *lane)
{
    if (!lane)
        return;
    for (int i = 0; i < lane->nfds; i++)
        close(lane->fds[i]);
    free(lane->buf);
    free(lane);
}

void vl_lane_clear_pending(struct vl_lane *lane)
{
    lane->pending_start = lane->pending_end = 0;
    lane->nfds = 0;
    lane->eof = 0;
    lane->error = 0;
}

static int has_pending(const struct vl_lane *lane)
{
    return lane->pending_end > lane->pending_start || lane->nfds || lane->eof || lane->error;
}

/* One recvmsg, as the Python channel does it: fds that came with a truncated
 * control message are closed (the message then fails its fd-count check). */
static ssize_t lane_recv(struct vl_lane *lane)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * VL_MAX_FDS)];
    } control;
    struct iovec iov = {lane->buf, lane->cap};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    ssize_t n = recvmsg(lane->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -errno;
    lane->nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        const uint8_t *data = CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof(int));
            if (lane->nfds < VL_MAX_FDS)
                lane->fds[lane->nfds++] = fd;
            else
                close(fd);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        for (int i = 0; i < lane->nfds; i++)
            close(lane->fds[i]);
        lane->nfds = 0;
    }
    return n;
}

static int send_all(int fd, const uint8_t *data, size_t size)
{
    size_t sent = 0;
    while (sent < size) {
        ssize_t n = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno; /* includes EAGAIN: the socket's send timeout ran out */
        }
        sent += (size_t)n;
    }
    return 0;
}

static struct vl_window *find_window(struct vl_lane *lane, uint32_t region, uint64_t offset,
                                     uint32_t count, int *klass)
{
    for (int i = 0; i < lane->nwindows; i++) {
        struct vl_window *w = &lane->windows[i];
        if (!w->enabled || w->region != region || offset < w->start)
            continue;
        uint64_t rel = offset - w->start;
        if (rel > w->length || count > w->length - rel)
            continue;
        if (w->mode == VL_BYTES) {
            *klass = 0;
            return w;
        }
        /* MSI-X table and PBA: aligned DWORD or QWORD only; anything else is
         * Python's to refuse, with its error reply and counter. */
        if ((count != 4 && count != 8) || rel % count)
            return NULL;
        if (w->mode == VL_MSIX_TABLE)
            *klass = count == 8 ? 0 : ((rel >> 2) & 3) == 3 ? 1 : 2;
        else
            *klass = 0;
        return w;
    }
    return NULL;
}

static void record_access(struct vl_window *w, int klass, uint64_t ns)
{
    if (w->served[klass] == 0 || ns < w->ns_min[klass])
        w->ns_min[klass] = ns;
    if (ns > w->ns_max[klass])
        w->ns_max[klass] = ns;
    w->ns_total[klass] += ns;
    int b = bit_length(ns);
    w->buckets[klass][b < VL_ACCESS_BUCKETS ? b : VL_ACCESS_BUCKETS - 1]++;
}

static void record_message(uint64_t *buckets, uint64_t *total, uint64_t *count, uint64_t ns)
{
    int b = bit_length(ns) - 1;
    buckets[b < 0 ? 0 : b < VL_MSG_BUCKETS ? b : VL_MSG_BUCKETS - 1]++;
    *total += ns;
    (*count)++;
}

/* Apply a posted Vector Control write in place when it needs nothing else
 * (see struct vl_mask_window); 1 when applied, 0 when Python must take it. */
static int try_mask_write(struct vl_lane *lane, uint32_t region, uint64_t offset,
                          const uint8_t *data, uint32_t count, uint64_t t0)
{
    if (count != 4)
        return 0;
    for (int i = 0; i < lane->nmasks; i++) {
        struct vl_mask_window *w = &lane->masks[i];
        if (w->region != region || offset < w->start || offset - w->start >= w->length)
            continue;
        uint64_t rel = offset - w->start;
        if (!*w->armed || rel % 4 || ((rel >> 2) & 3) != 3)
            return 0;
        uint32_t value = get32(data) & w->writable;
        uint64_t vector = rel / 16;
        int pending = (w->pending[vector >> 3] >> (vector & 7)) & 1;
        if (!(value & 1) && pending)
            return 0; /* an unmask that delivers: Python's */
        w->dwords[rel >> 2] = value;
        w->served++;
        uint64_t ns = now_ns() - t0;
        if (w->timed) {
            if (w->served == 1 || ns < w->ns_min)
                w->ns_min = ns;
            if (ns > w->ns_max)
                w->ns_max = ns;
            w->ns_total += ns;
            int b = bit_length(ns);
            w->buckets[b < VL_ACCESS_BUCKETS ? b : VL_ACCESS_BUCKETS - 1]++;
        }
        record_message(lane->write_buckets, &lane->write_ns_total, &lane->writes, ns);
        return 1;
    }
    return 0;
}

/* Apply a posted register write by its rule when it needs nothing else. */
static int try_rule(struct vl_lane *lane, uint32_t region, uint64_t offset, const uint8_t *data,
                    uint32_t count, uint64_t t0)
{
    if (count != 4)
        return 0;
    for (int i = 0; i < lane->nrules; i++) {
        struct vl_rule *r = &lane->rules[i];
        if (r->region != region || r->offset != offset)
            continue;
        uint32_t bits = get32(data) & r->mask;
        if (r->kind == VL_SET_UNLESS_READY) {
            if (bits & *r->guard)
                return 0;
            *r->target |= bits;
        } else if (r->kind == VL_CLEAR) {
            *r->target &= ~(int64_t)bits;
        } else {
            return 0;
        }
        r->served++;
        record_message(lane->write_buckets, &lane->write_ns_total, &lane->writes, now_ns() - t0);
        return 1;
    }
    return 0;
}

/* Answer one REGION_READ from a window; 0 or the errno of the failed send. */
static int serve_read(struct vl_lane *lane, struct vl_window *w, int klass, uint16_t msg_id,
                      uint64_t offset, uint32_t region, uint32_t count, uint64_t t0)
{
    uint8_t reply[ACCESS_SIZE + MAX_SERVED_READ];
    put16(reply, msg_id);
    put16(reply + 2, CMD_REGION_READ);
    put32(reply + 4, ACCESS_SIZE + count);
    put32(reply + 8, FLAG_REPLY);
    put32(reply + 12, 0);
    put64(reply + 16, offset);
    put32(reply + 24, region);
    put32(reply + 28, count);
    const uint8_t *src = w->bytes + (offset - w->start);
    if (w->timed) {
        uint64_t a = now_ns();
        memcpy(reply + ACCESS_SIZE, src, count);
        record_access(w, klass, now_ns() - a);
    } else {
        memcpy(reply + ACCESS_SIZE, src, count);
    }
    w->served[klass]++;
    int err = send_all(lane->fd, reply, ACCESS_SIZE + count);
    if (err)
        return err;
    record_message(lane->read_buckets, &lane->read_ns_total, &lane->reads, now_ns() - t0);
    return 0;
}

/* Read what the socket has and serve it; LANE_PYTHON when Python must look
 * (data left over, fds, EOF, an error), LANE_DONE when nothing is left. */
static enum serve_result lane_serve(struct vl_lane *lane, int *python_ran)
{
    ssize_t n = lane_recv(lane);
    lane->wakeups++;
    if (n == -EAGAIN || n == -EWOULDBLOCK || n == -EINTR)
        return LANE_DONE;
    if (n < 0) {
        lane->error = (int)-n;
        return LANE_PYTHON;
    }
    if (n == 0) {
        lane->eof = 1;
        return LANE_PYTHON;
    }
    size_t pos = 0, end = (size_t)n;
    lane->pending_start = lane->pending_end = 0;
    if (lane->nfds) /* fds belong to a message only Python decodes */
        goto hand_over;
    while (end - pos >= ACCESS_SIZE && lane->enabled) {
        const uint8_t *m = lane->buf + pos;
        uint64_t t0 = now_ns();
        uint16_t command = get16(m + 2);
        uint32_t size = get32(m + 4), flags = get32(m + 8), error = get32(m + 12);
        uint64_t offset = get64(m + 16);
        uint32_t region = get32(m + 24), count = get32(m + 28);
        if (error || count > lane->max_xfer || offset + count < offset)
            break;
        if (command == CMD_REGION_READ && flags == 0 && size == ACCESS_SIZE) {
            int klass = 0;
            struct vl_window *w;
            if (count > MAX_SERVED_READ || !(w = find_window(lane, region, offset, count, &klass)))
                break;
            int err = serve_read(lane, w, klass, get16(m), offset, region, count, t0);
            pos += ACCESS_SIZE;
            if (err) {
                lane->error = err;
                goto hand_over;
            }
        } else if (command == CMD_REGION_WRITE && flags == FLAG_NO_REPLY
                   && size == ACCESS_SIZE + (uint64_t)count && end - pos >= size) {
            pos += size;
            struct vl_vf *vf = lane->vf;
            if (vf && region == vf->bar && count == 4 && !(offset & 3)
                && vl_vf_write(vf, offset, get32(m + ACCESS_SIZE))) {
                lane->vf_writes++;
                record_message(lane->write_buckets, &lane->write_ns_total, &lane->writes,
                               now_ns() - t0);
                if (vf->called_python) {
                    vf->called_python = 0;
                    *python_ran = 1;
                    if (!lane->attached)
                        return LANE_DONE;
                }
                continue;
            }
            if (vf && vf->called_python) {
                /* vf.c ran Python before handing the write over */
                vf->called_python = 0;
                *python_ran = 1;
            }
            if (try_mask_write(lane, region, offset, m + ACCESS_SIZE, count, t0)
                || try_rule(lane, region, offset, m + ACCESS_SIZE, count, t0))
                continue;
            lane->posted_writes++;
            *python_ran = 1;
            int stop = vl_posted_write(lane->handle, get16(m), region, offset, m + ACCESS_SIZE,
                                       count);
            if (stop || !lane->attached)
                return LANE_DONE; /* the session closed itself */
        } else {
            break;
        }
    }
hand_over:
    lane->pending_start = pos;
    lane->pending_end = end;
    return has_pending(lane) ? LANE_PYTHON : LANE_DONE;
}

/* ----------------------------------------------------------------- poller */

struct vl_poller *vl_poller_new(int epfd)
{
    struct vl_poller *poller = calloc(1, sizeof(*poller));
    if (poller)
        poller->epfd = epfd;
    return poller;
}

void vl_poller_free(struct vl_poller *poller)
{
    if (!poller)
        return;
    free(poller->by_fd);
    free(poller);
}

int vl_poller_add(struct vl_poller *poller, struct vl_lane *lane)
{
    if (lane->fd < 0)
        return -EINVAL;
    if (lane->fd >= poller->size) {
        int size = poller->size ? poller->size : 64;
        while (size <= lane->fd)
            size *= 2;
        struct vl_lane **grown = realloc(poller->by_fd, sizeof(*grown) * (size_t)size);
        if (!grown)
            return -ENOMEM;
        memset(grown + poller->size, 0, sizeof(*grown) * (size_t)(size - poller->size));
        poller->by_fd = grown;
        poller->size = size;
    }
    poller->by_fd[lane->fd] = lane;
    lane->attached = 1;
    return 0;
}

int vl_poller_add_vf(struct vl_poller *poller, int fd, struct vl_vf *vf)
{
    vl_poller_remove_vf(poller, fd);
    if (poller->nvfs >= MAX_VF_FDS)
        return -ENOSPC;
    poller->vf_fds[poller->nvfs] = fd;
    poller->vfs[poller->nvfs] = vf;
    poller->nvfs++;
    return 0;
}

void vl_poller_remove_vf(struct vl_poller *poller, int fd)
{
    for (int i = 0; i < poller->nvfs; i++) {
        if (poller->vf_fds[i] != fd)
            continue;
        poller->nvfs--;
        poller->vf_fds[i] = poller->vf_fds[poller->nvfs];
        poller->vfs[i] = poller->vfs[poller->nvfs];
        return;
    }
}

static struct vl_vf *vf_of(const struct vl_poller *poller, int fd)
{
    for (int i = 0; i < poller->nvfs; i++)
        if (poller->vf_fds[i] == fd)
            return poller->vfs[i];
    return NULL;
}

void vl_poller_remove(struct vl_poller *poller, int fd)
{
    if (fd < 0 || fd >= poller->size || !poller->by_fd[fd])
        return;
    poller->by_fd[fd]->attached = 0;
    poller->by_fd[fd] = NULL;
}

/* epoll_wait with a timeout in ns (-1: none). epoll_pwait2 (Linux 5.11) keeps
 * sub-millisecond timers on time: EITR intervals are 100-200 us, and rounding
 * the wait up to 1 ms would hold a throttled interrupt 5-10 times too long.
 * Older kernels get the millisecond wait, rounded up as CPython rounds. */
static int wait_events(int epfd, struct epoll_event *events, int max, int64_t timeout_ns)
{
#ifdef SYS_epoll_pwait2
    static int no_pwait2;
    if (!no_pwait2) {
        struct timespec ts, *tp = NULL;
        if (timeout_ns >= 0) {
            ts.tv_sec = timeout_ns / 1000000000;
            ts.tv_nsec = timeout_ns % 1000000000;
            tp = &ts;
        }
        long n = syscall(SYS_epoll_pwait2, epfd, events, max, tp, NULL, 0);
        if (n >= 0 || errno != ENOSYS)
            return (int)n;
        no_pwait2 = 1;
    }
#endif
    int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
    return epoll_wait(epfd, events, max, ms);
}

/* The reactor's wait: epoll_wait on its epoll fd, lanes served in place.
 * Returns how many (fd, events) pairs Python must dispatch (0 on timeout),
 * or -errno (EINTR included, so Python runs its signal handlers). Returns as
 * soon as anything is for Python, or a callback ran Python code (which may
 * have scheduled timers the caller's timeout does not know of). */
int vl_poller_wait(struct vl_poller *poller, int64_t timeout_ns, int *out_fds,
                   uint32_t *out_events, int max_out)
{
    struct epoll_event events[EVENTS_PER_WAIT];
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : 0;
    int64_t wait_ns = timeout_ns;
    if (max_out > EVENTS_PER_WAIT)
        max_out = EVENTS_PER_WAIT;
    for (;;) {
        int n = wait_events(poller->epfd, events, max_out, wait_ns);
        if (n < 0)
            return -errno;
        int out = 0, python_ran = 0;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            struct vl_lane *lane = fd >= 0 && fd < poller->size ? poller->by_fd[fd] : NULL;
            if (lane && lane->enabled && !has_pending(lane)
                && lane_serve(lane, &python_ran) == LANE_DONE)
                continue;
            struct vl_vf *vf = lane ? NULL : vf_of(poller, fd);
            if (vf && vl_vf_rx_event(vf)) {
                if (vf->called_python) {
                    vf->called_python = 0;
                    python_ran = 1;
                }
                continue;
            }
            out_fds[out] = fd;
            out_events[out] = events[i].events;
            out++;
        }
        if (out || python_ran || n == 0)
            return out;
        if (timeout_ns >= 0) {
            uint64_t now = now_ns();
            if (now >= deadline)
                return 0;
            wait_ns = (int64_t)(deadline - now);
        }
    }
}
