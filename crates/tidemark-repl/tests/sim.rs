//! Deterministic simulation of one group's replication under seeded delay, disconnects,
//! corruption in transit and crashes of either side. After every step: the secondary holds a
//! prefix of the primary's history (same seqs, same chains), and no acknowledged record is lost.
//! At the end the network heals and the secondary must catch up completely.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_journal::record::{encode, RecordMeta};
use tidemark_journal::{genesis_chain, ChainHash, Generation, RecordBody, Seq, UnixNanos, VolumeId};
use tidemark_repl::{BatchFrame, GroupPosition, Message, Pending, Receiver, Sender, SenderConfig};

const GROUP: u64 = 0x7e57;

/// A batch of whole records, as the primary's session builds it.
fn batch(group_id: u64, generation: u64, first: Seq, last: Seq, raw: &[u8], level: i32) -> BatchFrame {
    BatchFrame::build(group_id, generation, first, last, raw, level).expect("whole records")
}

/// The primary's journal: encoded records and the chain after each.
struct Primary {
    records: Vec<(Vec<u8>, ChainHash)>,
    sender: Sender,
    /// The ack cursor the primary persists (survives its crashes).
    persisted_ack: Seq,
    appended_at: Vec<Duration>,
}

impl Primary {
    fn last_seq(&self) -> Seq {
        Seq(self.records.len() as u64)
    }
    fn chain_at(&self, seq: Seq) -> Option<ChainHash> {
        if seq.0 == 0 {
            return Some(genesis_chain(GROUP));
        }
        self.records.get(seq.0 as usize - 1).map(|r| r.1)
    }
    fn append(&mut self, rng: &mut StdRng, now: Duration) {
        let seq = Seq(self.records.len() as u64 + 1);
        let prev = self.chain_at(Seq(seq.0 - 1)).expect("prev");
        let len = 512 * rng.random_range(1..9);
        let body = RecordBody::Write {
            volume: VolumeId(1),
            offset: rng.random_range(0..64) * 4096,
            data: vec![rng.random(); len].into(),
        };
        let mut out = Vec::new();
        let meta = RecordMeta {
            seq,
            generation: Generation(1),
            time: UnixNanos(now.as_nanos() as u64),
            durable: seq,
        };
        let chain = encode(meta, &body, &prev, &mut out);
        self.records.push((out, chain));
        self.appended_at.push(now);
    }
}

/// The secondary's copy: records applied (the first `durable` of them durable).
struct Secondary {
    applied: Vec<(Seq, ChainHash)>,
    durable: usize,
    receiver: Receiver,
}

impl Secondary {
    fn position(&self) -> GroupPosition {
        let (last_seq, chain) = self.applied.last().copied().unwrap_or((Seq(0), genesis_chain(GROUP)));
        GroupPosition {
            group_id: GROUP,
            generation: 1,
            last_seq,
            chain,
            durable_seq: Seq(self.durable as u64),
            generations: Vec::new(),
        }
    }
}

enum InFlight {
    ToSecondary(Message),
    ToPrimary(Message),
}

