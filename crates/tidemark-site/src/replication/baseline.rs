//! Baselines over a session: when the partner is behind what the journal holds, the primary
//! sends its whole image at one seq S (allocated blocks only, zero blocks elided, each chunk
//! zstd-compressed and blake3-checked), and the secondary stages it beside its own copy,
//! switches when it is complete, and acknowledges S; the next session streams from S + 1.
//! An interrupted baseline starts again from the beginning (the staged part is discarded).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_engine::baseline::{BaselineTarget, StagedBaseline};
use tidemark_engine::group::Group;
use tidemark_engine::persist::VolumeMeta;
use tidemark_engine::{Engine, EngineError};
use tidemark_journal::{Seq, VolumeId};
use tidemark_repl::wire::{BASELINE_CHUNK_BYTES_MAX, BASELINE_VOLUMES_MAX};
use tidemark_repl::{BaselineChunk, BaselineHeader, BaselineVolume, Message};
use tokio::sync::watch;

use super::overflow::DirtyBlocks;
use super::session::{
    blocking, recv, send, Channel, Limiter, ReplState, ReplStats, SessionEnd, SessionError,
};
use crate::metrics::FrameRejection;

/// Bytes read from the image at once (and the most one chunk carries).
const READ_BYTES: u64 = 1 << 20;
/// Bytes of the allocation map asked for at once.
const MAP_WINDOW_BYTES: u64 = 1 << 30;
/// How long the primary waits for the secondary to switch after the last chunk (it syncs every
/// staged byte first).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(600);

const _: () = assert!(READ_BYTES <= BASELINE_CHUNK_BYTES_MAX);

/// A volume and its allocated byte ranges `[start, end)`.
type VolumeMap = (VolumeMeta, Vec<(u64, u64)>);

/// Allocated byte ranges of each volume at the baseline's seq.
fn allocated(group: &Group, target: &BaselineTarget) -> Result<Vec<VolumeMap>, EngineError> {
    target
        .volumes
        .iter()
        .map(|meta| Ok((meta.clone(), allocated_ranges(group, meta, Some(target.seq))?)))
        .collect()
}

/// Allocated, non-zero byte ranges of volume `meta` (up to its size) at `at` (`None`: now).
fn allocated_ranges(
    group: &Group,
    meta: &VolumeMeta,
    at: Option<Seq>,
) -> Result<Vec<(u64, u64)>, EngineError> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < meta.size_bytes {
        let len = MAP_WINDOW_BYTES.min(meta.size_bytes - offset);
        let mut at_offset = offset;
        for (length, allocated, zero) in group.allocation(meta.id, offset, len, at)? {
            if allocated && !zero {
                match ranges.last_mut() {
                    Some((_, end)) if *end == at_offset => *end += length,
                    _ => ranges.push((at_offset, at_offset + length)),
                }
            }
            at_offset += length;
        }
        offset += len;
    }
    Ok(ranges)
}

/// Byte ranges of each volume a resync sends: the dirty blocks, and every block changed in the
/// journal after they were last tracked.
fn changed(group: &Group, target: &BaselineTarget, dirty: &DirtyBlocks) -> Vec<VolumeMap> {
    let recent = group.blocks_changed_after(Seq(dirty.through));
    target
        .volumes
        .iter()
        .map(|meta| {
            let tracked = dirty.volumes.get(&meta.id.0).map(Vec::as_slice).unwrap_or_default();
            let newer =
                recent.iter().find(|(m, _)| m.id == meta.id).map(|(_, b)| b.as_slice()).unwrap_or_default();
            let bs = u64::from(meta.block_size_bytes);
            let ranges = super::overflow::merge_runs(tracked, newer)
                .into_iter()
                .map(|(first, count)| (first * bs, ((first + count) * bs).min(meta.size_bytes)))
                .filter(|(start, end)| start < end)
                .collect();
            (meta.clone(), ranges)
        })
        .collect()
}

/// Runs of non-zero blocks in `data` (which starts at `offset`): (offset, bytes).
fn nonzero_runs(data: &[u8], offset: u64, block: usize) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut runs: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    for (i, chunk) in data.chunks(block).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i * block;
        match runs.last_mut() {
            Some((_, r)) if r.end == start => r.end = start + chunk.len(),
            _ => runs.push((offset + start as u64, start..start + chunk.len())),
        }
    }
    runs
}

/// What the primary's baseline needs from its session.
pub struct Sending<'a, H: Fn(Seq)> {
    /// Counters.
    pub stats: &'a ReplStats,
    /// zstd level.
    pub level: i32,
    /// Holds the journal from a seq on.
    pub hold: &'a H,
    /// The partner's bandwidth limit.
    pub limiter: &'a Option<Arc<Mutex<Limiter>>>,
    /// Send only these blocks and those changed after them (a resync from the partner's
    /// position, which the caller checked).
    pub delta: Option<DirtyBlocks>,
}

