//! Files as the journal and engine see them, behind a trait so tests can lose power.
//!
//! [`OsStorage`] is a directory on a real file system. [`SimStorage`] keeps, for every file, a
//! *live* image (what reads see) and a *durable* image (what survives a crash), and can crash at
//! will: unsynced writes are dropped, or torn (a random prefix of the unsynced pages survives).
//! Directory entries are durable only after [`Storage::sync_dir`].

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One open file.
#[allow(clippy::len_without_is_empty)] // A file's length is a size, not a collection's.
pub trait StorageFile: Send + Sync {
    /// Read exactly `buf.len()` bytes at `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`StorageFile::read_exact_at`], but only if the bytes are in memory already: `Some`
    /// with the whole read done, or `None` when it would have to wait for the disk (or fails:
    /// the caller then reads with [`StorageFile::read_exact_at`], which says why), with `buf`
    /// in any state. The default never tries.
    fn try_read_exact_at(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        let _ = (buf, offset);
        None
    }
    /// Write all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Write `bufs`, one after another, at `offset`, as [`StorageFile::write_all_at`] would
    /// write their concatenation. The default joins them first; a file that can write from
    /// several buffers at once (`pwritev`) does so without the copy.
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match bufs {
            [one] => self.write_all_at(one, offset),
            _ => self.write_all_at(&bufs.concat(), offset),
        }
    }
    /// Make every write so far durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend (with zeroes) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocate `[offset, offset+len)`; it reads as zeroes afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The allocated (data) ranges within `[offset, offset+len)`, as `(start, end)` byte pairs
    /// in order. May over-report (a range that reads as zeroes), never under-report.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>>;
    /// Tell the kernel the file's cached pages will not be needed soon (after it was synced),
    /// so that new writes reuse those pages instead of touching fresh memory. A hint only.
    fn drop_cache(&self) {}
}

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A flat directory of files.
pub trait Storage: Send + Sync {
    /// Open `name`, creating it empty if it does not exist.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Open `name` only if it exists.
    fn open_existing(&self, name: &str) -> io::Result<Option<Arc<dyn StorageFile>>>;
    /// Names of all files, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Remove `name` (not durable until [`Storage::sync_dir`]).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replace `to` with `from` (not durable until [`Storage::sync_dir`]).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Make creations, removals and renames durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Where the files live, for messages.
    fn describe(&self, name: &str) -> PathBuf;
}

/// Write `bytes` to `name` crash-safely: temp file, fdatasync, rename, directory sync.
pub fn replace_file(storage: &dyn Storage, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let file = storage.open(&tmp)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    storage.rename(&tmp, name)?;
    storage.sync_dir()
}

/// Read a whole file, or `None` when it does not exist.
pub fn read_file(storage: &dyn Storage, name: &str) -> io::Result<Option<Vec<u8>>> {
    let Some(file) = storage.open_existing(name)? else {
        return Ok(None);
    };
    let len = usize::try_from(file.len()?).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

/// A directory on the real file system.
#[derive(Debug)]
pub struct OsStorage {
    dir: PathBuf,
}

impl OsStorage {
    /// Use `dir`, creating it if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(OsStorage { dir: dir.as_ref().to_path_buf() })
    }
}

struct OsFile(File);

