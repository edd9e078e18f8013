/* The compiled fast lane: the shared declarations of lane.c and the cffi module.
 *
 * Everything a Python caller touches is declared here; build.py hands the
 * same text (between the CDEF markers) to cffi's cdef, so the two cannot drift;
 * vl_posted_write is the one call back into Python (defined by cffi).
 */
#ifndef VMSI_FASTLANE_H
#define VMSI_FASTLANE_H

#include <stdint.h>
#include <stddef.h>

#ifndef VL_CALLBACK
#define VL_CALLBACK extern /* cffi's cdef reads it as extern "Python+C" */
#endif

/* CDEF-BEGIN */
#define VL_MAX_WINDOWS 8
#define VL_MAX_MASK_WINDOWS 2
#define VL_MAX_RULES 4
#define VL_CLASSES 3
#define VL_MSG_BUCKETS 32
#define VL_ACCESS_BUCKETS 64
#define VL_MAX_FDS 1024

/* A window answers reads of [start, start + length) of one region from memory
 * the device keeps current (config space, the MSI-X shadow, the PBA). */
enum vl_window_mode {
    VL_BYTES = 0,      /* any size and alignment */
    VL_MSIX_TABLE = 1, /* aligned DWORD/QWORD; class 0 QWORD, 1 Vector Control, 2 address/data */
    VL_MSIX_PBA = 2    /* aligned DWORD/QWORD; class 0 */
};

struct vl_window {
    uint32_t region;
    uint32_t mode;
    uint32_t enabled;
    uint32_t timed;    /* also fill the per-class latency buckets */
    uint64_t start;
    uint64_t length;
    const uint8_t *bytes;
    uint64_t served[VL_CLASSES];
    uint64_t ns_total[VL_CLASSES];
    uint64_t ns_min[VL_CLASSES];
    uint64_t ns_max[VL_CLASSES];
    uint64_t buckets[VL_CLASSES][VL_ACCESS_BUCKETS];
};

/* A mask window takes posted DWORD writes of MSI-X Vector Control: the fast
 * path's mask-bit tracking. Only while *armed (the device says its mask bits
 * are authoritative) and only when the write needs no delivery: masking, or
 * unmasking a vector whose pending bit is clear. Anything else goes to Python. */
struct vl_mask_window {
    uint32_t region;
    uint32_t timed;
    uint64_t start;
    uint64_t length;
    uint32_t writable;        /* the bits of Vector Control software may write */
    uint32_t *dwords;         /* the shadow table, written in place */
    const uint8_t *pending;   /* the PBA image */
    const uint32_t *armed;
    uint64_t served;
    uint64_t ns_total;
    uint64_t ns_min;
    uint64_t ns_max;
    uint64_t buckets[VL_ACCESS_BUCKETS];
};

/* A register rule applies posted DWORD writes of one register in place. */
enum vl_rule_kind {
    VL_SET_UNLESS_READY = 0, /* *target |= v & mask, unless v & mask & *guard: Python's */
    VL_CLEAR = 1             /* *target &= ~(v & mask) */
};

struct vl_rule {
    uint32_t region;
    uint32_t kind;
    uint32_t mask;
    uint32_t pad;
    uint64_t offset;
    int64_t *target;
    const int64_t *guard;
    uint64_t served;
};

struct vl_lane {
    int fd;
    uint32_t enabled;        /* Python sets it: READY, nothing buffered on its side */
    uint32_t attached;       /* cleared by vl_poller_remove, checked after every callback */
    uint32_t max_xfer;
    void *handle;            /* the Python session (ffi.new_handle) */
    /* what the lane read but could not serve, for Python to take */
    uint8_t *buf;
    size_t cap;
    size_t pending_start;
    size_t pending_end;
    int fds[VL_MAX_FDS];
    int nfds;
    int eof;
    int error;               /* errno of a failed recv/send, for Python to report */
    /* service time of every REGION_READ served here, MessageCounters buckets */
    uint64_t reads;
    uint64_t read_ns_total;
    uint64_t read_buckets[VL_MSG_BUCKETS];
    /* the same for posted REGION_WRITEs applied here (mask windows) */
    uint64_t writes;
    uint64_t write_ns_total;
    uint64_t write_buckets[VL_MSG_BUCKETS];
    uint64_t posted_writes;  /* handed to the Python callback */
    uint64_t wakeups;        /* reads from the socket */
    int nwindows;
    struct vl_window windows[VL_MAX_WINDOWS];
    int nmasks;
    struct vl_mask_window masks[VL_MAX_MASK_WINDOWS];
    int nrules;
    struct vl_rule rules[VL_MAX_RULES];
    struct vl_vf *vf;        /* the device's hot path, or NULL */
    uint64_t vf_writes;      /* posted writes vf.c served */
};

