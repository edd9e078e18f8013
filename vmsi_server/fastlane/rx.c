/* RX queue 0 of the VF for a tap backend: the inner loop of RxQueue._poll in C.
 *
 * Python checks that the ring can take frames at all (enabled, valid ring
 * registers, pointers in range, the one-buffer descriptor type, guest memory
 * present) and hands over the ring, the guest's memory map and a budget; this
 * loop then does per frame what the Python loop does, with the same drops
 * and counts: take the descriptor at RDH, readv the tap straight into its
 * buffer, filter, check the checksums, write back, advance. Every guest
 * address is checked against the map (a mapping, its length, writable) before
 * any byte moves; a bad buffer gets the error write-back, a ring outside the
 * map stops the loop and Python drains the rest as it always has.
 */
#define _GNU_SOURCE
#include "lane.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define DESC_SIZE 16
#define VNET_HDR_LEN 10
#define ETH_HLEN 14
#define STAT_DD_EOP 0x3u
#define ERR_RXE 0x80000000u
#define MAX_RX_BUFFER (16 * 1024)

/* A host pointer for [iova, iova + len) inside one mapping (writable if asked),
 * or NULL: the whole range must lie in a single mapping, as in GuestMemory. */
uint8_t *vl_guest_ptr(const struct vl_memmap *mem, uint64_t iova, uint64_t len, int write)
{
    for (int i = 0; i < mem->n; i++) {
        const struct vl_map *m = &mem->maps[i];
        if (iova >= m->iova && iova - m->iova < m->size && len <= m->size - (iova - m->iova)) {
            if (write && !m->writable)
                return NULL;
            return m->host + (iova - m->iova);
        }
    }
    return NULL;
}

static uint8_t *guest_ptr(const struct vl_rx_job *job, uint64_t iova, uint64_t len)
{
    return vl_guest_ptr(job->mem, iova, len, 1);
}

static void put_writeback(uint8_t *desc, uint32_t status, uint16_t length)
{
    /* advanced write-back: pkt_info, hdr_info, rss, status_error, length, vlan */
    memset(desc, 0, 8);
    memcpy(desc + 8, &status, 4);
    memcpy(desc + 12, &length, 2);
    memset(desc + 14, 0, 2);
}

/* One frame from the tap into buf (cap bytes); -1: nothing there or an error
 * (recorded in job). Returns the frame length, cap + 1 when it was truncated. */
static long read_frame(struct vl_rx_job *job, uint8_t *vhdr, uint8_t *buf, uint32_t cap)
{
    uint8_t extra;
    struct iovec iov[3] = {{vhdr, VNET_HDR_LEN}, {buf, cap}, {&extra, 1}};
    ssize_t n = readv(job->tapfd, iov, 3);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            job->read_errno = errno;
        return -1;
    }
    if (n < VNET_HDR_LEN) {
        job->short_reads++;
        return -1;
    }
    return (long)(n - VNET_HDR_LEN);
}

int vl_rx_poll(struct vl_rx_job *job)
{
    static uint8_t scratch[MAX_RX_BUFFER];
    uint8_t vhdr[VNET_HDR_LEN];
    uint32_t n = job->ring_n, head = job->head, tail = job->tail, buflen = job->buflen;
    int left = job->budget;
    memset(&job->head_out, 0, sizeof(*job) - offsetof(struct vl_rx_job, head_out));
    job->stop = VL_RX_STOP_DONE;
    if (buflen > MAX_RX_BUFFER)
        buflen = MAX_RX_BUFFER;
    while (left > 0 && head != tail) {
        /* As the Python loop: the contiguous run of descriptors this pass may use
         * must lie in guest memory as a whole, or nothing of it is used. */
        uint32_t k = (tail + n - head) % n;
        if (k > n - head)
            k = n - head;
        if ((uint32_t)left < k)
            k = (uint32_t)left;
        uint8_t *ring = guest_ptr(job, job->ring_base + (uint64_t)head * DESC_SIZE,
                                  (uint64_t)k * DESC_SIZE);
        if (!ring) {
            job->stop = VL_RX_STOP_RING_DMA;
            break;
        }
        uint32_t j = 0;
        int stop = 0;
        while (j < k && left > 0) {
            left--;
            uint8_t *desc = ring + (uint64_t)j * DESC_SIZE;
            uint64_t addr;
            memcpy(&addr, desc, 8);
            uint8_t *buf = guest_ptr(job, addr, buflen);
            if (!buf) {
                if (read_frame(job, vhdr, scratch, MAX_RX_BUFFER) < 0) {
                    stop = 1;
                    break;
                }
                job->drops[VL_RX_DROP_BAD_BUFFER]++;
                put_writeback(desc, STAT_DD_EOP | ERR_RXE, 0);
                j++;
                job->written++;
                continue;
            }
            long got = read_frame(job, vhdr, buf, buflen);
            if (got < 0) {
                stop = 1;
                break;
            }
            int multicast = 0;
            if (vhdr[1] != 0) {
                job->drops[VL_RX_DROP_GSO]++;
                continue;
            }
            if ((uint64_t)got > buflen) {
                job->drops[VL_RX_DROP_OVERSIZE]++;
                continue;
            }
            if (got < ETH_HLEN) {
                job->drops[VL_RX_DROP_RUNT]++;
                continue;
            }
            if (!(job->has_unicast && memcmp(buf, job->unicast, 6) == 0)) {
                if (job->filter && !vl_rx_accepts(job->handle, buf)) {
                    job->drops[VL_RX_DROP_FILTERED]++;
                    continue;
                }
                multicast = buf[0] & 1;
            }
            uint32_t status = STAT_DD_EOP;
            if (job->check_csum) {
                uint32_t bits = vl_rx_checksum(buf, (uint32_t)got, vhdr[0]);
                if (bits & (VL_RXD_ERR_IPE | VL_RXD_ERR_TCPE))
                    job->csum_errors++;
                else if (bits)
                    job->csum_good++;
                status |= bits;
            }
            put_writeback(desc, status, (uint16_t)got);
            job->frames++;
            job->octets += (uint64_t)got;
            job->multicast += (uint32_t)multicast;
            j++;
            job->written++;
        }
        head = (head + j) % n;
        if (stop) {
            job->stop = VL_RX_STOP_EMPTY;
            break;
        }
    }
    job->head_out = head;
    job->left = left;
    return (int)job->written;
}
