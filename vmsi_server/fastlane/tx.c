/* TX queue 0 over a tap: the common packets of TxQueue._walk in C.
 *
 * What igbvf sends at run time is advanced descriptors only: a context
 * descriptor, then one packet per EOP, with TSO or checksum offload, often
 * the IPv4 header checksum. This loop sends exactly those, as the Python walk
 * does (the same vnet header, the same header rewrites, DD into each RS
 * descriptor), and stops at the first packet it does not take: a legacy or
 * unknown descriptor, VLAN insertion, SCTP, a chain without EOP yet, anything
 * Python would drop or that lies outside guest memory. TDH then stands at
 * that packet and Python's walk goes on from there with its own rules, so
 * every drop, counter and corner case stays the one place it is written.
 * No byte is sent for a packet that is not taken.
 */
#define _GNU_SOURCE
#include "lane.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>

#define DESC_SIZE 16
#define STATUS_OFFSET 12
#define MAX_CHAIN 64
#define MAX_FRAME 9728
#define MAX_TSO_FRAME (65535 + 14 + 4)
#define MIN_MSS 64
#define ETH_HLEN 14
#define IPV6_HLEN 40
#define TCP_CSUM_OFFSET 16
#define UDP_CSUM_OFFSET 6
#define TCP_CWR 0x80
#define MAX_HEADER 1024 /* MACLEN (7 bits) + IPLEN (9 bits) + L4LEN (8 bits) fit */

#define CMD_DEXT 0x20000000u
#define CMD_EOP 0x01000000u
#define CMD_RS 0x08000000u
#define CMD_TSE 0x80000000u
#define CMD_VLE 0x40000000u
#define DTALEN_MASK 0xFFFFu
#define DTYP_MASK 0x00F00000u
#define DTYP_CTXT 0x00200000u
#define DTYP_DATA 0x00300000u
#define POPTS_IXSM 0x100u
#define POPTS_TXSM 0x200u
#define TUCMD_IPV4 0x400u
#define TUCMD_L4T_MASK 0x1800u
#define TUCMD_L4T_UDP 0x0u
#define TUCMD_L4T_TCP 0x800u

#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define VNET_F_NEEDS_CSUM 1

struct ctx {
    uint32_t maclen, iplen, tucmd, l4len, mss;
};

static void decode_ctx(const uint8_t *raw, struct ctx *c)
{
    uint32_t vml, tucmd, mli;
    memcpy(&vml, raw, 4);
    memcpy(&tucmd, raw + 8, 4);
    memcpy(&mli, raw + 12, 4);
    c->maclen = (vml >> 9) & 0x7F;
    c->iplen = vml & 0x1FF;
    c->tucmd = tucmd & (TUCMD_IPV4 | TUCMD_L4T_MASK);
    c->l4len = (mli >> 8) & 0xFF;
    c->mss = mli >> 16;
}

static uint16_t ones_add(uint32_t a, uint32_t b)
{
    uint32_t s = a + b;
    return s == 0 ? 0 : (uint16_t)((s - 1) % 0xFFFF + 1);
}

static void ipv4_csum(uint8_t *ip, uint32_t ihl)
{
    ip[10] = ip[11] = 0;
    uint32_t s = 0;
    for (uint32_t i = 0; i < ihl; i += 2)
        s += (uint32_t)(ip[i] << 8 | ip[i + 1]);
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    uint16_t c = (uint16_t)~s;
    ip[10] = (uint8_t)(c >> 8);
    ip[11] = (uint8_t)c;
}

static void put_be16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

struct packet {
    struct iovec iov[MAX_CHAIN + 2];
    int niov;
    uint32_t total;
};

/* The buffers sit in iov[2..niov); iov[0] is for the vnet header and iov[1]
 * for a header copy. Copy the first `len` bytes of the buffers into `out` and
 * make the iovecs [vnet, out, the rest...]. */
