/* One VF's hot path in C: the register writes and tap wake-ups igbvf causes per
 * packet, from the doorbell to the MSI-X eventfd, without entering Python.
 *
 * Why: after the message lane and the packet loops went into C, what was left
 * of the per-packet cost was Python dispatching a TDT or RDT write to its
 * queue, booking the result and raising the interrupt (InterruptUnit ->
 * MsixController.trigger -> eventfd). Under TSO every TX completion waits for
 * that, and so does the guest's next packet.
 *
 * How it stays the same device: this file keeps no state of its own. The
 * queues' head/tail, the interrupt unit's registers and timers' bookkeeping,
 * and the MSI-X gate are buffers owned by the Python objects (TxQueue.ring,
 * RxQueue.ring, InterruptUnit.state, MsixController.gate), so whichever side
 * runs sees what the other did. Python publishes what decides whether C may
 * run at all (tx_ready, rx_ready, the rings' base/size, the gate) after every
 * change it makes. Whatever C does not take - a packet its walk does not
 * send, a message EITR holds back, a vector that is not deliverable, a ring
 * that fills - goes to Python: either by returning 0 (the write is then
 * handed to Python's register file, which carries on from the shared state)
 * or through vl_vf_event.
 */
#include "lane.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define VECTOR_MASK ((1 << VL_VECTORS) - 1)
#define RING_INDEX_MASK 0xFFFFu
#define TABLE_DWORDS_PER_ENTRY 4
#define VECTOR_CONTROL 3
#define MASKBIT 1u

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void event(struct vl_vf *vf, int what, int arg)
{
    vf->called_python = 1;
    vl_vf_event(vf->handle, what, arg);
}

/* MsixController.trigger, for the case it decides alone: the gate names an
 * eventfd and the table's mask bit (authoritative only while the client
 * forwards the table) is clear. Everything else is Python's. */
static void msix_trigger(struct vl_vf *vf, int vector)
{
    int64_t fd = vf->gate[VL_GATE_FD + vector];
    if (fd >= 0
        && !(*vf->forwarded
             && vf->dwords[vector * TABLE_DWORDS_PER_ENTRY + VECTOR_CONTROL] & MASKBIT)) {
        uint64_t one = 1;
        ssize_t n = write((int)fd, &one, sizeof(one));
        /* EAGAIN: the counter is saturated, an interrupt is pending there already */
        if (n == (ssize_t)sizeof(one) || (n < 0 && errno == EAGAIN)) {
            vf->gate[VL_GATE_DELIVERED]++;
            return;
        }
    }
    event(vf, VL_EV_TRIGGER, vector);
}

/* InterruptUnit._send: auto-clear and auto-mask as the message leaves. */
static void irq_send(struct vl_vf *vf, int vector)
{
    int64_t *s = vf->irq, bit = (int64_t)1 << vector;
    if (s[VL_IRQ_EIAC] & bit)
        s[VL_IRQ_EICR] &= ~bit & VECTOR_MASK;
    if (s[VL_IRQ_EIAM] & bit)
        s[VL_IRQ_EIMS] &= ~bit & VECTOR_MASK;
    s[VL_IRQ_SENT + vector]++;
    msix_trigger(vf, vector);
}

/* InterruptUnit.try_send, except that a message EITR holds back (or any
 * interval on a clock that is not CLOCK_MONOTONIC) goes to Python, which owns
 * the timers. */
static void irq_try_send(struct vl_vf *vf, int vector)
{
    int64_t *s = vf->irq;
    if (s[VL_IRQ_ARMED + vector])
        return;
    int64_t interval = s[VL_IRQ_INTERVAL + vector];
    if (interval) {
        if (!vf->native_clock) {
            event(vf, VL_EV_TRY_SEND, vector);
            return;
        }
        int64_t now = mono_ns();
        if (s[VL_IRQ_LAST_SENT + vector] + interval - now > 0) {
            event(vf, VL_EV_TRY_SEND, vector);
            return;
        }
        s[VL_IRQ_LAST_SENT + vector] = now;
    }
    irq_send(vf, vector);
}

/* Send each vector of `ready`, lowest first (as InterruptUnit does). */
static void irq_send_ready(struct vl_vf *vf, int64_t ready)
{
    for (int v = 0; v < VL_VECTORS; v++)
        if (ready >> v & 1)
            irq_try_send(vf, v);
}

static void irq_raise(struct vl_vf *vf, int64_t bits)
{
    bits &= VECTOR_MASK;
    if (!bits)
        return;
    vf->irq[VL_IRQ_EICR] |= bits;
    irq_send_ready(vf, bits & vf->irq[VL_IRQ_EIMS]);
}

/* ----------------------------------------------------------------- TX */

static void book_tx(struct vl_vf *vf, const struct vl_tx_job *job)
{
    vf->tx_frames += job->frames;
    vf->tx_octets += job->octets;
    vf->tx_tso_frames += job->tso_frames;
    vf->tx_tso_segments += job->tso_segments;
    vf->tx_csum_frames += job->csum_frames;
    vf->tx_eagain += job->send_eagain;
    vf->tx_enobufs += job->send_enobufs;
    if (job->send_errno)
        event(vf, VL_EV_TX_ERRNO, job->send_errno);
}

/* A packet's RS descriptors have DD: raise the TX cause now, before it is sent. */
static void tx_completed(void *arg)
{
    struct vl_vf *vf = arg;
    irq_raise(vf, vf->irq[VL_IRQ_TX_BITS]);
}

