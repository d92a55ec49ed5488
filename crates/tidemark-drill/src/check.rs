//! The checker: given what a copy of a group holds, block by block, and the history of writes
//! it should be a prefix of, decide whether it is one (invariant 3, write-order consistency),
//! where it ends, and which acknowledged writes it lacks. Pure: no I/O, no clock.
//!
//! A copy is consistent when there is a cut in the history such that every block equals the
//! last write to it at or before the cut. The smallest candidate is the newest write the copy
//! holds anywhere (a cut must include it), and a later cut only adds writes that must then be
//! present too, so that one cut is the only one to test. Writes whose fate is unknown (refused,
//! unanswered, or acknowledged without a flush before their site was killed) may be present or
//! not: one that shows in any block counts as applied, so all its blocks must show it unless a
//! later write covers them; one that shows nowhere counts as not applied. A write is atomic in
//! the journal, so a write present in some of its blocks and absent from others is a torn write
//! and is reported.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::pattern::{BlockContent, WorkloadShape, WriteId};

/// The writes of one history, in order: ranges of write ids (inclusive), the last one possibly
/// open (every id from there on, as the workload issues them).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Lineage {
    ranges: Vec<(u64, Option<u64>)>,
}

impl Lineage {
    /// A history holding every write from id 1 on.
    pub fn from_start() -> Lineage {
        Lineage { ranges: vec![(1, None)] }
    }

    /// Whether write `id` belongs to this history.
    pub fn contains(&self, id: WriteId) -> bool {
        self.ranges.iter().any(|&(first, last)| id.0 >= first && last.is_none_or(|last| id.0 <= last))
    }

    /// The history up to and including `id` only (`None`: empty).
    pub fn truncated(&self, id: Option<WriteId>) -> Lineage {
        let Some(id) = id else { return Lineage::default() };
        let ranges = self
            .ranges
            .iter()
            .filter(|(first, _)| *first <= id.0)
            .map(|&(first, last)| (first, Some(last.map_or(id.0, |last| last.min(id.0)))))
            .collect();
        Lineage { ranges }
    }

    /// This history followed by every write from `id` on.
    pub fn continued_from(&self, id: WriteId) -> Lineage {
        let mut ranges: Vec<(u64, Option<u64>)> = self
            .ranges
            .iter()
            .map(|&(first, last)| (first, Some(last.unwrap_or(id.0.saturating_sub(1)))))
            .collect();
        ranges.retain(|&(first, last)| last.is_none_or(|last| last >= first && first < id.0));
        ranges.push((id.0, None));
        Lineage { ranges }
    }

    /// Its ids from 1 to `last`, in order.
    pub fn ids_through(&self, last: WriteId) -> impl Iterator<Item = WriteId> + '_ {
        self.ranges.iter().flat_map(move |&(first, end)| {
            let end = end.map_or(last.0, |end| end.min(last.0));
            (first..=end).map(WriteId)
        })
    }

    /// Its ids in `(after, through]`, in order.
    pub fn ids_between(
        &self,
        after: Option<WriteId>,
        through: WriteId,
    ) -> impl Iterator<Item = WriteId> + '_ {
        let after = after.map_or(0, |a| a.0);
        self.ids_through(through).filter(move |id| id.0 > after)
    }
}

/// What the workload's log says of one write, as far as a check needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fate {
    /// Acknowledged, and must be in any copy whose cut is at or after it; with the second's
    /// offset of its acknowledgement.
    Acknowledged(f64),
    /// Refused, unanswered, or acknowledged but not durable when its site was killed: it may
    /// or may not be in a copy.
    Unknown,
}

/// What a check requires beyond consistency.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requirements {
    /// Every acknowledged write of the history up to this one must be present.
    pub must_include: Option<WriteId>,
    /// No write after this one may be present (a point in time: a bookmark).
    pub at_most: Option<WriteId>,
}

/// The kind of finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A block holds data no write of the history put there.
    Foreign,
    /// A block holds a write that is not in this history (discarded by a rollback or takeover,
    /// or a test-failover image's write).
    NotInHistory,
    /// A block is older than the cut says it must be: a write was lost or reordered, or torn.
    Order,
    /// An acknowledged write that must be present is missing.
    Incomplete,
    /// The copy holds a write after the point it must show.
    TooNew,
}

impl ProblemKind {
    /// Whether this kind breaks write-order consistency (rather than completeness).
    pub fn is_inconsistency(self) -> bool {
        matches!(self, ProblemKind::Foreign | ProblemKind::NotInHistory | ProblemKind::Order)
    }
}

