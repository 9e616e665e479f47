/* sk_lookup entry program for the node agent's capture (design: bpf/README.md).
 *
 * Policy routing in the node's network namespace makes TCP from enrolled pods, and TCP towards
 * enrolled pods' addresses, local. This program runs on the socket lookup of every such packet
 * that does not belong to an established connection and picks the agent's listener:
 *   from an enrolled pod's veth            -> outbound listener (original destination preserved)
 *   to an enrolled pod, port ZT_HBONE_PORT -> HBONE listener
 *   to an enrolled pod, any other port     -> inbound plaintext listener
 *   anything else                          -> SK_PASS without a socket: normal lookup
 * Captured traffic without a listener is dropped, never passed: it must not reach anything but the
 * agent (fail closed).
 *
 * Compile-time constants come from cflags: -DZT_HBONE_PORT, and for BPF_PROG_TEST_RUN (which can
 * not set ingress_ifindex) -DZT_TEST_INGRESS_IFINDEX.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "capture.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#define ZT_LOOPBACK_IFINDEX 1

BPF_TABLE("sockmap", u32, u64, zt_listeners, ZT_SLOT_COUNT);
BPF_HASH(zt_pod_ips, u32, struct zt_pod_ip, ZT_MAX_POD_IPS);
BPF_HASH(zt_ifaces, u32, struct zt_iface, ZT_MAX_IFACES);
BPF_ARRAY(zt_counters, u64, ZT_CNT_COUNT);
BPF_ARRAY(zt_meta, u64, ZT_META_COUNT);

static __always_inline void zt_count(u32 idx)
{
    u64 *c = zt_counters.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
}

/* Assign the listener in `slot`; no listener (agent down) or a refused one drops the packet. */
static __always_inline int zt_assign(struct bpf_sk_lookup *ctx, u32 slot, u32 counter)
{
    struct bpf_sock *sk = (struct bpf_sock *)zt_listeners.lookup(&slot);
    if (!sk) {
        zt_count(ZT_CNT_DROP_NO_LISTENER);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        zt_count(ZT_CNT_DROP_ASSIGN);
        return SK_DROP;
    }
    zt_count(counter);
    return SK_PASS;
}

int zt_sk_lookup(struct bpf_sk_lookup *ctx)
{
    /* Only IPv4 TCP is captured (the routing rules match ipproto tcp only); the rest is not ours. */
    if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP) {
        zt_count(ZT_CNT_PASS);
        return SK_PASS;
    }
#ifdef ZT_TEST_INGRESS_IFINDEX
    u32 ifindex = ZT_TEST_INGRESS_IFINDEX;
#else
    u32 ifindex = ctx->ingress_ifindex;
#endif
    u32 src = ctx->remote_ip4;
    u32 dst = ctx->local_ip4;

    struct zt_pod_ip *src_pod = zt_pod_ips.lookup(&src);
    struct zt_iface *iface = zt_ifaces.lookup(&ifindex);
    if (iface) {
        /* From an enrolled pod: the source must be one of that pod's own addresses, so the agent
         * can trust the source address to name the workload. */
        if (!src_pod || src_pod->ifindex != ifindex) {
            zt_count(ZT_CNT_DROP_SPOOF);
            return SK_DROP;
        }
        return zt_assign(ctx, ZT_SLOT_OUTBOUND, ZT_CNT_OUTBOUND);
    }
    /* An enrolled pod's address arriving on any other interface is forged. Loopback is exempt:
     * only the node itself (the agent, root in this namespace) can originate that. */
    if (src_pod && ifindex != ZT_LOOPBACK_IFINDEX) {
        zt_count(ZT_CNT_DROP_SPOOF);
        return SK_DROP;
    }
    struct zt_pod_ip *dst_pod = zt_pod_ips.lookup(&dst);
    if (!dst_pod) {
        zt_count(ZT_CNT_PASS);
        return SK_PASS;
    }
    if (ctx->local_port == ZT_HBONE_PORT)
        return zt_assign(ctx, ZT_SLOT_HBONE, ZT_CNT_HBONE);
    return zt_assign(ctx, ZT_SLOT_INBOUND, ZT_CNT_INBOUND);
}
