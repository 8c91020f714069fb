/* Legacy "maps" section, an SK_MSG verdict and a sock_ops program. */
#include "mini_bpf.h"

struct bpf_map_def SEC("maps") msg_map = {
	.type = BPF_MAP_TYPE_SOCKMAP,
	.key_size = 4,
	.value_size = 4,
	.max_entries = 2,
};

SEC("sk_msg")
int msg_to_one(struct sk_msg_md *msg)
{
	return bpf_msg_redirect_map(msg, &msg_map, 1, 0);
}

SEC("sockops")
int add_established(struct bpf_sock_ops *skops)
{
	__u32 key = 0;

	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		bpf_sock_map_update(skops, &msg_map, &key, BPF_ANY);
	return 1;
}

char _license[] SEC("license") = "GPL";