static void split_header(struct packet *p, uint8_t *out, uint32_t len)
{
    struct iovec rest[MAX_CHAIN + 2];
    int nrest = 0;
    uint32_t copied = 0;
    for (int i = 2; i < p->niov; i++) {
        uint8_t *base = p->iov[i].iov_base;
        size_t n = p->iov[i].iov_len;
        if (copied < len) {
            size_t take = len - copied < n ? len - copied : n;
            memcpy(out + copied, base, take);
            copied += (uint32_t)take;
            base += take;
            n -= take;
        }
        if (n)
            rest[nrest++] = (struct iovec){base, n};
    }
    p->iov[1] = (struct iovec){out, len};
    memcpy(&p->iov[2], rest, sizeof(struct iovec) * (size_t)nrest);
    p->niov = 2 + nrest;
}

/* Build the vnet header (and header rewrites) of one advanced packet, as
 * TxQueue._offload_adv / _tso do. 0: send it; -1: leave it to Python. */
static int offload(struct packet *p, uint32_t cmd, uint32_t olinfo, const struct ctx *c,
                   int have_ctx, uint8_t *vnet, uint8_t *hdr, uint32_t *frames,
                   uint64_t *octets, int *kind)
{
    int tse = (cmd & CMD_TSE) != 0, txsm = (olinfo & POPTS_TXSM) != 0;
    int ixsm = (olinfo & POPTS_IXSM) != 0;
    memset(vnet, 0, VL_VNET_HDR_LEN);
    *frames = 1;
    *octets = p->total;
    *kind = 0;
    if (cmd & CMD_VLE)
        return -1;
    if (!(tse || txsm || ixsm))
        return 1; /* no header copy */
    if (!have_ctx)
        return -1;
    uint32_t maclen = c->maclen, iplen = c->iplen, l4 = maclen + iplen;
    if (maclen < ETH_HLEN || iplen < 20 || l4 > p->total)
        return -1;
    int ipv4 = (c->tucmd & TUCMD_IPV4) != 0;
    uint32_t l4t = c->tucmd & TUCMD_L4T_MASK;
    if (tse) {
        uint32_t l4len = c->l4len, mss = c->mss, hdr_len = l4 + l4len;
        if (l4t != TUCMD_L4T_TCP || l4len < 20 || l4len > 60 || mss < MIN_MSS
            || mss > MAX_FRAME || hdr_len >= p->total || hdr_len + mss > MAX_FRAME
            || hdr_len > MAX_HEADER)
            return -1;
        uint32_t paylen = p->total - hdr_len;
        uint32_t ip_len = ipv4 ? p->total - maclen : p->total - maclen - IPV6_HLEN;
        if (ip_len > 0xFFFF)
            return -1;
        split_header(p, hdr, hdr_len);
        uint8_t *ip = hdr + maclen, *tcp = hdr + l4;
        if (ipv4) {
            if (ip[0] != (0x40 | iplen / 4) || iplen % 4 || ip[9] != 6)
                return -1;
            put_be16(ip + 2, ip_len);
            ipv4_csum(ip, iplen);
        } else {
            if (ip[0] >> 4 != 6 || (iplen == IPV6_HLEN && ip[6] != 6))
                return -1;
            put_be16(ip + 4, ip_len);
        }
        if ((uint32_t)(tcp[12] >> 4) * 4 != l4len)
            return -1;
        uint32_t seed = (uint32_t)(tcp[TCP_CSUM_OFFSET] << 8 | tcp[TCP_CSUM_OFFSET + 1]);
        put_be16(tcp + TCP_CSUM_OFFSET, ones_add(seed, p->total - l4));
        uint8_t gso = ipv4 ? GSO_TCPV4 : GSO_TCPV6;
        if (tcp[13] & TCP_CWR)
            gso |= GSO_ECN;
        uint16_t h[4] = {(uint16_t)hdr_len, (uint16_t)mss, (uint16_t)l4, TCP_CSUM_OFFSET};
        vnet[0] = VNET_F_NEEDS_CSUM;
        vnet[1] = gso;
        memcpy(vnet + 2, h, sizeof(h));
        uint32_t count = (paylen + mss - 1) / mss;
        *frames = count;
        *octets = (uint64_t)count * hdr_len + paylen;
        *kind = 2;
        return 0;
    }
    uint32_t copy_end = ixsm && ipv4 ? l4 : 0;
    if (txsm) {
        if (l4t != TUCMD_L4T_TCP && l4t != TUCMD_L4T_UDP)
            return -1; /* SCTP (CRC32c in software) and reserved types: Python */
        uint32_t offset = l4t == TUCMD_L4T_TCP ? TCP_CSUM_OFFSET : UDP_CSUM_OFFSET;
        if (l4 + offset + 2 > p->total)
            return -1;
        uint16_t h[4] = {0, 0, (uint16_t)l4, (uint16_t)offset};
        vnet[0] = VNET_F_NEEDS_CSUM;
        memcpy(vnet + 2, h, sizeof(h));
        *kind = 1;
    }
    if (!copy_end)
        return 1;
    if (copy_end > MAX_HEADER)
        return -1;
    split_header(p, hdr, copy_end);
    uint8_t *ip = hdr + maclen;
    uint32_t ihl = (uint32_t)(ip[0] & 0x0F) * 4;
    if (ip[0] >> 4 != 4 || ihl < 20 || ihl > iplen)
        return -1;
    ipv4_csum(ip, ihl);
    return 0;
}

