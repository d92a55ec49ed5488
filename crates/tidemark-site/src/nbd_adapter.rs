//! Serves the engine's volumes and images through the NBD server's [`ExportProvider`] traits.
//!
//! The NBD crate knows nothing of groups and journals and the engine nothing of NBD; this
//! module is the only place the two meet, so the error mapping below is the whole contract.

use std::sync::Arc;
use std::time::Duration;

use tidemark_engine::{Durability, Engine, EngineError, ExportDesc, ExportHandle, Punch};
use tidemark_nbd::export::{AllocationExtent, Export, ExportError, ExportInfo, ExportProvider, Operation};

use crate::metrics::{ExportIo, NbdIo};

/// Every volume (`VOLUME`) and image export (`IMAGE/VOLUME`) of an engine.
pub struct EngineExports {
    engine: Arc<Engine>,
    io: Arc<NbdIo>,
}

impl EngineExports {
    /// Exports of `engine`, counting their requests in counters of their own.
    pub fn new(engine: Arc<Engine>) -> EngineExports {
        EngineExports::with_io(engine, Arc::default())
    }

    /// Exports of `engine`, counting their requests in `io` (which the metrics endpoint reads).
    pub fn with_io(engine: Arc<Engine>, io: Arc<NbdIo>) -> EngineExports {
        EngineExports { engine, io }
    }
}

impl ExportProvider for EngineExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.engine.exports().into_iter().map(export_info).collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let handle = self.engine.open_export(name)?;
        Some(Arc::new(EngineExport { handle, io: self.io.export(name) }))
    }
}

/// One open export.
pub struct EngineExport {
    handle: Arc<ExportHandle>,
    io: Arc<ExportIo>,
}

impl EngineExport {
    /// Map an engine error for a request on `[offset, offset+length)`.
    fn error(&self, offset: u64, length: u64, error: EngineError) -> ExportError {
        map_error(&self.handle.desc(), offset, length, error)
    }
}

impl Export for EngineExport {
    fn info(&self) -> ExportInfo {
        export_info(self.handle.desc())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let length = buf.len() as u64;
        self.handle.read(offset, buf).map_err(|e| self.error(offset, length, e))
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), ExportError>> {
        let length = buf.len() as u64;
        let read = self.handle.try_read(offset, buf)?;
        Some(read.map_err(|e| self.error(offset, length, e)))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.handle.write(offset, data, durability(fua)).map_err(|e| self.error(offset, data.len() as u64, e))
    }

    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), ExportError>> {
        let written = self.handle.try_write(offset, data)?;
        Some(written.map_err(|e| self.error(offset, data.len() as u64, e)))
    }

    fn write_zeroes(&self, offset: u64, length: u64, fua: bool, may_punch: bool) -> Result<(), ExportError> {
        let punch = if may_punch { Punch::Allowed } else { Punch::Forbidden };
        self.handle
            .write_zeroes(offset, length, durability(fua), punch)
            .map_err(|e| self.error(offset, length, e))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.handle.trim(offset, length, durability(fua)).map_err(|e| self.error(offset, length, e))
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.handle.flush().map_err(|e| self.error(0, 0, e))
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<AllocationExtent>, ExportError> {
        let extents = self.handle.allocation(offset, length).map_err(|e| self.error(offset, length, e))?;
        // Unallocated ranges read as zeroes, so a hole is always also a zero extent.
        Ok(extents
            .into_iter()
            .map(|e| AllocationExtent {
                length_bytes: e.length_bytes,
                hole: !e.allocated,
                zero: !e.allocated,
            })
            .collect())
    }

    fn observe(&self, operation: Operation, bytes: u64, failed: bool, latency: Duration) {
        self.io.observe(operation, bytes, failed, latency);
    }
}

fn durability(fua: bool) -> Durability {
    if fua {
        Durability::Fua
    } else {
        Durability::Buffered
    }
}

fn export_info(desc: ExportDesc) -> ExportInfo {
    ExportInfo {
        name: desc.name,
        description: desc.description,
        size_bytes: desc.size_bytes,
        block_size_bytes: desc.block_size_bytes,
        read_only: desc.read_only,
    }
}

/// The mapping from engine errors to NBD errors.
///
/// An invalid argument is out-of-range when the request reaches past the end of the export
/// (the export may have just shrunk); otherwise the request was wrong in a way NBD has no
/// better word for than EIO. A vanished export (its volume or image deleted) is ESHUTDOWN,
/// which tells the client not to retry on this connection.
pub fn map_error(desc: &ExportDesc, offset: u64, length: u64, error: EngineError) -> ExportError {
    match error {
        // A secondary's volumes are read-only to hosts until the group is promoted, and so are
        // a primary's while it hands the role to its partner.
        EngineError::ReadOnly(_) | EngineError::NotPrimary { .. } | EngineError::RoleChanging { .. } => {
            ExportError::ReadOnly
        }
        EngineError::NotFound { .. } => ExportError::ShuttingDown,
        EngineError::InvalidArgument(reason) => {
            if offset.checked_add(length).is_none_or(|end| end > desc.size_bytes) {
                ExportError::OutOfRange { offset, length, size_bytes: desc.size_bytes }
            } else {
                ExportError::Io(format!("export {}: invalid argument: {reason}", desc.name))
            }
        }
        other @ (EngineError::Poisoned { .. }
        | EngineError::Failed { .. }
        | EngineError::Diverged { .. }
        | EngineError::Io { .. }
        | EngineError::Journal(_)
        | EngineError::Catalog(_)
        | EngineError::AlreadyExists { .. }
        | EngineError::PointOutOfRange { .. }
        | EngineError::Conflict(_)) => ExportError::Io(format!("export {}: {other}", desc.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> ExportDesc {
        ExportDesc {
            name: "vol".into(),
            description: "volume vol".into(),
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
            read_only: false,
        }
    }

    #[test]
    fn engine_errors_map_to_nbd_errors() {
        let d = desc();
        assert!(matches!(map_error(&d, 0, 1, EngineError::ReadOnly("vol".into())), ExportError::ReadOnly));
        assert!(matches!(
            map_error(&d, 0, 1, EngineError::NotFound { kind: "export", name: "vol".into() }),
            ExportError::ShuttingDown
        ));
        assert!(matches!(
            map_error(&d, (1 << 20) - 512, 4096, EngineError::InvalidArgument("past end".into())),
            ExportError::OutOfRange { offset, length: 4096, size_bytes } if offset == (1 << 20) - 512 && size_bytes == 1 << 20
        ));
        assert!(matches!(
            map_error(&d, u64::MAX, 2, EngineError::InvalidArgument("overflow".into())),
            ExportError::OutOfRange { .. }
        ));
        assert!(matches!(
            map_error(&d, 0, 4096, EngineError::InvalidArgument("unaligned".into())),
            ExportError::Io(m) if m.contains("unaligned")
        ));
        assert!(matches!(
            map_error(&d, 0, 1, EngineError::Poisoned { group: "g".into(), reason: "fsync".into() }),
            ExportError::Io(m) if m.contains("poisoned")
        ));
        assert!(matches!(
            map_error(&d, 0, 1, EngineError::Failed { group: "g".into(), reason: "bad checksum".into() }),
            ExportError::Io(m) if m.contains("bad checksum")
        ));
        let io =
            EngineError::Io { action: "read base", path: "/x".into(), source: std::io::Error::other("EIO") };
        assert!(matches!(map_error(&d, 0, 1, io), ExportError::Io(m) if m.contains("read base")));
    }
}
