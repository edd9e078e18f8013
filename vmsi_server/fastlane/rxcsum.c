/* Receive checksum offload of the 82576: what the hardware reports per frame.
 *
 * The hardware checks the IPv4 header checksum and the TCP/UDP checksum of
 * every frame it receives and reports the result in the descriptor's
 * status/error bits (IPCS, TCPCS/UDPCS; IPE, TCPE), so that igbvf can mark the
 * skb CHECKSUM_UNNECESSARY instead of summing the payload in the guest, which
 * under TCG is one of the costliest things the guest does per frame. This does
 * the same check in C (a 1500-byte frame is well under a microsecond here).
 *
 * A frame is only ever reported good when its checksums were verified here,
 * or when the host kernel said it verified them (VIRTIO_NET_HDR_F_DATA_VALID).
 * IP fragments, IPv6 extension headers and anything that is not IPv4/IPv6
 * carrying TCP/UDP get no L4 bits, as on the hardware.
 */
#include "lane.h"

#include <string.h>

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define VNET_F_DATA_VALID 2

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* Ones' complement sum of big-endian 16-bit words (not folded). */
static uint64_t sum16(const uint8_t *p, uint32_t len, uint64_t acc)
{
    while (len >= 8) {
        acc += (uint64_t)be16(p) + be16(p + 2) + be16(p + 4) + be16(p + 6);
        p += 8;
        len -= 8;
    }
    while (len >= 2) {
        acc += be16(p);
        p += 2;
        len -= 2;
    }
    if (len)
        acc += (uint64_t)p[0] << 8;
    return acc;
}

static uint16_t fold(uint64_t acc)
{
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)acc;
}

/* Status bits for the L4 segment [l4, l4 + l4len) given its pseudo-header sum. */
static uint32_t l4_status(const uint8_t *l4, uint32_t l4len, uint8_t proto, uint64_t pseudo,
                          int trusted)
{
    if (proto == IPPROTO_TCP) {
        if (l4len < 20)
            return 0;
        if (trusted || fold(sum16(l4, l4len, pseudo)) == 0xFFFF)
            return VL_RXD_STAT_TCPCS;
        return VL_RXD_STAT_TCPCS | VL_RXD_ERR_TCPE;
    }
    if (proto == IPPROTO_UDP) {
        if (l4len < 8)
            return 0;
        if (trusted || be16(l4 + 6) == 0 || fold(sum16(l4, l4len, pseudo)) == 0xFFFF)
            return VL_RXD_STAT_UDPCS;
        return VL_RXD_STAT_UDPCS | VL_RXD_ERR_TCPE;
    }
    return 0;
}

uint32_t vl_rx_checksum(const uint8_t *frame, uint32_t len, uint32_t vnet_flags)
{
    int trusted = (vnet_flags & VNET_F_DATA_VALID) != 0;
    uint32_t off = ETH_HLEN;
    if (len < ETH_HLEN)
        return 0;
    uint16_t type = be16(frame + 12);
    if (type == ETH_P_8021Q) {
        if (len < ETH_HLEN + 4)
            return 0;
        type = be16(frame + 16);
        off += 4;
    }
    const uint8_t *ip = frame + off;
    uint32_t avail = len - off;
    if (type == ETH_P_IP) {
        if (avail < 20 || ip[0] >> 4 != 4)
            return 0;
        uint32_t ihl = (uint32_t)(ip[0] & 0xF) * 4;
        uint32_t total = be16(ip + 2);
        if (ihl < 20 || total < ihl || total > avail)
            return 0;
        if (fold(sum16(ip, ihl, 0)) != 0xFFFF)
            return VL_RXD_STAT_IPCS | VL_RXD_ERR_IPE;
        uint32_t status = VL_RXD_STAT_IPCS;
        if (be16(ip + 6) & 0x3FFF) /* more fragments or an offset: no L4 check */
            return status;
        uint32_t l4len = total - ihl;
        uint64_t pseudo = sum16(ip + 12, 8, 0) + ip[9] + l4len;
        return status | l4_status(ip + ihl, l4len, ip[9], pseudo, trusted);
    }
    if (type == ETH_P_IPV6) {
        if (avail < 40 || ip[0] >> 4 != 6)
            return 0;
        uint32_t l4len = be16(ip + 4);
        if (l4len > avail - 40)
            return 0;
        uint8_t next = ip[6]; /* extension headers: not checked, as the hardware */
        uint64_t pseudo = sum16(ip + 8, 32, 0) + next + l4len;
        return l4_status(ip + 40, l4len, next, pseudo, trusted);
    }
    return 0;
}
