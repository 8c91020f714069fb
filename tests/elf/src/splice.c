/* A parser and a verdict over BTF-defined maps: every segment a message, routed to
 * key (first byte % 2) + 1, and counted. */
#include "mini_bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} sock_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("sk_skb/stream_parser")
int parse(struct __sk_buff *skb)
{
	return skb->len;
}

SEC("sk_skb/stream_verdict")
int route(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u8 first = 0;
	__u64 *n = bpf_map_lookup_elem(&counts, &zero);

	if (n)
		__sync_fetch_and_add(n, 1);
	if (bpf_skb_load_bytes(skb, 0, &first, 1))
		return SK_DROP;
	return bpf_sk_redirect_map(skb, &sock_map, (first % 2) + 1, 0);
}

char _license[] SEC("license") = "GPL";
