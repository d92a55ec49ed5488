//! Where two copies of a group's history fork. A history is a run of records, each written under
//! the generation of the primary that wrote it; its lineage lists where each generation starts.
//! Only one primary ever holds a generation, so two records with the same seq and generation are
//! the same record, and two histories agree exactly as far as their generations agree seq by
//! seq. The chain hash at the fork point then confirms it (the sender checks it at the
//! handshake), so a bug or a forged lineage cannot make a site overwrite history silently.

use tidemark_journal::{GenerationStart, Seq};

/// The generation that wrote `seq` according to `lineage` (`None` before its first entry).
pub fn generation_at(lineage: &[GenerationStart], seq: Seq) -> Option<u64> {
    lineage.iter().rev().find(|g| g.first_seq <= seq).map(|g| g.generation)
}

/// The last seq both histories hold identically: `ours` ending at `our_last`, `theirs` at
/// `their_last`. Records of ours after it are a divergent tail (if theirs is the newer
/// generation); records of theirs after it are what we lack.
pub fn fork_point(
    ours: &[GenerationStart],
    our_last: Seq,
    theirs: &[GenerationStart],
    their_last: Seq,
) -> Seq {
    let end = our_last.min(their_last);
    let mut starts: Vec<Seq> = ours.iter().chain(theirs).map(|g| g.first_seq).filter(|s| *s <= end).collect();
    starts.push(Seq(1));
    starts.sort_unstable();
    starts.dedup();
    for s in starts {
        if s.0 == 0 {
            continue;
        }
        if generation_at(ours, s) != generation_at(theirs, s) {
            return Seq(s.0 - 1);
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lineage(steps: &[(u64, u64)]) -> Vec<GenerationStart> {
        steps
            .iter()
            .map(|&(generation, first)| GenerationStart { generation, first_seq: Seq(first) })
            .collect()
    }

    #[test]
    fn the_same_lineage_agrees_up_to_the_shorter_history() {
        let l = lineage(&[(1, 1)]);
        assert_eq!(fork_point(&l, Seq(10), &l, Seq(15)), Seq(10));
        assert_eq!(fork_point(&l, Seq(15), &l, Seq(10)), Seq(10));
        assert_eq!(fork_point(&l, Seq(0), &l, Seq(10)), Seq(0));
    }

    #[test]
    fn a_takeover_forks_where_the_new_generation_starts() {
        // The old primary wrote up to 15 under generation 1; the partner took over after 10.
        let old = lineage(&[(1, 1)]);
        let new = lineage(&[(1, 1), (2, 11)]);
        assert_eq!(fork_point(&old, Seq(15), &new, Seq(30)), Seq(10));
        assert_eq!(fork_point(&new, Seq(30), &old, Seq(15)), Seq(10));
        // The new primary has written nothing yet: still a fork at 10.
        assert_eq!(fork_point(&old, Seq(15), &new, Seq(10)), Seq(10));
        // The old primary never got past the fork: no divergent tail.
        assert_eq!(fork_point(&old, Seq(8), &new, Seq(30)), Seq(8));
    }

    #[test]
    fn after_several_role_changes_the_newest_shared_generation_decides() {
        // Swap at 10 (gen 2), takeover by the other site at 20 (gen 3); one site kept writing
        // generation 2 up to 25.
        let a = lineage(&[(1, 1), (2, 11)]);
        let b = lineage(&[(1, 1), (2, 11), (3, 21)]);
        assert_eq!(fork_point(&a, Seq(25), &b, Seq(40)), Seq(20));
        // Histories that split at the very start share nothing.
        let c = lineage(&[(5, 1)]);
        assert_eq!(fork_point(&a, Seq(25), &c, Seq(40)), Seq(0));
    }
}