fn run(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let config =
        SenderConfig { batch_bytes_max: 8 << 10, inflight_bytes_max: 32 << 10, ..SenderConfig::default() };
    let mut primary = Primary {
        records: Vec::new(),
        sender: Sender::new(GROUP, 1, Seq(0), config),
        persisted_ack: Seq(0),
        appended_at: Vec::new(),
    };
    let start = GroupPosition {
        group_id: GROUP,
        generation: 1,
        last_seq: Seq(0),
        chain: genesis_chain(GROUP),
        durable_seq: Seq(0),
        generations: Vec::new(),
    };
    let mut secondary = Secondary { applied: Vec::new(), durable: 0, receiver: Receiver::new(&start) };
    let mut wire: VecDeque<(Duration, InFlight)> = VecDeque::new();
    let mut connected = false;
    let mut now = Duration::ZERO;
    let mut healing = false;
    for step in 0..steps {
        now += Duration::from_millis(rng.random_range(1..10));
        if step == steps * 3 / 4 {
            healing = true; // no more faults: the secondary must catch up
        }
        if step < steps * 3 / 4 && rng.random_bool(0.6) {
            primary.append(&mut rng, now);
        }
        let fault = if healing { 100 } else { rng.random_range(0..100) };
        match fault {
            0..=1 => {
                // Connection drops: everything in flight is lost.
                wire.clear();
                connected = false;
                primary.sender.on_disconnect();
            }
            2 => {
                // Secondary crash: what was not durable is gone.
                wire.clear();
                connected = false;
                secondary.applied.truncate(secondary.durable);
                secondary.receiver = Receiver::new(&secondary.position());
                primary.sender.on_disconnect();
            }
            3 => {
                // Primary crash: only the persisted ack cursor survives (its journal is durable:
                // only durable records are shipped).
                wire.clear();
                connected = false;
                primary.sender = Sender::new(GROUP, 1, primary.persisted_ack, config);
            }
            _ => {}
        }
        if !connected {
            // Handshake: the secondary's position, the sender decides where to resume.
            let pos = secondary.receiver.position();
            assert_eq!(pos, secondary.position(), "receiver and store agree on the durable position");
            let last = primary.last_seq();
            let ours = primary.chain_at(pos.last_seq);
            let resume =
                primary.sender.on_position(&pos, Seq(1), last, |_| ours).expect("same history resumes");
            assert_eq!(resume, Seq(pos.last_seq.0 + 1));
            connected = true;
        }
        // The sender cuts batches while it may.
        while let Some(plan) = primary.sender.plan(
            now,
            Pending {
                last_seq: primary.last_seq(),
                unsent_bytes: primary
                    .records
                    .iter()
                    .skip(primary.sender.next().0 as usize - 1)
                    .map(|r| r.0.len() as u64)
                    .sum(),
                oldest_unsent_at: primary.appended_at.get(primary.sender.next().0 as usize - 1).copied(),
            },
        ) {
            let mut raw = Vec::new();
            let mut last = plan.from;
            for seq in plan.from.0..=primary.last_seq().0 {
                let rec = &primary.records[seq as usize - 1].0;
                if !raw.is_empty() && raw.len() as u64 + rec.len() as u64 > plan.bytes_max {
                    break;
                }
                raw.extend_from_slice(rec);
                last = Seq(seq);
            }
            let mut frame = batch(GROUP, 1, plan.from, last, &raw, 1);
            primary.sender.on_sent(plan.from, last, raw.len() as u64, now);
            if !healing && rng.random_range(0..100) < 2 {
                // Corruption in transit (under TLS this means a bug or bad memory): it must be caught.
                let i = rng.random_range(0..frame.payload.len());
                frame.payload[i] ^= 1 << rng.random_range(0..8);
            }
            let delay = Duration::from_millis(rng.random_range(5..60));
            wire.push_back((now + delay, InFlight::ToSecondary(Message::Batch(frame))));
        }
        // Deliver whatever has arrived, in order (a QUIC stream is ordered).
        while wire.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, msg)) = wire.pop_front() else { break };
            match msg {
                InFlight::ToSecondary(Message::Batch(frame)) => match secondary.receiver.on_batch(&frame) {
                    Ok(Some(records)) => {
                        for r in &records {
                            let expected = primary.chain_at(r.seq).expect("sent records exist");
                            assert_eq!(
                                r.chain, expected,
                                "seed {seed}: applied a record off the primary's history"
                            );
                            secondary.applied.push((r.seq, r.chain));
                        }
                    }
                    Ok(None) => {}
                    Err(_) => {
                        // A refused batch ends the connection; nothing of it was applied.
                        wire.clear();
                        connected = false;
                        primary.sender.on_disconnect();
                        break;
                    }
                },
                InFlight::ToPrimary(Message::Ack { generation, durable_seq, .. }) => {
                    primary.sender.on_ack(generation, durable_seq, now).expect("valid ack");
                    primary.persisted_ack = primary.sender.acked();
                }
                _ => unreachable!("only batches and acks travel in this simulation"),
            }
        }
        // The secondary's group commit: applied records become durable, sometimes later (the
        // shell syncs after each batch or after a few), always eventually; then it acks.
        if connected && secondary.applied.len() > secondary.durable && (healing || rng.random_bool(0.7)) {
            secondary.durable = secondary.applied.len();
            let ack = secondary.receiver.on_durable(Seq(secondary.durable as u64));
            wire.push_back((now + Duration::from_millis(rng.random_range(5..60)), InFlight::ToPrimary(ack)));
        }
        // Invariants after every step.
        for (seq, chain) in &secondary.applied {
            assert_eq!(
                Some(*chain),
                primary.chain_at(*seq),
                "seed {seed} step {step}: secondary is not a prefix"
            );
        }
        let seqs: Vec<u64> = secondary.applied.iter().map(|a| a.0 .0).collect();
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1),
            "seed {seed}: gap in the secondary's history"
        );
        assert!(
            primary.sender.acked().0 <= secondary.durable as u64,
            "seed {seed} step {step}: acked {} but only {} durable at the secondary",
            primary.sender.acked().0,
            secondary.durable
        );
    }
    // Healed: everything the primary has must be durable at the secondary.
    assert_eq!(secondary.durable as u64, primary.last_seq().0, "seed {seed}: the secondary did not catch up");
    assert_eq!(
        primary.sender.acked(),
        primary.last_seq(),
        "seed {seed}: the primary did not see the final ack"
    );
}