impl StorageFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn try_read_exact_at(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        use rustix::io::{preadv2, ReadWriteFlags};
        // RWF_NOWAIT: the page cache or EAGAIN, never the disk. A short read (part cached, or
        // the end of the file) is left to the waiting path, as is any error.
        let len = buf.len();
        let read = preadv2(&self.0, &mut [io::IoSliceMut::new(buf)], offset, ReadWriteFlags::NOWAIT);
        (read.ok()? == len).then_some(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn write_all_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice> =
            bufs.iter().filter(|b| !b.is_empty()).map(|b| io::IoSlice::new(b)).collect();
        let mut rest = slices.as_mut_slice();
        while !rest.is_empty() {
            // At most IOV_MAX buffers per call; a short write continues where it stopped.
            let batch = rest.len().min(IOV_MAX);
            let written = match rustix::io::pwritev(&self.0, rest.get(..batch).unwrap_or_default(), offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            offset += written as u64;
            io::IoSlice::advance_slices(&mut rest, written);
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(&self.0, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(io::Error::from)
    }
    fn drop_cache(&self) {
        // A hint: failure changes nothing but memory use.
        let _ = rustix::fs::fadvise(&self.0, 0, None, rustix::fs::Advice::DontNeed);
    }
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let end = offset.saturating_add(len).min(self.len()?);
        let mut ranges = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.0, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = seek(&self.0, SeekFrom::Hole(data)).map_err(io::Error::from)?.min(end);
            ranges.push((data, hole));
            pos = hole;
        }
        Ok(ranges)
    }
}

impl Storage for OsStorage {
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(name))?;
        Ok(Arc::new(OsFile(file)))
    }
    fn open_existing(&self, name: &str) -> io::Result<Option<Arc<dyn StorageFile>>> {
        match OpenOptions::new().read(true).write(true).open(self.dir.join(name)) {
            Ok(file) => Ok(Some(Arc::new(OsFile(file)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn describe(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How a simulated crash treats writes that were never synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost (a clean power cut after the last sync).
    DropUnsynced,
    /// Each unsynced 512-byte sector independently survives or not: torn writes.
    TearUnsynced,
}

#[derive(Default)]
struct SimFileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Sectors written since the last sync (512-byte granularity).
    dirty_sectors: std::collections::BTreeSet<u64>,
}

struct SimInner {
    /// Live directory: name -> file.
    live: BTreeMap<String, Arc<SimFile>>,
    /// Durable directory: what a crash returns to.
    durable: BTreeMap<String, Arc<SimFile>>,
    /// Number of syncs left before every sync fails (fault injection), if set.
    syncs_until_failure: Option<u64>,
}

/// A file of [`SimStorage`].
pub struct SimFile {
    state: Mutex<SimFileState>,
    storage: std::sync::Weak<Mutex<SimInner>>,
}

const SECTOR_BYTES: u64 = 512;

impl SimFile {
    fn check_sync_budget(&self) -> io::Result<()> {
        let Some(inner) = self.storage.upgrade() else { return Ok(()) };
        let mut inner = inner.lock();
        match inner.syncs_until_failure.as_mut() {
            Some(0) => Err(io::Error::other("injected fsync failure")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl StorageFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| state.live.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn try_read_exact_at(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        // Everything is in memory, but a read that fails is left to `read_exact_at` to explain.
        self.read_exact_at(buf, offset).ok()
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        let end = start + buf.len();
        if state.live.len() < end {
            state.live.resize(end, 0);
        }
        if let Some(dst) = state.live.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        let first = offset / SECTOR_BYTES;
        let last = (end as u64).div_ceil(SECTOR_BYTES);
        state.dirty_sectors.extend(first..last);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check_sync_budget()?;
        let mut state = self.state.lock();
        state.durable = state.live.clone();
        state.dirty_sectors.clear();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().live.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        let len = usize::try_from(len).map_err(|_| io::Error::other("len"))?;
        let old = state.live.len();
        state.live.resize(len, 0);
        // A size change is metadata that a later sync_data makes durable; mark the changed
        // range dirty so a crash before the sync can lose it.
        let (lo, hi) = (old.min(len) as u64, old.max(len) as u64);
        state.dirty_sectors.extend(lo / SECTOR_BYTES..hi.div_ceil(SECTOR_BYTES).max(lo / SECTOR_BYTES + 1));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        if end > offset {
            let zeroes = vec![0; usize::try_from(end - offset).map_err(|_| io::Error::other("len"))?];
            self.write_all_at(&zeroes, offset)?;
        }
        Ok(())
    }
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        // The simulation reports every non-zero sector as data: a valid over-approximation.
        let state = self.state.lock();
        let end = offset.saturating_add(len).min(state.live.len() as u64);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / SECTOR_BYTES) + 1) * SECTOR_BYTES;
            let hi = next.min(end);
            let nonzero =
                state.live.get(pos as usize..hi as usize).is_some_and(|s| s.iter().any(|&b| b != 0));
            if nonzero {
                match ranges.last_mut() {
                    Some(last) if last.1 == pos => last.1 = hi,
                    _ => ranges.push((pos, hi)),
                }
            }
            pos = hi;
        }
        Ok(ranges)
    }
}

/// An in-memory [`Storage`] that can crash, tear unsynced writes and fail syncs on demand.
#[derive(Clone)]
pub struct SimStorage {
    inner: Arc<Mutex<SimInner>>,
}

impl Default for SimStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl SimStorage {
    /// An empty storage.
    pub fn new() -> Self {
        SimStorage {
            inner: Arc::new(Mutex::new(SimInner {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                syncs_until_failure: None,
            })),
        }
    }

    /// After `n` more successful syncs, every sync fails (like a disk that went bad).
    pub fn fail_syncs_after(&self, n: Option<u64>) {
        self.inner.lock().syncs_until_failure = n;
    }

    /// Lose power: return every file and the directory to their durable state (tearing unsynced
    /// writes under [`CrashMode::TearUnsynced`], driven by `seed`). Handles opened before the
    /// crash must not be used afterwards.
    pub fn crash(&self, mode: CrashMode, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut inner = self.inner.lock();
        let durable = inner.durable.clone();
        let mut fresh = BTreeMap::new();
        for (name, file) in durable {
            let state = file.state.lock();
            let mut image = state.durable.clone();
            if mode == CrashMode::TearUnsynced {
                for &sector in &state.dirty_sectors {
                    if rng.random_bool(0.5) {
                        let lo = (sector * SECTOR_BYTES) as usize;
                        let hi = (lo + SECTOR_BYTES as usize).min(state.live.len());
                        if hi > lo {
                            if image.len() < hi {
                                image.resize(hi, 0);
                            }
                            if let (Some(dst), Some(src)) = (image.get_mut(lo..hi), state.live.get(lo..hi)) {
                                dst.copy_from_slice(src);
                            }
                        }
                    }
                }
            }
            let new_file = Arc::new(SimFile {
                state: Mutex::new(SimFileState {
                    live: image.clone(),
                    durable: image,
                    dirty_sectors: Default::default(),
                }),
                storage: Arc::downgrade(&self.inner),
            });
            fresh.insert(name, new_file);
        }
        inner.live = fresh.clone();
        inner.durable = fresh;
    }
}

impl Storage for SimStorage {
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut inner = self.inner.lock();
        if let Some(file) = inner.live.get(name) {
            return Ok(file.clone());
        }
        let file = Arc::new(SimFile {
            state: Mutex::new(SimFileState::default()),
            storage: Arc::downgrade(&self.inner),
        });
        inner.live.insert(name.to_string(), file.clone());
        Ok(file)
    }
    fn open_existing(&self, name: &str) -> io::Result<Option<Arc<dyn StorageFile>>> {
        Ok(self.inner.lock().live.get(name).map(|f| f.clone() as Arc<dyn StorageFile>))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.inner.lock().live.keys().cloned().collect())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.lock().live.remove(name);
        Ok(())
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut inner = self.inner.lock();
        let file = inner
            .live
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "rename source"))?;
        inner.live.insert(to.to_string(), file);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.durable = inner.live.clone();
        Ok(())
    }
    fn describe(&self, name: &str) -> PathBuf {
        PathBuf::from("sim").join(name)
    }
}
