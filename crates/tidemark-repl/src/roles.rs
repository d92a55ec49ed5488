//! The role decisions of the replication handshake and of a planned swap, as pure functions of
//! what each side durably knows (see docs/rfcs/001-role-fencing.md). The site's sessions and the
//! role simulation test call the same functions, so what is simulated is what runs.

use tidemark_journal::{ChainHash, Seq};

use crate::lineage::{fork_point, generation_at};
use crate::wire::GroupPosition;

/// What a site knows of its own copy of a group, from its control file and journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRole {
    /// Whether it is primary here.
    pub primary: bool,
    /// Newest generation known here.
    pub generation: u64,
}

/// What the receiving side of a handshake does with the partner's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfferDecision {
    /// The offer comes from a deposed primary (an older generation): answer with our position,
    /// which fences it, and stop.
    StandDown,
    /// Both sides claim the primary role under one generation. This cannot happen if fencing
    /// works; nothing is changed, and an operator must look.
    Conflict,
    /// Follow the partner: demote first if primary here, then, if our history runs past the
    /// fork point into a generation the partner's history does not continue with, keep that
    /// tail aside and rewind to `rewind_to`; finally take the partner's lineage.
    Follow {
        /// Demote (this site was primary under an older generation: it is fenced).
        demote: bool,
        /// Cut our history after this seq (failback).
        rewind_to: Option<Seq>,
    },
}

/// Decide what to do with `offer`, given our role and our position (`ours`).
pub fn on_offer(local: &LocalRole, ours: &GroupPosition, offer: &GroupPosition) -> OfferDecision {
    if offer.generation < local.generation {
        return OfferDecision::StandDown;
    }
    if offer.generation == local.generation && local.primary {
        return OfferDecision::Conflict;
    }
    let fork = fork_point(&ours.generations, ours.last_seq, &offer.generations, offer.last_seq);
    // Our records after the fork belong to a generation the partner's history does not continue
    // with: the partner (whose generation is at least ours) supersedes them. If instead they are
    // of the very generation the partner's history continues with, the partner is simply behind
    // us in one history (it lost data): that is never rewound; the sender reports divergence.
    let after = Seq(fork.0 + 1);
    let forked = generation_at(&offer.generations, after) != generation_at(&ours.generations, after);
    let rewind_to = (ours.last_seq > fork && forked).then_some(fork);
    OfferDecision::Follow { demote: local.primary, rewind_to }
}

/// How a primary settles a swap it started and never heard the end of, once it hears the
/// partner's generation again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingSwap {
    /// The partner took the role: demote under its generation.
    Finish {
        /// The partner's generation.
        generation: u64,
    },
    /// The partner never took it: call the swap off and admit writes again.
    CallOff,
}

/// Settle a pending swap to `pending_generation` given the partner's current generation.
pub fn settle_swap(pending_generation: u64, partner_generation: u64) -> PendingSwap {
    if partner_generation >= pending_generation {
        PendingSwap::Finish { generation: partner_generation }
    } else {
        PendingSwap::CallOff
    }
}

/// Whether a secondary may take the primary role in a swap: its history must end exactly where
/// the primary's does, durably, with the same chain hash.
pub fn may_take_swap(ours: &GroupPosition, last_seq: Seq, chain: &ChainHash) -> bool {
    ours.last_seq == last_seq && ours.chain == *chain && ours.durable_seq >= last_seq
}

#[cfg(test)]
mod tests {
    use tidemark_journal::GenerationStart;

    use super::*;

    fn position(generation: u64, last: u64, lineage: &[(u64, u64)]) -> GroupPosition {
        GroupPosition {
            group_id: 1,
            generation,
            last_seq: Seq(last),
            chain: ChainHash([0; 32]),
            durable_seq: Seq(last),
            generations: lineage
                .iter()
                .map(|&(generation, s)| GenerationStart { generation, first_seq: Seq(s) })
                .collect(),
        }
    }

    #[test]
    fn an_older_generation_stands_down_and_an_equal_primary_is_a_conflict() {
        let ours = position(2, 10, &[(1, 1), (2, 6)]);
        let primary = LocalRole { primary: true, generation: 2 };
        assert_eq!(on_offer(&primary, &ours, &position(1, 12, &[(1, 1)])), OfferDecision::StandDown);
        assert_eq!(on_offer(&primary, &ours, &position(2, 12, &[(1, 1), (2, 6)])), OfferDecision::Conflict);
    }

    #[test]
    fn a_returning_primary_demotes_and_rewinds_to_the_fork() {
        let ours = position(1, 15, &[(1, 1)]);
        let offer = position(2, 30, &[(1, 1), (2, 11)]);
        let old = LocalRole { primary: true, generation: 1 };
        assert_eq!(
            on_offer(&old, &ours, &offer),
            OfferDecision::Follow { demote: true, rewind_to: Some(Seq(10)) }
        );
        // A secondary behind the fork needs no rewind.
        let behind = position(1, 8, &[(1, 1)]);
        let secondary = LocalRole { primary: false, generation: 1 };
        assert_eq!(
            on_offer(&secondary, &behind, &offer),
            OfferDecision::Follow { demote: false, rewind_to: None }
        );
    }

    #[test]
    fn a_newer_primary_supersedes_a_tail_even_when_its_own_history_goes_through_an_older_generation() {
        // We hold generation 4 from seq 3 on; the partner took over under generation 5 from a
        // history that went through generation 3 at seq 3 (an operator forced it). Generation 5
        // wins: our generation-4 tail is kept aside and cut.
        let ours = position(5, 3, &[(1, 1), (2, 2), (4, 3)]);
        let offer = position(5, 7, &[(1, 1), (2, 2), (3, 3), (5, 8)]);
        let secondary = LocalRole { primary: false, generation: 5 };
        assert_eq!(
            on_offer(&secondary, &ours, &offer),
            OfferDecision::Follow { demote: false, rewind_to: Some(Seq(2)) }
        );
    }

    #[test]
    fn a_copy_ahead_in_the_same_lineage_is_never_rewound() {
        // Our history is longer than the primary's with the same generations: that is not a
        // superseded tail (the primary lost data); the sender will report divergence instead.
        let ours = position(1, 20, &[(1, 1)]);
        let offer = position(1, 15, &[(1, 1)]);
        let secondary = LocalRole { primary: false, generation: 1 };
        assert_eq!(
            on_offer(&secondary, &ours, &offer),
            OfferDecision::Follow { demote: false, rewind_to: None }
        );
    }

    #[test]
    fn a_pending_swap_finishes_only_if_the_partner_took_the_role() {
        assert_eq!(settle_swap(3, 3), PendingSwap::Finish { generation: 3 });
        assert_eq!(settle_swap(3, 4), PendingSwap::Finish { generation: 4 });
        assert_eq!(settle_swap(3, 2), PendingSwap::CallOff);
    }
}
