//! A volume's base image: its state at the retention horizon, as sparse chunk files of
//! [`CHUNK_BYTES`] each (`base-VVVVVVVV-CCCCCC.img`), so a 64 TiB volume fits file systems whose
//! largest file is 16 TiB (ext4). Chunks are created on first write; a missing chunk, and any
//! byte past a chunk's end, reads as zeroes.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use tidemark_journal::storage::{Storage, StorageFile};
use tidemark_journal::VolumeId;

/// Prefix of the files of a baseline being received (see `crate::baseline`).
pub const STAGED_PREFIX: &str = "baseline.";

/// Bytes per chunk file: 1 TiB.
pub const CHUNK_BYTES: u64 = 1 << 40;

/// The base image of one volume.
pub struct BaseImage {
    storage: Arc<dyn Storage>,
    volume: VolumeId,
    /// Prefix of the chunk files' names: empty, or [`STAGED_PREFIX`] for a baseline being received.
    prefix: &'static str,
    chunks: Mutex<BTreeMap<u64, Option<Arc<dyn StorageFile>>>>,
}

impl BaseImage {
    /// The base of `volume` in `storage`; no file is touched until needed.
    pub fn new(storage: Arc<dyn Storage>, volume: VolumeId) -> BaseImage {
        BaseImage { storage, volume, prefix: "", chunks: Mutex::new(BTreeMap::new()) }
    }

    /// The staged base of `volume` in `storage`: a baseline being received, in files named
    /// [`STAGED_PREFIX`] + the chunk's name, beside (and never touching) the current base.
    pub fn staged(storage: Arc<dyn Storage>, volume: VolumeId) -> BaseImage {
        BaseImage { storage, volume, prefix: STAGED_PREFIX, chunks: Mutex::new(BTreeMap::new()) }
    }

    /// File name of chunk `chunk`.
    pub fn chunk_name(volume: VolumeId, chunk: u64) -> String {
        format!("base-{:08x}-{chunk:06x}.img", volume.0)
    }

    fn file_name(&self, chunk: u64) -> String {
        format!("{}{}", self.prefix, Self::chunk_name(self.volume, chunk))
    }

    /// Where a chunk lives, for messages.
    pub fn describe(&self, offset: u64) -> std::path::PathBuf {
        self.storage.describe(&self.file_name(offset / CHUNK_BYTES))
    }

    fn chunk(&self, chunk: u64, create: bool) -> io::Result<Option<Arc<dyn StorageFile>>> {
        let mut chunks = self.chunks.lock();
        if let Some(Some(file)) = chunks.get(&chunk) {
            return Ok(Some(file.clone()));
        }
        if !create && chunks.get(&chunk).is_some() {
            return Ok(None);
        }
        let name = self.file_name(chunk);
        let file = if create {
            let file = self.storage.open(&name)?;
            // The new directory entry must be durable with the first sync of its data.
            self.storage.sync_dir()?;
            Some(file)
        } else {
            self.storage.open_existing(&name)?
        };
        chunks.insert(chunk, file.clone());
        Ok(file)
    }

    /// Split `[offset, offset+len)` at chunk boundaries: (chunk, offset in chunk, len).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let end = offset.saturating_add(len);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = pos / CHUNK_BYTES;
            let within = pos % CHUNK_BYTES;
            let n = (CHUNK_BYTES - within).min(end - pos);
            pos += n;
            Some((chunk, within, n))
        })
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        for (chunk, within, n) in Self::pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + n as usize];
            done += n as usize;
            let Some(file) = self.chunk(chunk, false)? else {
                dst.fill(0);
                continue;
            };
            let avail = file.len()?.saturating_sub(within).min(n) as usize;
            let (head, tail) = dst.split_at_mut(avail);
            if !head.is_empty() {
                file.read_exact_at(head, within)?;
            }
            tail.fill(0);
        }
        Ok(())
    }

    /// [`BaseImage::read`], but only from memory: `None`, with `buf` in any state, when a chunk
    /// file is not open yet (opening one may wait), or its bytes are not cached, or the chunk
    /// table is busy.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let mut done = 0usize;
        for (chunk, within, n) in Self::pieces(offset, buf.len() as u64) {
            let dst = buf.get_mut(done..done + n as usize)?;
            done += n as usize;
            let file = match self.chunks.try_lock()?.get(&chunk) {
                Some(Some(file)) => file.clone(),
                // Known to be absent: a hole.
                Some(None) => {
                    dst.fill(0);
                    continue;
                }
                None => return None,
            };
            let avail = file.len().ok()?.saturating_sub(within).min(n) as usize;
            let (head, tail) = dst.split_at_mut(avail);
            if !head.is_empty() {
                file.try_read_exact_at(head, within)?;
            }
            tail.fill(0);
        }
        Some(())
    }

    /// Write `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        for (chunk, within, n) in Self::pieces(offset, data.len() as u64) {
            let file = self.chunk(chunk, true)?.ok_or_else(|| io::Error::other("chunk vanished"))?;
            file.write_all_at(&data[done..done + n as usize], within)?;
            done += n as usize;
        }
        Ok(())
    }

    /// Deallocate `[offset, offset+len)`.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        for (chunk, within, n) in Self::pieces(offset, len) {
            if let Some(file) = self.chunk(chunk, false)? {
                let flen = file.len()?;
                if within < flen {
                    file.punch_hole(within, n.min(flen - within))?;
                }
            }
        }
        Ok(())
    }

    /// Allocated ranges within `[offset, offset+len)`, in volume byte offsets.
    pub fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for (chunk, within, n) in Self::pieces(offset, len) {
            if let Some(file) = self.chunk(chunk, false)? {
                let base = chunk * CHUNK_BYTES;
                out.extend(file.data_ranges(within, n)?.into_iter().map(|(s, e)| (base + s, base + e)));
            }
        }
        Ok(out)
    }

    /// fdatasync every chunk that exists.
    pub fn sync(&self) -> io::Result<()> {
        let files: Vec<Arc<dyn StorageFile>> = self.chunks.lock().values().flatten().cloned().collect();
        for file in files {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Remove every chunk file (the volume was deleted).
    pub fn remove(&self) -> io::Result<()> {
        let prefix = format!("{}base-{:08x}-", self.prefix, self.volume.0);
        for name in self.storage.list()?.into_iter().filter(|n| n.starts_with(&prefix)) {
            self.storage.remove(&name)?;
        }
        self.chunks.lock().clear();
        self.storage.sync_dir()
    }
}
