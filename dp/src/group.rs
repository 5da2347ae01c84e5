//! The group a rendezvous reply describes, checked before anything is sized by it: the
//! reply comes over the network, so its counts are untrusted until bounded by the job.

use ferry_rpc::proto;

/// The group's peer addresses in rank order, from a rendezvous reply, checked before anything
/// is sized by it: the world size must be within the job's `max_workers`, the rank inside the
/// world, and every listed peer's rank too. Large groups list only the ring neighbours; the
/// other addresses stay empty.
pub(crate) fn group_peers(
    reply: &proto::RendezvousReply,
    max_world: u32,
) -> Result<Vec<String>, String> {
    let world = reply.world_size;
    if world == 0 || world > max_world {
        return Err(format!(
            "world size {world} (the job allows 1 to {max_world} workers)"
        ));
    }
    if reply.rank >= world {
        return Err(format!("rank {} in a world of {world}", reply.rank));
    }
    if reply.peer_ranks.is_empty() {
        if reply.peers.len() != world as usize {
            return Err(format!(
                "{} peer addresses for a world of {world}",
                reply.peers.len()
            ));
        }
        return Ok(reply.peers.clone());
    }
    if reply.peer_ranks.len() != reply.peers.len() {
        return Err(format!(
            "{} peer ranks for {} peer addresses",
            reply.peer_ranks.len(),
            reply.peers.len()
        ));
    }
    let mut all = vec![String::new(); world as usize];
    for (addr, &r) in reply.peers.iter().zip(&reply.peer_ranks) {
        let slot = all
            .get_mut(r as usize)
            .ok_or_else(|| format!("peer rank {r} in a world of {world}"))?;
        *slot = addr.clone();
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(rank: u32, world: u32, peers: &[&str], peer_ranks: &[u32]) -> proto::RendezvousReply {
        proto::RendezvousReply {
            rank,
            world_size: world,
            peers: peers.iter().map(|p| p.to_string()).collect(),
            peer_ranks: peer_ranks.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_full_list_and_a_neighbour_list_give_the_peers_in_rank_order() {
        let full = reply(1, 3, &["a:1", "b:1", "c:1"], &[]);
        assert_eq!(group_peers(&full, 4).unwrap(), ["a:1", "b:1", "c:1"]);
        let neighbours = reply(1, 4, &["a:1", "c:1"], &[0, 2]);
        assert_eq!(group_peers(&neighbours, 4).unwrap(), ["a:1", "", "c:1", ""]);
    }

    /// A world size from the network is bounded by the job before anything is allocated:
    /// u32::MAX peers would be 100 GB of empty strings.
    #[test]
    fn counts_from_the_network_are_bounded_before_anything_is_allocated() {
        let huge = reply(0, u32::MAX, &["a:1", "b:1"], &[0, 1]);
        let e = group_peers(&huge, 8).unwrap_err();
        assert!(
            e.contains("world size 4294967295") && e.contains("1 to 8"),
            "{e}"
        );
        for (bad, says) in [
            (reply(0, 0, &[], &[]), "world size 0"),
            (reply(3, 3, &["a", "b", "c"], &[]), "rank 3 in a world of 3"),
            (
                reply(0, 3, &["a", "b"], &[]),
                "2 peer addresses for a world of 3",
            ),
            (
                reply(0, 3, &["a", "b"], &[1]),
                "1 peer ranks for 2 peer addresses",
            ),
            (
                reply(0, 3, &["a", "b"], &[1, 7]),
                "peer rank 7 in a world of 3",
            ),
        ] {
            let e = group_peers(&bad, 8).unwrap_err();
            assert!(e.contains(says), "{e} (expected {says:?})");
        }
    }
}
