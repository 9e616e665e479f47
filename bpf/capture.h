/* The one ABI between the sk_lookup program (bpf/capture.c) and user space (bpf/abi.py mirrors it;
 * tests/kernel/test_abi.py checks the mirror). Change both together and bump ZT_ABI_VERSION: a
 * restarted agent compares the pinned zt_meta[ZT_META_ABI] with its own and reloads on mismatch.
 *
 * Plain C with fixed-width types only, so the Python side can mirror it with ctypes.
 */
#ifndef ZTAGENT_CAPTURE_H
#define ZTAGENT_CAPTURE_H

#define ZT_ABI_VERSION 1

/* Ports. ZT_HBONE_PORT may be overridden at load with -DZT_HBONE_PORT=<n> (never text templating). */
#ifndef ZT_HBONE_PORT
#define ZT_HBONE_PORT 15008
#endif

/* zt_listeners (BPF_MAP_TYPE_SOCKMAP, key u32 slot, value u64: fd on update, socket cookie on lookup). */
#define ZT_SLOT_OUTBOUND 0 /* pod-originated TCP, any destination (agent port 15001) */
#define ZT_SLOT_INBOUND 1  /* plaintext TCP from outside towards an enrolled pod (15006) */
#define ZT_SLOT_HBONE 2    /* TCP to <enrolled pod ip>:ZT_HBONE_PORT from outside the pod (15008) */
#define ZT_SLOT_COUNT 3

/* zt_pod_ips: key u32 IPv4 address in network byte order -> struct zt_pod_ip. */
#define ZT_MAX_POD_IPS 8192
/* zt_ifaces: key u32 ifindex of an enrolled pod's host-side veth -> struct zt_iface. */
#define ZT_MAX_IFACES 4096

/* zt_counters (BPF_MAP_TYPE_ARRAY of u64): one slot per verdict reason. */
#define ZT_CNT_OUTBOUND 0          /* assigned to the outbound listener */
#define ZT_CNT_INBOUND 1           /* assigned to the inbound plaintext listener */
#define ZT_CNT_HBONE 2             /* assigned to the HBONE listener */
#define ZT_CNT_DROP_SPOOF 3        /* an enrolled pod's address seen on the wrong interface, or a
                                      foreign address on an enrolled pod's interface */
#define ZT_CNT_DROP_NO_LISTENER 4  /* captured, but the agent has no listener in the slot (agent down) */
#define ZT_CNT_DROP_ASSIGN 5       /* bpf_sk_assign refused the listener (wrong socket kind) */
#define ZT_CNT_PASS 6              /* not ours: normal socket lookup */
#define ZT_CNT_COUNT 8

/* zt_meta (BPF_MAP_TYPE_ARRAY of u64), written once by the loader. */
#define ZT_META_ABI 0        /* ZT_ABI_VERSION of the loaded program */
#define ZT_META_HBONE_PORT 1 /* ZT_HBONE_PORT it was compiled with */
#define ZT_META_COUNT 4

struct zt_pod_ip {
    __u32 ifindex; /* the pod's host-side veth: the only interface this address may arrive on */
    __u32 flags;   /* reserved, 0 */
};

struct zt_iface {
    __u32 flags;    /* reserved, 0 */
    __u32 reserved; /* 0 */
};

#endif /* ZTAGENT_CAPTURE_H */