/// Send a baseline of `group` to the partner on `ch`; returns once the partner has switched to
/// it (or when `stop` says so).
pub async fn send_baseline<H: Fn(Seq)>(
    group: &Arc<Group>,
    ch: &mut Channel,
    sending: Sending<'_, H>,
    stop: &mut watch::Receiver<bool>,
) -> Result<SessionEnd, SessionError> {
    let Sending { stats, level, hold, limiter, delta } = sending;
    stats.set_state(ReplState::Baseline);
    let g = group.clone();
    let target = blocking(move || g.baseline_point()).await?;
    let delta_from = delta.as_ref().map(|d| (Seq(d.from_seq), tidemark_journal::ChainHash(d.from_chain)));
    let (g, t) = (group.clone(), target.clone());
    // Mapped before the hold moves to the point: the journal still holds every change after
    // the dirty blocks' `through` (the hold is at or before it).
    let map = blocking(move || match &delta {
        Some(d) => Ok(changed(&g, &t, d)),
        None => allocated(&g, &t),
    })
    .await?;
    // The point stays readable, and the journal after it kept, until the partner acknowledges it.
    hold(target.seq);
    let bytes_total: u64 = map.iter().flat_map(|(_, r)| r.iter().map(|(s, e)| e - s)).sum();
    stats.baseline_seq.store(target.seq.0, Ordering::Release);
    stats.baseline_bytes_total.store(bytes_total, Ordering::Relaxed);
    stats.baseline_bytes_done.store(0, Ordering::Relaxed);
    tracing::info!(group = %group.name, seq = target.seq.0, bytes_total, "sending a baseline");
    let header = BaselineHeader {
        group_id: group.id,
        generation: target.generation,
        generations: target.generations.clone(),
        seq: target.seq,
        chain: target.chain,
        time: target.time,
        volumes: target
            .volumes
            .iter()
            .map(|m| BaselineVolume {
                id: m.id.0,
                name: m.name.clone(),
                size_bytes: m.size_bytes,
                block_size_bytes: m.block_size_bytes,
            })
            .collect(),
        bytes_total,
        delta_from,
    };
    let whole = delta_from.is_some();
    send(ch, &Message::BaselineBegin(header)).await?;
    let (mut chunks, mut raw_total) = (0u64, 0u64);
    for (meta, ranges) in map {
        let block = meta.block_size_bytes as usize;
        for (start, end) in ranges {
            let mut offset = start;
            while offset < end {
                if *stop.borrow() {
                    return Ok(SessionEnd::Stopped);
                }
                // A secondary that refuses says so while we send.
                if let Ok(frame) = ch.rx.try_recv() {
                    return Err(match Message::decode(&frame) {
                        Ok(Message::Refuse { reason, .. }) => SessionError::Refused(reason),
                        Ok(other) => {
                            SessionError::Protocol(format!("unexpected {other:?} during a baseline"))
                        }
                        Err(e) => SessionError::Protocol(e.to_string()),
                    });
                }
                let len = READ_BYTES.min(end - offset);
                let (g, id, seq, group_id) = (group.clone(), meta.id, target.seq, group.id);
                let built = blocking(move || -> Result<Vec<BaselineChunk>, EngineError> {
                    let mut buf = vec![0u8; len as usize];
                    g.read(id, offset, &mut buf, Some(seq))?;
                    if whole {
                        // A resync overwrites: a block that became zero must say so.
                        return Ok(vec![BaselineChunk::build(group_id, id.0, offset, &buf, level)]);
                    }
                    Ok(nonzero_runs(&buf, offset, block)
                        .into_iter()
                        .map(|(at, r)| BaselineChunk::build(group_id, id.0, at, &buf[r], level))
                        .collect())
                })
                .await?;
                for chunk in built {
                    let compressed = chunk.payload.len() as u64;
                    if let Some(limiter) = limiter {
                        let wait = limiter.lock().wait_for(compressed);
                        if !wait.is_zero() {
                            let waiting = Instant::now();
                            tokio::time::sleep(wait).await;
                            stats
                                .throttled_nanos_total
                                .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                    }
                    chunks += 1;
                    raw_total += chunk.raw_bytes;
                    stats.bytes_sent_total.fetch_add(chunk.raw_bytes, Ordering::Relaxed);
                    stats.bytes_sent_compressed_total.fetch_add(compressed, Ordering::Relaxed);
                    send(ch, &Message::BaselineData(chunk)).await?;
                }
                stats.baseline_bytes_done.fetch_add(len, Ordering::Relaxed);
                offset += len;
            }
        }
    }
    send(ch, &Message::BaselineEnd { group_id: group.id, seq: target.seq, chunks, raw_bytes: raw_total })
        .await?;
    let answer = tokio::select! {
        answer = recv(ch, Some(SWITCH_TIMEOUT)) => answer?,
        _ = stop.changed() => return Ok(SessionEnd::Stopped),
    };
    match answer {
        Message::Ack { durable_seq, .. } if durable_seq == target.seq => {
            stats.acked_seq.store(target.seq.0, Ordering::Release);
            *stats.acked_location.lock() = None;
            stats.baselines_total.fetch_add(1, Ordering::Relaxed);
            tracing::info!(group = %group.name, seq = target.seq.0, chunks, bytes = raw_total, "baseline acknowledged");
            Ok(SessionEnd::Baselined { seq: target.seq.0 })
        }
        Message::Refuse { reason, .. } => Err(SessionError::Refused(reason)),
        other => {
            Err(SessionError::Protocol(format!("expected the baseline's acknowledgement, got {other:?}")))
        }
    }
}

/// Copy this copy's non-zero blocks that a resync did not send into the staged image, so it
/// becomes this copy with the resync's blocks on top. Local I/O only.
fn fill_from_copy(
    group: &Group,
    staged: &mut StagedBaseline,
    volumes: &[VolumeMeta],
    mut covered: BTreeMap<u32, Vec<(u64, u64)>>,
) -> Result<(), EngineError> {
    let current = group.volumes();
    for meta in volumes {
        let Some(here) = current.iter().find(|m| m.id == meta.id) else { continue };
        let kept = VolumeMeta { size_bytes: here.size_bytes.min(meta.size_bytes), ..here.clone() };
        let sent = covered.remove(&meta.id.0).unwrap_or_default();
        let ranges = allocated_ranges(group, &kept, None)?;
        for (start, end) in subtract(&ranges, &sent) {
            let mut offset = start;
            while offset < end {
                let len = READ_BYTES.min(end - offset);
                let mut buf = vec![0u8; len as usize];
                group.read(meta.id, offset, &mut buf, None)?;
                for (at, r) in nonzero_runs(&buf, offset, meta.block_size_bytes as usize) {
                    staged.write(meta.id.0, at, &buf[r])?;
                }
                offset += len;
            }
        }
    }
    Ok(())
}

/// `ranges` minus `holes` (both sorted, disjoint `[start, end)`).
fn subtract(ranges: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut at = start;
        for &(hs, he) in holes.iter().filter(|(hs, he)| *he > start && *hs < end) {
            if hs > at {
                out.push((at, hs));
            }
            at = at.max(he);
        }
        if at < end {
            out.push((at, end));
        }
    }
    out
}

