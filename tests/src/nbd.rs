//! A minimal synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies), so tests can
//! know exactly which writes and flushes the server acknowledged before a crash.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// NBD_CMD_FLAG_FUA.
pub const FLAG_FUA: u16 = 1;

/// A connected client.
pub struct Client {
    stream: TcpStream,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    handle: u64,
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connect and negotiate `export` with NBD_OPT_GO.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(io::Error::other("bad server greeting"));
        }
        let _handshake_flags = read_u16(&mut s)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&IHAVEOPT.to_be_bytes())?;
        s.write_all(&OPT_GO.to_be_bytes())?;
        s.write_all(&(data.len() as u32).to_be_bytes())?;
        s.write_all(&data)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            if read_u64(&mut s)? != OPT_REPLY_MAGIC {
                return Err(io::Error::other("bad option reply magic"));
            }
            let _opt = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            let mut payload = vec![0; len];
            s.read_exact(&mut payload)?;
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                    size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                    flags = u16::from_be_bytes(payload[10..12].try_into().expect("2 bytes"));
                }
                REP_INFO => {}
                err => return Err(io::Error::other(format!("NBD_OPT_GO refused: reply type {err:#x}"))),
            }
        }
        Ok(Client { stream: s, size, flags, handle: 0 })
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u32> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req)?;
        if cmd == CMD_DISC {
            return Ok(0);
        }
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other("bad reply magic"));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != self.handle {
            return Err(io::Error::other("reply for another request"));
        }
        Ok(error)
    }

    fn check(error: u32, what: &str) -> io::Result<()> {
        if error == 0 {
            Ok(())
        } else {
            Err(io::Error::other(format!("{what} failed with NBD error {error}")))
        }
    }

    /// Write and wait for the reply.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<()> {
        let e = self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        Self::check(e, "write")
    }

    /// Read `len` bytes.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let e = self.request(CMD_READ, 0, offset, len, &[])?;
        Self::check(e, "read")?;
        let mut buf = vec![0; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Flush.
    pub fn flush(&mut self) -> io::Result<()> {
        let e = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        Self::check(e, "flush")
    }

    /// Disconnect politely.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