/// One finding, said for an operator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// What was found where.
    pub text: String,
}

/// Most problems kept in full per check; the rest are counted.
pub const PROBLEMS_KEPT_MAX: usize = 10;

/// The outcome of checking one copy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyCheck {
    /// The newest write of the history the copy holds (`None`: none).
    pub cut: Option<WriteId>,
    /// Distinct workload writes found in the copy.
    pub writes_seen: usize,
    /// Blocks examined.
    pub blocks: u64,
    /// The first findings.
    pub problems: Vec<Problem>,
    /// All findings, counted.
    pub problem_count: usize,
    /// Acknowledged writes of the history after the cut (the copy lacks them), oldest first.
    #[serde(skip)]
    pub missing_acknowledged: Vec<WriteId>,
}

impl CopyCheck {
    /// Whether the copy is write-order consistent.
    pub fn consistent(&self) -> bool {
        !self.problems.iter().any(|p| p.kind.is_inconsistency())
    }

    /// Whether nothing at all was found wrong.
    pub fn passed(&self) -> bool {
        self.problem_count == 0
    }

    fn report(&mut self, kind: ProblemKind, text: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_KEPT_MAX {
            self.problems.push(Problem { kind, text });
        }
    }
}

/// One copy's content: per volume, per workload block of its region.
pub struct Copy<'a> {
    /// Volume names, by index.
    pub volumes: &'a [String],
    /// What each block holds.
    pub blocks: &'a [Vec<BlockContent>],
}

