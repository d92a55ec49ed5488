//! A small synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies), so the drill
//! knows exactly which of its writes and flushes a site acknowledged. One request at a time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
/// Most bytes an option reply may carry before the client gives up on the server.
const OPTION_REPLY_BYTES_MAX: usize = 64 * 1024;

/// How long one request may wait for its reply before the client treats the server as gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to one request.
#[derive(Debug)]
pub enum NbdError {
    /// The server answered with an NBD error (EPERM = 1 for a refused write, say).
    Refused(u32),
    /// The connection failed or the server sent something unexpected: the request's fate is
    /// unknown.
    Io(io::Error),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Refused(1) => {
                write!(f, "refused with EPERM (the export is read-only or its group is not primary)")
            }
            NbdError::Refused(code) => write!(f, "refused with NBD error {code}"),
            NbdError::Io(e) => write!(f, "no answer: {e}"),
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> NbdError {
        NbdError::Io(e)
    }
}

/// A connected client.
pub struct Client {
    stream: TcpStream,
    /// Export size in bytes.
    pub size: u64,
    handle: u64,
}

impl Client {
    /// Connect and negotiate `export` with NBD_OPT_GO.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(io::Error::other("bad server greeting"));
        }
        let _handshake_flags = read_u16(&mut s)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let name_len = u32::try_from(export.len()).map_err(|_| io::Error::other("export name too long"))?;
        let mut data = Vec::new();
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(data.len() as u32).to_be_bytes());
        option.extend_from_slice(&data);
        s.write_all(&option)?;
        let mut size = 0;
        loop {
            if read_u64(&mut s)? != OPT_REPLY_MAGIC {
                return Err(io::Error::other("bad option reply magic"));
            }
            let _opt = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > OPTION_REPLY_BYTES_MAX {
                return Err(io::Error::other("option reply too long"));
            }
            let mut payload = vec![0; len];
            s.read_exact(&mut payload)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if let (Some([0, 0]), Some(bytes)) = (payload.get(..2), payload.get(2..10)) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(bytes);
                        size = u64::from_be_bytes(b);
                    }
                }
                err => {
                    let message = String::from_utf8_lossy(&payload).into_owned();
                    return Err(io::Error::other(format!(
                        "export {export:?} refused (NBD option reply {err:#x}{}{message})",
                        if message.is_empty() { "" } else { ": " }
                    )));
                }
            }
        }
        Ok(Client { stream: s, size, handle: 0 })
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<(), NbdError> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req)?;
        if cmd == CMD_DISC {
            return Ok(());
        }
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other("bad reply magic").into());
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != self.handle {
            return Err(io::Error::other("reply for another request").into());
        }
        match error {
            0 => Ok(()),
            code => Err(NbdError::Refused(code)),
        }
    }

    /// Write and wait for the reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("write too large"))?;
        self.request(CMD_WRITE, offset, len, data)
    }

    /// Read `len` bytes.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, offset, len, &[])?;
        let mut buf = vec![0; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Flush: every write already answered is durable once this answers.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, &[])
    }

    /// Disconnect politely.
    pub fn disconnect(mut self) {
        // The connection is going away either way; a failed goodbye changes nothing.
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
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