#[test]
fn replication_survives_disconnects_crashes_and_corruption() {
    for seed in 0..200 {
        run(seed, 600);
    }
}

#[test]
fn a_diverged_history_is_refused_never_overwritten() {
    let mut rng = StdRng::seed_from_u64(1);
    let config = SenderConfig::default();
    let mut a = Primary {
        records: Vec::new(),
        sender: Sender::new(GROUP, 1, Seq(0), config),
        persisted_ack: Seq(0),
        appended_at: Vec::new(),
    };
    for _ in 0..10 {
        a.append(&mut rng, Duration::ZERO);
    }
    // The partner holds seq 5 with a different chain (it took other writes).
    let pos = GroupPosition {
        group_id: GROUP,
        generation: 1,
        last_seq: Seq(5),
        chain: ChainHash([9; 32]),
        durable_seq: Seq(5),
        generations: Vec::new(),
    };
    let (last, ours) = (a.last_seq(), a.chain_at(Seq(5)));
    let err = a.sender.on_position(&pos, Seq(1), last, |_| ours).expect_err("divergence");
    assert!(err.to_string().contains("differ at seq 5"), "{err}");
    assert!(a
        .sender
        .plan(
            Duration::from_secs(1),
            Pending { last_seq: Seq(10), unsent_bytes: 1 << 30, oldest_unsent_at: Some(Duration::ZERO) }
        )
        .is_none());
    // A partner that knows a newer generation fences this sender.
    let mut b = Sender::new(GROUP, 1, Seq(0), config);
    let newer = GroupPosition {
        group_id: GROUP,
        generation: 2,
        last_seq: Seq(0),
        chain: genesis_chain(GROUP),
        durable_seq: Seq(0),
        generations: Vec::new(),
    };
    assert!(b.on_position(&newer, Seq(1), Seq(10), |_| Some(genesis_chain(GROUP))).is_err());
    assert!(matches!(b.state(), tidemark_repl::SenderState::Fenced { theirs: 2 }));
}

#[test]
fn hostile_frames_are_refused() {
    let start = GroupPosition {
        group_id: GROUP,
        generation: 3,
        last_seq: Seq(0),
        chain: genesis_chain(GROUP),
        durable_seq: Seq(0),
        generations: Vec::new(),
    };
    let mut r = Receiver::new(&start);
    let mut p = Primary {
        records: Vec::new(),
        sender: Sender::new(GROUP, 3, Seq(0), SenderConfig::default()),
        persisted_ack: Seq(0),
        appended_at: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..3 {
        p.append(&mut rng, Duration::ZERO);
    }
    let raw: Vec<u8> = p.records.iter().flat_map(|r| r.0.clone()).collect();
    // Stale generation (a deposed primary).
    assert!(r.on_batch(&batch(GROUP, 2, Seq(1), Seq(3), &raw, 1)).is_err());
    // Claims more than it holds, or a size over the limit (a decompression bomb).
    let mut f = batch(GROUP, 3, Seq(1), Seq(4), &raw, 1);
    assert!(r.on_batch(&f).is_err());
    f.raw_bytes = u64::MAX;
    assert!(r.on_batch(&f).is_err());
    // Truncated payload.
    let mut f = batch(GROUP, 3, Seq(1), Seq(3), &raw, 1);
    f.payload.truncate(f.payload.len() / 2);
    assert!(r.on_batch(&f).is_err());
    // Wrong group, gap.
    assert!(r.on_batch(&batch(GROUP + 1, 3, Seq(1), Seq(3), &raw, 1)).is_err());
    let tail: Vec<u8> = p.records[1..].iter().flat_map(|r| r.0.clone()).collect();
    assert!(r.on_batch(&batch(GROUP, 3, Seq(2), Seq(3), &tail, 1)).is_err());
    // Garbage message bytes.
    assert!(Message::decode(&[0xff; 40]).is_err());
    // And the genuine batch is still accepted afterwards.
    let records = r.on_batch(&batch(GROUP, 3, Seq(1), Seq(3), &raw, 1)).expect("ok").expect("new");
    assert_eq!(records.len(), 3);
}