/* VfCore._write_tdt; 0 when Python must walk (what C sent stays sent). */
static int write_tdt(struct vl_vf *vf, uint32_t value)
{
    uint32_t *ring = vf->tx_ring;
    ring[VL_RING_TAIL] = value & RING_INDEX_MASK;
    struct vl_tx_job *job = vf->tx;
    if (!vf->tx_ready || !job)
        return 0;
    uint32_t n = job->ring_n, head = ring[VL_RING_HEAD], tail = ring[VL_RING_TAIL];
    if (!n || head >= n || tail >= n)
        return 0; /* Python counts tx_ring_pointer */
    uint32_t pending = (tail + n - head) % n;
    if (!pending)
        return 1;
    if (pending > vf->tx_budget)
        return 0; /* Python walks it in bounded steps */
    job->head = head;
    job->tail = tail;
    job->on_complete = tx_completed;
    job->complete_arg = vf;
    vl_tx_walk(job);
    job->on_complete = NULL; /* a walk Python starts raises the cause itself */
    book_tx(vf, job);
    if (job->consumed)
        ring[VL_RING_HEAD] = (head + job->consumed) % n;
    return job->consumed == pending;
}

/* ----------------------------------------------------------------- RX */

/* Whether C may run RX now: Python checked the ring when it published it;
 * head and tail (written since) must still be inside it, and the guest map
 * loaded (it is emptied before every unmap). */
static int rx_usable(const struct vl_vf *vf)
{
    const struct vl_rx_job *job = vf->rx;
    if (!vf->rx_ready || !job || !job->mem->n)
        return 0;
    uint32_t n = job->ring_n;
    return n && vf->rx_ring[VL_RING_HEAD] < n && vf->rx_ring[VL_RING_TAIL] < n;
}

/* RxQueue.poll on a usable ring; the descriptors written back. */
static int rx_poll(struct vl_vf *vf, int budget)
{
    struct vl_rx_job *job = vf->rx;
    uint32_t *ring = vf->rx_ring;
    job->head = ring[VL_RING_HEAD];
    job->tail = ring[VL_RING_TAIL];
    job->budget = budget;
    vl_rx_poll(job);
    ring[VL_RING_HEAD] = job->head_out;
    vf->rx_frames += job->frames;
    vf->rx_octets += job->octets;
    vf->rx_multicast += job->multicast;
    vf->rx_csum_good += job->csum_good;
    vf->rx_csum_errors += job->csum_errors;
    for (int i = 0; i < VL_RX_DROPS; i++)
        vf->rx_drops[i] += job->drops[i];
    vf->rx_short += job->short_reads;
    if (job->read_errno)
        event(vf, VL_EV_RX_ERRNO, job->read_errno);
    if (job->stop == VL_RX_STOP_RING_DMA)
        event(vf, VL_EV_RX_DRAIN, job->left);
    return (int)job->written;
}

/* VfCore._write_rdt. */
static int write_rdt(struct vl_vf *vf, uint32_t value)
{
    vf->rx_ring[VL_RING_TAIL] = value & RING_INDEX_MASK;
    if (!rx_usable(vf))
        return 0;
    uint32_t n = vf->rx->ring_n;
    if (rx_poll(vf, n <= (1u << 16) ? (int)n : (int)vf->rx_batch))
        irq_raise(vf, vf->irq[VL_IRQ_RX_BITS]);
    return 1;
}

/* Igb82576Vf._on_rx_ready: the tap is readable. 0: Python's turn. */
int vl_vf_rx_event(struct vl_vf *vf)
{
    uint32_t *ring = vf->rx_ring;
    if (!rx_usable(vf) || ring[VL_RING_HEAD] == ring[VL_RING_TAIL])
        return 0;
    vf->rx_wakeups++;
    /* The cause goes up with the first frame, as on the hardware: the guest's
     * NAPI poll can start while the rest of the batch is copied. */
    if (rx_poll(vf, 1)) {
        irq_raise(vf, vf->irq[VL_IRQ_RX_BITS]);
        if (rx_usable(vf) && rx_poll(vf, (int)vf->rx_batch - 1))
            irq_raise(vf, vf->irq[VL_IRQ_RX_BITS]);
    }
    if (vf->rx_ready && ring[VL_RING_HEAD] == ring[VL_RING_TAIL])
        event(vf, VL_EV_RX_FULL, 0);
    return 1;
}

/* ------------------------------------------------------- register writes */

/* A posted DWORD write to the register BAR: 1 when served here, 0 when it is
 * Python's (which then applies it in full from the shared state). */
int vl_vf_write(struct vl_vf *vf, uint64_t offset, uint32_t value)
{
    int64_t *s = vf->irq;
    int served;
    if (offset == vf->tdt) {
        served = write_tdt(vf, value);
    } else if (offset == vf->rdt) {
        served = write_rdt(vf, value);
    } else if (offset == vf->eims) {
        /* InterruptUnit.write_eims: a still-pending cause is sent again */
        int64_t bits = value & VECTOR_MASK;
        s[VL_IRQ_EIMS] |= bits;
        irq_send_ready(vf, bits & s[VL_IRQ_EICR]);
        served = 1;
    } else if (offset == vf->eics) {
        irq_raise(vf, value);
        served = 1;
    } else {
        return 0;
    }
    if (served)
        vf->doorbells++;
    return served;
}
