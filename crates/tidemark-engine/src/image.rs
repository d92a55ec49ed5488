//! Images: a group's volumes as they were at one seq, readable, and writable through a private
//! overlay that never touches the group's journal (test failover, recovery, cloning).
//!
//! An overlay is, per volume, a sparse file of written bytes plus the set of byte ranges that
//! were written (an interval set, so a trim of a whole 64 TiB volume is one entry). The range
//! set is persisted at every flush; writes not yet flushed may be lost in a crash, as on any disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidemark_journal::storage::{Storage, StorageFile};
use tidemark_journal::{Seq, VolumeId};

use crate::catalog::ImageRecord;
use crate::error::{EngineError, Result};
use crate::group::Group;
use crate::persist::{read_framed, write_framed};
use crate::types::SalvageInfo;

const RANGES_MAGIC: [u8; 8] = *b"TDMKOVRL";
const SALVAGE_MAGIC: [u8; 8] = *b"TDMKSALV";
const SALVAGE_FILE: &str = "salvage";

/// Byte ranges, disjoint and merged: start -> end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Add `[start, end)`, merging with neighbours.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> =
            self.0.range(..=end).rev().take_while(|(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Pieces of `[start, end)` in order, each marked whether it is inside the set.
    pub fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = self.0.range(..=start).next_back().filter(|(_, &e)| e > start).map(|(&s, &e)| (s, e));
        let rest = self.0.range(start + 1..end).map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            let s = s.max(start);
            let e = e.min(end);
            if s > pos {
                out.push((pos, s, false));
            }
            if e > s {
                out.push((s, e, true));
            }
            pos = pos.max(e);
        }
        if pos < end {
            out.push((pos, end, false));
        }
        out
    }
}

struct Overlay {
    file: Arc<dyn StorageFile>,
    ranges: RangeSet,
    dirty: bool,
}

/// An image of a group at a seq.
pub struct Image {
    /// Its catalog entry.
    pub record: ImageRecord,
    /// The group it views.
    pub group: Arc<Group>,
    storage: Option<Arc<dyn Storage>>,
    overlays: Mutex<HashMap<VolumeId, Overlay>>,
}

fn overlay_names(volume: VolumeId) -> (String, String) {
    (format!("overlay-{:08x}.img", volume.0), format!("overlay-{:08x}.ranges", volume.0))
}

impl Image {
    /// Open an image; `storage` holds the overlay of a writable image.
    pub fn open(record: ImageRecord, group: Arc<Group>, storage: Option<Arc<dyn Storage>>) -> Result<Image> {
        let mut overlays = HashMap::new();
        if let (true, Some(st)) = (record.mode.has_overlay(), &storage) {
            for meta in group.volumes() {
                let (data, ranges) = overlay_names(meta.id);
                let file = st.open(&data).map_err(|source| EngineError::Io {
                    action: "open overlay",
                    path: st.describe(&data),
                    source,
                })?;
                let ranges: RangeSet = read_framed(&**st, &ranges, RANGES_MAGIC)
                    .map_err(|reason| EngineError::Failed {
                        group: record.group.clone(),
                        reason: format!("image {} overlay: {reason}", record.name),
                    })?
                    .unwrap_or_default();
                overlays.insert(meta.id, Overlay { file, ranges, dirty: false });
            }
        }
        Ok(Image { record, group, storage, overlays: Mutex::new(overlays) })
    }

    /// The seq the image shows.
    pub fn seq(&self) -> Seq {
        Seq(self.record.seq)
    }

    /// Read bytes of `volume` as the image shows them.
    pub fn read(&self, volume: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let overlays = self.overlays.lock();
        let Some(overlay) = overlays.get(&volume) else {
            drop(overlays);
            return self.group.read(volume, offset, buf, Some(self.seq()));
        };
        let end = offset + buf.len() as u64;
        for (s, e, inside) in overlay.ranges.split(offset, end) {
            let dst = buf
                .get_mut((s - offset) as usize..(e - offset) as usize)
                .ok_or_else(|| EngineError::InvalidArgument("range".into()))?;
            if inside {
                overlay.file.read_exact_at(dst, s).map_err(|source| EngineError::Io {
                    action: "read overlay",
                    path: "overlay".into(),
                    source,
                })?;
            } else {
                self.group.read(volume, s, dst, Some(self.seq()))?;
            }
        }
        Ok(())
    }