/// Check `copy` against `history` (see the module docs). `fate` tells what the log knows of a
/// write; `issued_last` is the newest write issued so far.
pub fn check_copy(
    shape: &WorkloadShape,
    history: &Lineage,
    fate: &dyn Fn(WriteId) -> Fate,
    issued_last: Option<WriteId>,
    copy: &Copy<'_>,
    requirements: Requirements,
) -> CopyCheck {
    let mut out = CopyCheck::default();
    let block_bytes = u64::from(shape.block_bytes);
    let place = |volume: usize, block: u64| {
        let name = copy.volumes.get(volume).map_or("?", String::as_str);
        format!("volume {name}, block {block} (offset {})", block * block_bytes)
    };

    // What the copy holds, and the cut it implies.
    let mut held: HashSet<WriteId> = HashSet::new();
    let mut outside: BTreeMap<WriteId, (usize, u64, u64)> = BTreeMap::new();
    for (volume, blocks) in copy.blocks.iter().enumerate() {
        out.blocks += blocks.len() as u64;
        for (block, content) in blocks.iter().enumerate() {
            let block = block as u64;
            match *content {
                BlockContent::Zero => {}
                BlockContent::Write(id) if id.0 >= crate::pattern::IMAGE_WRITE_ID_BASE => {
                    outside.entry(id).or_insert((volume, block, 0)).2 += 1;
                }
                BlockContent::Write(id) => {
                    let spec = shape.write(id);
                    let issued = issued_last.is_some_and(|last| id <= last);
                    if !issued || spec.volume as usize != volume || !spec.block_range().contains(&block) {
                        out.report(
                            ProblemKind::Foreign,
                            format!("{}: holds write {id}, which never wrote there", place(volume, block)),
                        );
                    } else if history.contains(id) {
                        held.insert(id);
                    } else {
                        outside.entry(id).or_insert((volume, block, 0)).2 += 1;
                    }
                }
                BlockContent::Foreign(why) => {
                    out.report(ProblemKind::Foreign, format!("{}: holds {why}", place(volume, block)))
                }
            }
        }
    }
    for (id, (volume, block, count)) in outside {
        let what = if id.0 >= crate::pattern::IMAGE_WRITE_ID_BASE {
            "a test-failover image's write".to_string()
        } else {
            format!("write {id}, which is not in this history (a rollback or takeover discarded it)")
        };
        out.report(
            ProblemKind::NotInHistory,
            format!("{} and {} more blocks: hold {what}", place(volume, block), count - 1),
        );
    }
    out.writes_seen = held.len();
    let cut = held.iter().max().copied();
    out.cut = cut;

    // What every block must hold at that cut.
    let mut expected: Vec<Vec<Option<WriteId>>> = copy.blocks.iter().map(|b| vec![None; b.len()]).collect();
    if let Some(cut) = cut {
        for id in history.ids_through(cut) {
            let applied = held.contains(&id) || matches!(fate(id), Fate::Acknowledged(_));
            if !applied {
                continue;
            }
            let spec = shape.write(id);
            if let Some(blocks) = expected.get_mut(spec.volume as usize) {
                for block in spec.block_range() {
                    if let Some(slot) = blocks.get_mut(block as usize) {
                        *slot = Some(id);
                    }
                }
            }
        }
    }
    let describe = |id: WriteId| match fate(id) {
        Fate::Acknowledged(at) => format!("write {id} (acknowledged at {at:.3} s)"),
        Fate::Unknown => format!("write {id} (present elsewhere in this copy)"),
    };
    for (volume, (blocks, wanted)) in copy.blocks.iter().zip(&expected).enumerate() {
        for (block, (content, want)) in blocks.iter().zip(wanted).enumerate() {
            let have = match content {
                BlockContent::Zero => None,
                BlockContent::Write(id) if held.contains(id) => Some(*id),
                _ => continue, // already reported
            };
            if have == *want {
                continue;
            }
            let Some(want) = *want else { continue };
            let cut_text = cut.map_or_else(|| "nothing".to_string(), |c| format!("write {c}"));
            let text = match have {
                None => format!(
                    "{}: is empty, but {} wrote it, and the copy holds {cut_text}, issued later",
                    place(volume, block as u64),
                    describe(want)
                ),
                Some(have) => format!(
                    "{}: holds write {have}, but {} overwrote it before {cut_text}, which the copy holds (a lost, reordered or torn write)",
                    place(volume, block as u64),
                    describe(want)
                ),
            };
            out.report(ProblemKind::Order, text);
        }
    }

    // Completeness and the point it must show.
    if let Some(limit) = requirements.at_most {
        if let Some(cut) = cut.filter(|&c| c > limit) {
            out.report(
                ProblemKind::TooNew,
                format!("holds write {cut}, issued after the point it must show (write {limit})"),
            );
        }
    }
    if let Some(must) = requirements.must_include {
        let required = history
            .ids_between(cut, must)
            .filter(|&id| matches!(fate(id), Fate::Acknowledged(_)))
            .collect::<Vec<_>>();
        if let Some(&first) = required.first() {
            let ends = cut.map_or_else(|| "holds no write".to_string(), |c| format!("ends at write {c}"));
            out.report(
                ProblemKind::Incomplete,
                format!(
                    "{} acknowledged writes that must be present are missing, the first {}; the copy {ends}",
                    required.len(),
                    describe(first)
                ),
            );
        }
    }
    if let Some(last) = issued_last {
        out.missing_acknowledged =
            history.ids_between(cut, last).filter(|&id| matches!(fate(id), Fate::Acknowledged(_))).collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::Pattern;

    fn shape() -> WorkloadShape {
        WorkloadShape {
            seed: 3,
            pattern: Pattern::Random,
            block_bytes: 4096,
            blocks_per_write_max: 3,
            region_blocks: vec![40, 20],
        }
    }

    /// The content a copy would have after applying `ids` in order.
    fn apply(shape: &WorkloadShape, ids: impl IntoIterator<Item = u64>) -> Vec<Vec<BlockContent>> {
        let mut blocks: Vec<Vec<BlockContent>> =
            shape.region_blocks.iter().map(|&n| vec![BlockContent::Zero; n as usize]).collect();
        for id in ids {
            let spec = shape.write(WriteId(id));
            for b in spec.block_range() {
                blocks[spec.volume as usize][b as usize] = BlockContent::Write(WriteId(id));
            }
        }
        blocks
    }

    fn run(blocks: &[Vec<BlockContent>], history: &Lineage, unknown: &[u64], req: Requirements) -> CopyCheck {
        let names = vec!["data".to_string(), "log".to_string()];
        let fate = |id: WriteId| {
            if unknown.contains(&id.0) {
                Fate::Unknown
            } else {
                Fate::Acknowledged(id.0 as f64 / 100.0)
            }
        };
        check_copy(&shape(), history, &fate, Some(WriteId(200)), &Copy { volumes: &names, blocks }, req)
    }

    #[test]
    fn every_prefix_is_consistent_and_ends_where_it_should() {
        let s = shape();
        let all = Lineage::from_start();
        for cut in [0, 1, 5, 50, 199, 200] {
            let check = run(&apply(&s, 1..=cut), &all, &[], Requirements::default());
            assert!(check.passed(), "cut {cut}: {:?}", check.problems);
            // The newest write present may be hidden by later ones only if none is later.
            assert!(check.cut.map_or(0, |c| c.0) <= cut);
            assert_eq!(check.missing_acknowledged.len() as u64, 200 - check.cut.map_or(0, |c| c.0));
        }
    }

    #[test]
    fn a_lost_write_below_the_cut_is_an_order_violation() {
        let s = shape();
        let ids: Vec<u64> = (1..=100).filter(|&i| i != 60).collect();
        let check = run(&apply(&s, ids.clone()), &Lineage::from_start(), &[], Requirements::default());
        // Write 60 may be fully overwritten later; if any of its blocks survives at the cut, it
        // must be reported.
        let survives = {
            let full = apply(&s, 1..=100);
            full.iter().flatten().any(|c| *c == BlockContent::Write(WriteId(60)))
        };
        assert_eq!(!check.consistent(), survives, "{:?}", check.problems);
        // Unknown fate: a write that may or may not have happened is fine absent.
        let check = run(&apply(&s, ids), &Lineage::from_start(), &[60], Requirements::default());
        assert!(check.consistent(), "{:?}", check.problems);
    }

    #[test]
    fn a_torn_write_is_found_even_when_its_fate_is_unknown() {
        let s = shape();
        let id = (1..200).find(|&i| s.write(WriteId(i)).blocks == 3).expect("a 3-block write");
        let mut blocks = apply(&s, 1..id);
        let spec = s.write(WriteId(id));
        blocks[spec.volume as usize][spec.block as usize] = BlockContent::Write(WriteId(id));
        let check = run(&blocks, &Lineage::from_start(), &[id], Requirements::default());
        assert!(!check.consistent(), "a torn write must be reported");
        assert!(check.problems.iter().any(|p| p.kind == ProblemKind::Order), "{:?}", check.problems);
    }

    #[test]
    fn completeness_points_and_histories() {
        let s = shape();
        let all = Lineage::from_start();
        let copy = apply(&s, 1..=80);
        let check = run(&copy, &all, &[], Requirements { must_include: Some(WriteId(120)), at_most: None });
        assert!(check.consistent() && !check.passed());
        assert_eq!(check.problems[0].kind, ProblemKind::Incomplete, "{:?}", check.problems);
        let cut = check.cut.expect("cut");
        let check =
            run(&copy, &all, &[], Requirements { must_include: Some(cut), at_most: Some(WriteId(70)) });
        assert!(check.problems.iter().any(|p| p.kind == ProblemKind::TooNew), "{:?}", check.problems);

        // A rollback to write 50 then writes from 101: the history skips 51..=100.
        let after = all.truncated(Some(WriteId(50))).continued_from(WriteId(101));
        assert!(after.contains(WriteId(50)) && !after.contains(WriteId(51)) && after.contains(WriteId(150)));
        let copy = apply(&s, (1..=50).chain(101..=130));
        assert!(run(&copy, &after, &[], Requirements::default()).passed());
        let mixed = apply(&s, (1..=60).chain(101..=130));
        let check = run(&mixed, &after, &[], Requirements::default());
        let survives =
            mixed.iter().flatten().any(|c| matches!(c, BlockContent::Write(w) if (51..=60).contains(&w.0)));
        assert_eq!(check.consistent(), !survives);
    }

    #[test]
    fn foreign_data_is_named_with_its_place() {
        let s = shape();
        let mut copy = apply(&s, 1..=30);
        copy[1][7] = BlockContent::Foreign(crate::pattern::Foreign::ChecksumMismatch);
        let check = run(&copy, &Lineage::from_start(), &[], Requirements::default());
        assert!(!check.consistent());
        assert!(
            check.problems[0].text.contains("volume log, block 7 (offset 28672)"),
            "{:?}",
            check.problems
        );
    }

    #[test]
    fn lineages_truncate_and_continue() {
        let l = Lineage::from_start().truncated(Some(WriteId(10))).continued_from(WriteId(20));
        assert_eq!(
            l.ids_through(WriteId(22)).map(|w| w.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 21, 22]
        );
        let l2 = l.truncated(Some(WriteId(5))).continued_from(WriteId(30));
        assert_eq!(
            l2.ids_between(Some(WriteId(3)), WriteId(31)).map(|w| w.0).collect::<Vec<_>>(),
            [4, 5, 30, 31]
        );
        assert!(Lineage::default().truncated(None).continued_from(WriteId(1)).contains(WriteId(1)));
        let open = Lineage::from_start().continued_from(WriteId(9));
        assert!(open.contains(WriteId(8)) && open.contains(WriteId(9)));
    }
}