struct vl_lane *vl_lane_new(int fd, size_t read_size);
void vl_lane_free(struct vl_lane *lane);
void vl_lane_clear_pending(struct vl_lane *lane);

struct vl_poller;
struct vl_poller *vl_poller_new(int epfd);
void vl_poller_free(struct vl_poller *poller);
int vl_poller_add(struct vl_poller *poller, struct vl_lane *lane);
void vl_poller_remove(struct vl_poller *poller, int fd);
int vl_poller_wait(struct vl_poller *poller, int64_t timeout_ns, int *out_fds,
                   uint32_t *out_events, int max_out);

/* rxcsum.c: the status/error bits of the receive checksum offload for one frame. */
#define VL_RXD_STAT_UDPCS 16
#define VL_RXD_STAT_TCPCS 32
#define VL_RXD_STAT_IPCS 64
#define VL_RXD_ERR_TCPE 536870912
#define VL_RXD_ERR_IPE 1073741824
uint32_t vl_rx_checksum(const uint8_t *frame, uint32_t len, uint32_t vnet_flags);

/* The guest's memory as compiled code reaches it: host pointers of the
 * server's own mmaps of the DMA_MAP fds (see fastlane/guestmap.py). */
#define VL_MAX_MAPS 64
struct vl_map {
    uint64_t iova;
    uint64_t size;
    uint8_t *host;
    uint32_t writable;
    uint32_t pad;
};
struct vl_memmap {
    int n;
    struct vl_map maps[VL_MAX_MAPS];
};
uint8_t *vl_guest_ptr(const struct vl_memmap *mem, uint64_t iova, uint64_t len, int write);

/* rx.c: RX queue 0 over a tap, the loop of RxQueue._poll. */
#define VL_RX_DROPS 5
enum vl_rx_drop {
    VL_RX_DROP_GSO = 0,
    VL_RX_DROP_OVERSIZE = 1,
    VL_RX_DROP_RUNT = 2,
    VL_RX_DROP_FILTERED = 3,
    VL_RX_DROP_BAD_BUFFER = 4
};
enum vl_rx_stop {
    VL_RX_STOP_DONE = 0,     /* budget used or ring full */
    VL_RX_STOP_EMPTY = 1,    /* the tap had no more frames (or a read failed) */
    VL_RX_STOP_RING_DMA = 2  /* descriptors outside guest memory: Python drains `left` */
};

struct vl_rx_job {
    /* in */
    int tapfd;
    uint32_t ring_n;
    uint64_t ring_base;
    uint32_t head;
    uint32_t tail;
    uint32_t buflen;
    int32_t budget;
    uint32_t check_csum;
    uint32_t has_unicast;
    uint32_t filter;          /* ask vl_rx_accepts for frames not to the unicast MAC */
    uint8_t unicast[8];
    void *handle;
    const struct vl_memmap *mem;
    /* out (vl_rx_poll zeroes them first) */
    uint32_t head_out;
    int32_t left;
    int32_t stop;
    uint32_t written;
    uint32_t frames;
    uint32_t multicast;
    uint64_t octets;
    uint32_t csum_good;
    uint32_t csum_errors;
    uint32_t drops[VL_RX_DROPS];
    int32_t read_errno;
    uint32_t short_reads;
};
int vl_rx_poll(struct vl_rx_job *job);
VL_CALLBACK int vl_rx_accepts(void *handle, const uint8_t *mac);

/* tx.c: TX queue 0 over a tap, the common packets of TxQueue._walk. */
#define VL_VNET_HDR_LEN 10
struct vl_tx_job {
    /* in */
    int tapfd;
    uint32_t ring_n;
    uint64_t ring_base;
    uint32_t head;
    uint32_t tail;
    const struct vl_memmap *mem;
    /* in and out: the last context descriptor */
    uint32_t have_ctx;
    uint8_t ctx_raw[16];
    /* in: when set, each packet is copied out of guest memory, completed (DD)
     * and announced through it before it is sent (vf.c raises the TX cause) */
    void (*on_complete)(void *arg);
    void *complete_arg;
    /* out (vl_tx_walk zeroes them first) */
    uint32_t consumed;       /* descriptors done: TDH moves by this much */
    uint32_t completed;      /* RS descriptors given DD */
    uint32_t packets;
    uint32_t ctx_changed;
    uint32_t frames;         /* on the wire (TSO segments counted) */
    uint64_t octets;
    uint32_t tso_frames;
    uint32_t tso_segments;
    uint32_t csum_frames;
    uint32_t send_eagain;
    uint32_t send_enobufs;
    int32_t send_errno;
};
int vl_tx_walk(struct vl_tx_job *job);