/// Tell the primary why, and end the session.
async fn refuse(ch: &Channel, group_id: u64, reason: String) -> SessionError {
    let _ = send(ch, &Message::Refuse { group_id, reason: reason.clone() }).await;
    SessionError::Refused(reason)
}

/// Receive a baseline announced by `header` into secondary group `group`: stage every chunk,
/// switch when the end arrives and the counts match, and acknowledge the seq.
pub async fn receive_baseline(
    engine: &Arc<Engine>,
    group: &Arc<Group>,
    ch: &mut Channel,
    header: BaselineHeader,
    stats: &ReplStats,
) -> Result<SessionEnd, SessionError> {
    if header.group_id != group.id || header.volumes.len() > BASELINE_VOLUMES_MAX {
        let reason =
            format!("baseline header for group id {} with {} volumes", header.group_id, header.volumes.len());
        return Err(refuse(ch, group.id, reason).await);
    }
    for v in &header.volumes {
        if let Err(e) = tidemark_engine::validate_name("volume", &v.name) {
            return Err(refuse(ch, group.id, format!("baseline: {e}")).await);
        }
    }
    let target = BaselineTarget {
        seq: header.seq,
        chain: header.chain,
        time: header.time,
        generation: header.generation,
        generations: header.generations.clone(),
        volumes: header
            .volumes
            .iter()
            .map(|v| VolumeMeta {
                id: VolumeId(v.id),
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                block_size_bytes: v.block_size_bytes,
            })
            .collect(),
    };
    if let Some((seq, chain)) = header.delta_from {
        let here = group.position();
        if here.last_seq != seq || here.chain != chain {
            let reason = format!(
                "a resync from seq {} does not apply: this copy is at seq {} with {} chain",
                seq.0,
                here.last_seq.0,
                if here.chain == chain { "the same" } else { "another" }
            );
            return Err(refuse(ch, group.id, reason).await);
        }
    }
    let volumes = target.volumes.clone();
    let (e, name) = (engine.clone(), group.name.clone());
    let mut staged: StagedBaseline = match blocking(move || e.begin_baseline(&name, target)).await {
        Ok(staged) => staged,
        Err(e) => return Err(refuse(ch, group.id, e.to_string()).await),
    };
    stats.baseline_seq.store(header.seq.0, Ordering::Release);
    stats.baseline_bytes_total.store(header.bytes_total, Ordering::Relaxed);
    stats.baseline_bytes_done.store(0, Ordering::Relaxed);
    tracing::info!(group = %group.name, seq = header.seq.0, bytes_total = header.bytes_total, "receiving a baseline");
    let mut chunks = 0u64;
    // Byte ranges each volume's chunks covered (a resync keeps the rest of this copy).
    let mut covered: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    loop {
        let message = recv(ch, None).await?;
        match message {
            Message::BaselineData(chunk) if chunk.group_id == group.id => {
                let opened = blocking(move || chunk.open().map(|data| (chunk, data))).await;
                let (chunk, data) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        stats.reject(FrameRejection::of_wire(&e));
                        return Err(refuse(ch, group.id, e.to_string()).await);
                    }
                };
                let (volume, offset) = (chunk.volume, chunk.offset);
                let written = blocking(move || {
                    let result = staged.write(chunk.volume, chunk.offset, &data);
                    (staged, result, data.len() as u64)
                })
                .await;
                let runs = covered.entry(volume).or_default();
                match runs.last_mut() {
                    Some((_, end)) if *end == offset => *end += written.2,
                    _ => runs.push((offset, offset + written.2)),
                }
                staged = written.0;
                if let Err(e) = written.1 {
                    stats.reject(FrameRejection::Other);
                    return Err(refuse(ch, group.id, e.to_string()).await);
                }
                chunks += 1;
                stats.baseline_bytes_done.fetch_add(written.2, Ordering::Relaxed);
            }
            Message::BaselineEnd { group_id, seq, chunks: sent, raw_bytes }
                if group_id == group.id && seq == header.seq =>
            {
                if sent != chunks || raw_bytes != staged.bytes() {
                    let reason = format!(
                        "baseline at seq {}: {chunks} chunks of {} bytes arrived, {sent} of {raw_bytes} were sent",
                        seq.0,
                        staged.bytes()
                    );
                    return Err(refuse(ch, group.id, reason).await);
                }
                if header.delta_from.is_some() {
                    let g = group.clone();
                    let filled = blocking(move || {
                        let result = fill_from_copy(&g, &mut staged, &volumes, covered);
                        (staged, result)
                    })
                    .await;
                    staged = filled.0;
                    if let Err(e) = filled.1 {
                        return Err(refuse(
                            ch,
                            group.id,
                            format!("resync: keeping this copy's unchanged blocks: {e}"),
                        )
                        .await);
                    }
                }
                let (e, name) = (engine.clone(), group.name.clone());
                match blocking(move || e.finish_baseline(&name, staged)).await {
                    Ok(_) => {}
                    Err(e) => return Err(refuse(ch, group.id, e.to_string()).await),
                }
                stats.acked_seq.store(seq.0, Ordering::Release);
                stats.baselines_total.fetch_add(1, Ordering::Relaxed);
                send(
                    ch,
                    &Message::Ack { group_id: group.id, generation: header.generation, durable_seq: seq },
                )
                .await?;
                return Ok(SessionEnd::Baselined { seq: seq.0 });
            }
            other => {
                return Err(refuse(ch, group.id, format!("unexpected {other:?} during a baseline")).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtracting_holes_keeps_what_is_outside_them() {
        assert_eq!(subtract(&[(0, 100)], &[(10, 20), (50, 60)]), vec![(0, 10), (20, 50), (60, 100)]);
        assert_eq!(subtract(&[(0, 100)], &[(0, 100)]), vec![]);
        assert_eq!(subtract(&[(0, 10), (20, 30)], &[(5, 25)]), vec![(0, 5), (25, 30)]);
        assert_eq!(subtract(&[(10, 20)], &[]), vec![(10, 20)]);
    }

    #[test]
    fn zero_blocks_are_left_out_of_runs() {
        let mut data = vec![0u8; 4 * 512];
        data[0] = 1;
        data[2 * 512 + 3] = 1;
        data[3 * 512] = 1;
        let runs = nonzero_runs(&data, 1024, 512);
        assert_eq!(runs, vec![(1024, 0..512), (1024 + 1024, 1024..2048)]);
    }
}