/* DD into the status of each RS descriptor of a packet taken. */
static void complete_rs(struct vl_tx_job *job, const uint32_t *rs, uint32_t nrs)
{
    for (uint32_t k = 0; k < nrs; k++) {
        uint8_t *e = vl_guest_ptr(job->mem, job->ring_base + (uint64_t)rs[k] * DESC_SIZE,
                                  DESC_SIZE, 1);
        uint32_t dd = 1;
        memcpy(e + STATUS_OFFSET, &dd, 4);
        job->completed++;
    }
}

int vl_tx_walk(struct vl_tx_job *job)
{
    const struct vl_memmap *mem = job->mem;
    uint32_t n = job->ring_n, head = job->head;
    uint32_t pending = (job->tail + n - head) % n;
    memset(&job->consumed, 0, sizeof(*job) - offsetof(struct vl_tx_job, consumed));
    struct ctx c = {0, 0, 0, 0, 0};
    int have_ctx = job->have_ctx;
    if (have_ctx)
        decode_ctx(job->ctx_raw, &c);
    /* As Python reads the whole pending run of the ring before anything else: if
     * any of it is outside guest memory, leave it all to Python (tx_ring_dma). */
    uint32_t first = pending < n - head ? pending : n - head;
    if (!pending || !vl_guest_ptr(mem, job->ring_base + (uint64_t)head * DESC_SIZE,
                                  (uint64_t)first * DESC_SIZE, 0)
        || (pending > first
            && !vl_guest_ptr(mem, job->ring_base, (uint64_t)(pending - first) * DESC_SIZE, 0)))
        return 0;
    static struct packet p;
    static uint8_t hdr[MAX_HEADER];
    static uint8_t bounce[MAX_TSO_FRAME + MAX_HEADER];
    uint32_t rs[MAX_CHAIN + 1];
    uint32_t i = 0;
    while (i < pending) {
        /* One packet (or one context): from descriptor i up to its EOP. */
        uint32_t slot = (head + i) % n;
        uint8_t *d = vl_guest_ptr(mem, job->ring_base + (uint64_t)slot * DESC_SIZE, DESC_SIZE, 1);
        if (!d)
            break;
        uint32_t cmd, olinfo;
        memcpy(&cmd, d + 8, 4);
        memcpy(&olinfo, d + 12, 4);
        if (!(cmd & CMD_DEXT))
            break;
        if ((cmd & DTYP_MASK) == DTYP_CTXT) {
            if (!have_ctx || memcmp(job->ctx_raw, d, DESC_SIZE)) {
                memcpy(job->ctx_raw, d, DESC_SIZE);
                job->ctx_changed = 1;
                decode_ctx(d, &c);
                have_ctx = 1;
            }
            job->have_ctx = 1;
            i++;
            job->consumed = i;
            continue;
        }
        uint32_t first_cmd = cmd, first_olinfo = olinfo, nrs = 0, j = i;
        int eop = 0, ok = 1;
        p.niov = 1;
        p.total = 0;
        while (j < pending && p.niov - 1 < MAX_CHAIN) {
            uint32_t s = (head + j) % n;
            uint8_t *e = vl_guest_ptr(mem, job->ring_base + (uint64_t)s * DESC_SIZE,
                                      DESC_SIZE, 1);
            if (!e) {
                ok = 0;
                break;
            }
            uint64_t addr;
            uint32_t ecmd;
            memcpy(&addr, e, 8);
            memcpy(&ecmd, e + 8, 4);
            uint32_t len = ecmd & DTALEN_MASK;
            if (!(ecmd & CMD_DEXT) || (ecmd & DTYP_MASK) != DTYP_DATA || !len) {
                ok = 0;
                break;
            }
            uint8_t *buf = vl_guest_ptr(mem, addr, len, 0);
            if (!buf) {
                ok = 0;
                break;
            }
            p.iov[p.niov++] = (struct iovec){buf, len};
            p.total += len;
            if (ecmd & CMD_RS)
                rs[nrs++] = s;
            j++;
            if (ecmd & CMD_EOP) {
                eop = 1;
                break;
            }
        }
        if (!ok || !eop)
            break;
        if (p.total > (first_cmd & CMD_TSE ? MAX_TSO_FRAME : MAX_FRAME))
            break;
        /* iov[0]: vnet header; iov[1]: header copy, or moved along (rc 1). */
        uint8_t vnet[VL_VNET_HDR_LEN];
        uint32_t frames;
        uint64_t octets;
        int kind;
        memmove(&p.iov[2], &p.iov[1], sizeof(struct iovec) * (size_t)(p.niov - 1));
        p.niov++;
        int rc = offload(&p, first_cmd, first_olinfo, &c, have_ctx, vnet, hdr, &frames,
                         &octets, &kind);
        if (rc < 0)
            break;
        struct iovec *iov = p.iov;
        int niov = p.niov;
        if (rc == 1) { /* no header copy: [vnet, buffers...] */
            iov = &p.iov[1];
            niov = p.niov - 1;
        }
        iov[0] = (struct iovec){vnet, VL_VNET_HDR_LEN};
        if (job->on_complete) {
            /* As the 82576 writes DD once a packet is in its FIFO, not once it is
             * on the wire: copy it out, complete it, tell the interrupt unit, and
             * only then send. The guest's handler runs while the tap write does. */
            size_t at = 0;
            for (int k = 1; k < niov; k++) {
                memcpy(bounce + at, iov[k].iov_base, iov[k].iov_len);
                at += iov[k].iov_len;
            }
            iov[1] = (struct iovec){bounce, at};
            niov = 2;
            complete_rs(job, rs, nrs);
            if (nrs)
                job->on_complete(job->complete_arg);
            nrs = 0;
        }
        if (writev(job->tapfd, iov, niov) < 0) { /* counted, and the packet is gone */
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                job->send_eagain++;
            else if (errno == ENOBUFS)
                job->send_enobufs++;
            else
                job->send_errno = errno;
        }
        /* Counted as sent either way, as TxQueue._packet does. */
        job->frames += frames;
        job->octets += octets;
        if (kind == 2) {
            job->tso_frames++;
            job->tso_segments += frames;
        } else if (kind == 1) {
            job->csum_frames++;
        }
        complete_rs(job, rs, nrs);
        job->packets++;
        i = j;
        job->consumed = i;
    }
    return (int)job->consumed;
}