/* vf.c: one VF's hot path: TDT/RDT doorbells, EIMS/EICS, a readable tap, and
 * the interrupt unit's sending down to the MSI-X eventfd, on the buffers the
 * Python objects keep their state in (see fastlane/vfpath.py). */
#define VL_VECTORS 3
#define VL_IRQ_EICR 0
#define VL_IRQ_EIMS 1
#define VL_IRQ_EIAC 2
#define VL_IRQ_EIAM 3
#define VL_IRQ_TX_BITS 4
#define VL_IRQ_RX_BITS 5
#define VL_IRQ_MISC_BITS 6
#define VL_IRQ_INTERVAL 7
#define VL_IRQ_LAST_SENT 10
#define VL_IRQ_ARMED 13
#define VL_IRQ_SENT 16
#define VL_IRQ_DEFERRED 19
#define VL_IRQ_SIZE 22
#define VL_GATE_DELIVERED 0
#define VL_GATE_FD 1
#define VL_RING_HEAD 0
#define VL_RING_TAIL 1

/* What vf.c asks Python to do (vl_vf_event's `what`). */
enum vl_vf_event {
    VL_EV_TRY_SEND = 0,   /* InterruptUnit.try_send(arg): EITR says wait (a timer) */
    VL_EV_TRIGGER = 1,    /* MsixController.trigger(arg): not deliverable here */
    VL_EV_RX_FULL = 2,    /* the RX ring has no free descriptor: stop watching the tap */
    VL_EV_RX_DRAIN = 3,   /* drop arg frames: the ring is outside guest memory */
    VL_EV_RX_ERRNO = 4,   /* a tap read failed with errno arg */
    VL_EV_TX_ERRNO = 5    /* a tap write failed with errno arg */
};

struct vl_vf {
    void *handle;                /* the Python VfPath */
    uint32_t bar;                /* the register BAR's region index */
    uint32_t native_clock;       /* the interrupt unit counts in CLOCK_MONOTONIC */
    uint64_t tdt, rdt, eims, eics;   /* register offsets */
    int64_t *irq;                /* InterruptUnit.state (VL_IRQ_*) */
    int64_t *gate;               /* MsixController.gate (VL_GATE_*) */
    const uint32_t *forwarded;   /* MsixController's "the client writes the table" */
    const uint32_t *dwords;      /* the MSI-X shadow table */
    /* TX queue 0; tx_ready: Python says C may walk it (ring set in tx) */
    uint32_t tx_ready;
    uint32_t tx_budget;
    uint32_t *tx_ring;           /* TxQueue.ring: head, tail */
    struct vl_tx_job *tx;
    /* RX queue 0; rx_ready: ring set in rx, the tap watched */
    uint32_t rx_ready;
    uint32_t rx_batch;
    uint32_t *rx_ring;           /* RxQueue.ring: head, tail */
    struct vl_rx_job *rx;
    uint32_t called_python;      /* an event ran Python code since the lane last looked */
    /* counts, folded into VfStats by Python */
    uint64_t doorbells;          /* TDT/RDT/EIMS/EICS writes served here */
    uint64_t tx_frames;
    uint64_t tx_octets;
    uint64_t tx_tso_frames;
    uint64_t tx_tso_segments;
    uint64_t tx_csum_frames;
    uint64_t tx_eagain;
    uint64_t tx_enobufs;
    uint64_t rx_frames;
    uint64_t rx_octets;
    uint64_t rx_multicast;
    uint64_t rx_csum_good;
    uint64_t rx_csum_errors;
    uint64_t rx_drops[VL_RX_DROPS];
    uint64_t rx_short;
    uint64_t rx_wakeups;
};
int vl_vf_write(struct vl_vf *vf, uint64_t offset, uint32_t value);
int vl_vf_rx_event(struct vl_vf *vf);
VL_CALLBACK int vl_vf_event(void *handle, int what, int arg);
int vl_poller_add_vf(struct vl_poller *poller, int fd, struct vl_vf *vf);
void vl_poller_remove_vf(struct vl_poller *poller, int fd);

VL_CALLBACK int vl_posted_write(void *handle, uint32_t msg_id, uint32_t region,
                                      uint64_t offset, const uint8_t *data, uint32_t count);
/* CDEF-END */

#endif