    /// The salvage description, for a salvage image.
    pub fn salvage_info(&self) -> Option<SalvageInfo> {
        let storage = self.storage.as_ref()?;
        read_framed(&**storage, SALVAGE_FILE, SALVAGE_MAGIC).ok().flatten()
    }

    /// Record the salvage description (durably).
    pub fn set_salvage_info(&self, info: &SalvageInfo) -> Result<()> {
        let storage = self.storage.as_ref().ok_or_else(|| EngineError::ReadOnly(self.record.name.clone()))?;
        write_framed(&**storage, SALVAGE_FILE, SALVAGE_MAGIC, info).map_err(|source| EngineError::Io {
            action: "write salvage description",
            path: storage.describe(SALVAGE_FILE),
            source,
        })
    }

    /// Write into the private overlay.
    pub fn write(&self, volume: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let mut overlays = self.overlays.lock();
        let overlay =
            overlays.get_mut(&volume).ok_or_else(|| EngineError::ReadOnly(self.record.name.clone()))?;
        overlay.file.write_all_at(data, offset).map_err(|source| EngineError::Io {
            action: "write overlay",
            path: "overlay".into(),
            source,
        })?;
        overlay.ranges.insert(offset, offset + data.len() as u64);
        overlay.dirty = true;
        Ok(())
    }

    /// Zero a range in the overlay.
    pub fn zero(&self, volume: VolumeId, offset: u64, length: u64) -> Result<()> {
        let mut overlays = self.overlays.lock();
        let overlay =
            overlays.get_mut(&volume).ok_or_else(|| EngineError::ReadOnly(self.record.name.clone()))?;
        let file_len = overlay.file.len().map_err(|source| EngineError::Io {
            action: "stat overlay",
            path: "overlay".into(),
            source,
        })?;
        if file_len < offset + length {
            overlay.file.set_len(offset + length).map_err(|source| EngineError::Io {
                action: "grow overlay",
                path: "overlay".into(),
                source,
            })?;
        }
        overlay.file.punch_hole(offset, length).map_err(|source| EngineError::Io {
            action: "punch overlay",
            path: "overlay".into(),
            source,
        })?;
        overlay.ranges.insert(offset, offset + length);
        overlay.dirty = true;
        Ok(())
    }

    /// Make overlay writes durable.
    pub fn flush(&self) -> Result<()> {
        let Some(storage) = &self.storage else { return Ok(()) };
        let mut overlays = self.overlays.lock();
        for (id, overlay) in overlays.iter_mut().filter(|(_, o)| o.dirty) {
            let (_, ranges) = overlay_names(*id);
            overlay.file.sync_data().map_err(|source| EngineError::Io {
                action: "sync overlay",
                path: "overlay".into(),
                source,
            })?;
            write_framed(&**storage, &ranges, RANGES_MAGIC, &overlay.ranges).map_err(|source| {
                EngineError::Io { action: "write overlay ranges", path: storage.describe(&ranges), source }
            })?;
            overlay.dirty = false;
        }
        Ok(())
    }

    /// Allocation runs as for a volume, with overlay ranges reported as allocated data.
    pub fn allocation(&self, volume: VolumeId, offset: u64, length: u64) -> Result<Vec<(u64, bool, bool)>> {
        let ranges = self.overlays.lock().get(&volume).map(|o| o.ranges.clone());
        let Some(ranges) = ranges else {
            return self.group.allocation(volume, offset, length, Some(self.seq()));
        };
        let mut out: Vec<(u64, bool, bool)> = Vec::new();
        for (s, e, inside) in ranges.split(offset, offset + length) {
            let runs = if inside {
                vec![(e - s, true, false)]
            } else {
                self.group.allocation(volume, s, e - s, Some(self.seq()))?
            };
            for run in runs {
                match out.last_mut() {
                    Some(last) if (last.1, last.2) == (run.1, run.2) => last.0 += run.0,
                    _ => out.push(run),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn range_set_merges_and_splits() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(15, 32);
        assert_eq!(r.split(0, 50), vec![(0, 10, false), (10, 40, true), (40, 50, false)]);
        r.insert(40, 45);
        assert_eq!(r.split(12, 44), vec![(12, 44, true)]);
        assert_eq!(r.split(45, 60), vec![(45, 60, false)]);
    }
}
