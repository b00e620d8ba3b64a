//! Save and restore of a client's pools as a versioned, checksummed, resumable stream.
//!
//! # Format (version 2, little endian)
//! ```text
//! header  "TMEMSAV1" | u16 version=2 | u16 flags (bit0 ephemeral included, bit1 continuation,
//!         bit2 resume inside a shard) | u32 source client | u32 resume.pool | u32 resume.shard
//!         | u64 resume.frames | [u64;3] resume.after object | u32 resume.after index
//!         | u32 crc32 of the 60 bytes before                                   (64 bytes)
//! frame   u8 type | u32 length (≤ 16 MiB) | payload | u32 crc32(type, length, payload)
//!   1 POOL   u32 local id | u8 persistent | u8 exclusive | u8 dedup | u8 codec | i8 level
//!            | u8 label length | label
//!   2 PAGES  u32 local id | records: [u64;3] object | u32 index | u8 kind
//!            kind 0: u64 word (same-filled page) | kind 1: u8 codec | u16 len | bytes
//!   3 END    u32 pools | u64 pages | u32 crc32 of every previous frame's crc
//! ```
//! A stream is written pool by pool and, inside a pool, shard by shard; inside a shard,
//! pages go in (object, index) order and are cut into PAGES frames of at most 8 MiB of
//! payload, so a shard of any size is saved as several bounded frames (restore refuses a
//! frame over 16 MiB). A save that fails part-way reports a [`SaveCursor`]: the shard it
//! was writing, the last page of that shard it wrote in a complete frame, and how many
//! frames were completely written. [`Engine::save`] with that cursor writes a
//! *continuation* stream holding the rest, and [`Engine::restore_parts`] restores the
//! interrupted part (cut at any frame boundary at or after the cursor's frame count is
//! rejected unless it matches exactly) followed by the continuation. Every part but the
//! last ends at a frame boundary without END; the continuation's header names how many
//! frames must precede it, so a lost frame is detected. [`Engine::restore`] reads one
//! whole stream. Both either apply all of it or — on any corruption, truncation or refused
//! put — destroy the pools they created, leaving the engine as it was (ephemeral pages of
//! other pools may have been evicted to make room, as they may be at any time).
//!
//! Version 1 streams (written before frames were bounded: a 36-byte header without the
//! `resume.after` fields and its crc over 32 bytes, one PAGES frame per shard, frames of
//! up to 64 MiB accepted) are still restored; any other version is refused with
//! [`StreamError::BadVersion`].

use std::io::{Read, Write};

use crate::config::{Codec, DedupScope, PoolSpec};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::types::*;

const MAGIC: &[u8; 8] = b"TMEMSAV1";
/// The version written.
const VERSION: u16 = 2;
/// The previous version, still restored.
const VERSION_1: u16 = 1;
const FLAG_EPHEMERAL: u16 = 1;
const FLAG_CONTINUATION: u16 = 2;
/// The continuation resumes inside a shard, after the page named in the header (v2).
const FLAG_RESUME_AFTER: u16 = 4;
const T_POOL: u8 = 1;
const T_PAGES: u8 = 2;
const T_END: u8 = 3;
/// Header length of a version 2 stream.
const HEADER_LEN: usize = 64;
/// Header length of a version 1 stream.
const HEADER_LEN_V1: usize = 36;
/// Largest frame payload restore accepts in a version 2 stream.
const MAX_FRAME: usize = 16 << 20;
/// Largest frame payload restore accepts in a version 1 stream (whose writer did not
/// bound its frames).
const MAX_FRAME_V1: usize = 64 << 20;
/// Payload bound of the PAGES frames a save writes.
const FRAME_LIMIT: usize = 8 << 20;
/// Largest page record: object, index, kind, codec, length and a whole page.
const MAX_RECORD: usize = 24 + 4 + 1 + 1 + 2 + PAGE_SIZE;
/// Smallest frame bound a save accepts: the pool id and one record of any size.
const MIN_FRAME_LIMIT: usize = 4 + MAX_RECORD;

/// A page as it is stored: a same-filled word or (codec tag, payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Same(u64),
    Data(u8, Vec<u8>),
}

/// Why a stream was rejected. The engine is unchanged when restore returns one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// Reading or writing the stream failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// Writing failed; saving again from this cursor continues where it stopped.
    #[error("write failed at cursor {cursor:?}: {message}")]
    WriteAt {
        /// Where to resume.
        cursor: SaveCursor,
        /// The I/O error.
        message: String,
    },
    /// The stream does not start with the tmem save magic.
    #[error("not a tmem save stream")]
    BadMagic,
    /// The stream's version is not supported.
    #[error("unsupported save version {0}")]
    BadVersion(u16),
    /// A frame's checksum does not match.
    #[error("checksum mismatch in frame {0}")]
    BadChecksum(u64),
    /// The stream ended early.
    #[error("stream truncated")]
    Truncated,
    /// A frame is malformed.
    #[error("malformed frame {frame}: {what}")]
    Malformed {
        /// Frame number.
        frame: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A continuation was given where a first stream was expected, or the reverse.
    #[error("stream parts out of order")]
    OutOfOrder,
}

/// Where a save stands: the next (pool position, shard) unit to write, the last page of
/// that shard already written in a complete frame (a shard may span several frames), and
/// how many frames were completely written before this point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaveCursor {
    /// Position of the pool in the client's pool list (by id).
    pub pool: u32,
    /// Shard inside that pool.
    pub shard: u32,
    /// Inside that shard, the last page (in (object, index) order) already written in a
    /// complete frame: the save resumes after it. `None`: from the shard's first page.
    pub after: Option<(ObjectId, PageIndex)>,
    /// Frames completely written before this point (END frames excluded).
    pub frames: u64,
}

/// Options of a save.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveOptions {
    /// Also save ephemeral pools (default: only persistent ones).
    pub include_ephemeral: bool,
    /// Continue an interrupted save from this cursor (writes a continuation stream).
    pub resume: Option<SaveCursor>,
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SaveReport {
    /// Pools described.
    pub pools: u32,
    /// Pages written.
    pub pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Keys put or flushed while the save ran (live save): the receiver must re-send or
    /// flush them. A key with index `u32::MAX` means the whole object was flushed.
    pub touched: Vec<PageKey>,
}

/// What a restore applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreReport {
    /// New pools, with the labels they were saved with.
    pub pools: Vec<(PoolId, String)>,
    /// Pages restored.
    pub pages: u64,
}

fn io(e: std::io::Error) -> StreamError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StreamError::Truncated
    } else {
        StreamError::Io(e.to_string())
    }
}

struct FrameWriter<'w, W: Write> {
    w: &'w mut W,
    bytes: u64,
    frames: u64,
    crcs: crc32fast::Hasher,
}

impl<W: Write> FrameWriter<'_, W> {
    fn frame(&mut self, t: u8, payload: &[u8]) -> std::io::Result<()> {
        let len = payload.len() as u32;
        let mut h = crc32fast::Hasher::new();
        h.update(&[t]);
        h.update(&len.to_le_bytes());
        h.update(payload);
        let crc = h.finalize();
        self.w.write_all(&[t])?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(payload)?;
        self.w.write_all(&crc.to_le_bytes())?;
        self.crcs.update(&crc.to_le_bytes());
        self.bytes += 9 + payload.len() as u64;
        self.frames += 1;
        Ok(())
    }
}

fn dedup_code(d: DedupScope) -> u8 {
    match d {
        DedupScope::Off => 0,
        DedupScope::Pool => 1,
        DedupScope::Client => 2,
        DedupScope::Global => 3,
    }
}

/// Bytes of a page record in a PAGES frame.
fn record_len(st: &Stored) -> usize {
    match st {
        Stored::Same(_) => 24 + 4 + 1 + 8,
        Stored::Data(_, bytes) => 24 + 4 + 1 + 1 + 2 + bytes.len(),
    }
}

/// Appends a page record to a PAGES frame.
fn put_record(b: &mut Vec<u8>, oid: ObjectId, idx: u32, st: &Stored) {
    for w in oid.0 {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.extend_from_slice(&idx.to_le_bytes());
    match st {
        Stored::Same(word) => {
            b.push(0);
            b.extend_from_slice(&word.to_le_bytes());
        }
        Stored::Data(codec, bytes) => {
            b.push(1);
            b.push(*codec);
            b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            b.extend_from_slice(bytes);
        }
    }
}

fn pool_frame(local: u32, spec: &PoolSpec) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + spec.label.len());
    b.extend_from_slice(&local.to_le_bytes());
    b.push(u8::from(spec.persistence == Persistence::Persistent));
    b.push(u8::from(spec.exclusive_gets));
    b.push(dedup_code(spec.dedup));
    let (c, l) = match spec.codec {
        Codec::None => (0, 0),
        Codec::Lz4 => (1, 0),
        Codec::Zstd(l) => (2, l),
    };
    b.push(c);
    b.push(l as u8);
    b.push(spec.label.len() as u8);
    b.extend_from_slice(spec.label.as_bytes());
    b
}

impl Engine {
    /// Saves `client`'s private pools (persistent, and ephemeral if asked) to `w`, while
    /// the engine keeps serving. Keys put or flushed during the save are reported in
    /// [`SaveReport::touched`] (Xen's live-migration approach).
    pub fn save<W: Write>(
        &self,
        client: ClientId,
        opts: SaveOptions,
        w: &mut W,
    ) -> Result<SaveReport> {
        self.save_with_frame_limit(client, opts, FRAME_LIMIT, w)
    }

    /// [`Engine::save`] with PAGES frames of at most `frame_limit` payload bytes instead of
    /// 8 MiB (clamped to what one page record needs and to what restore accepts). The
    /// stream is an ordinary one; this exists so that tests can split small shards into
    /// many frames.
    #[doc(hidden)]
    pub fn save_with_frame_limit<W: Write>(
        &self,
        client: ClientId,
        opts: SaveOptions,
        frame_limit: usize,
        w: &mut W,
    ) -> Result<SaveReport> {
        let c = self.client_info(client)?;
        *c.save_log.lock() = Some(Default::default());
        c.saving.store(true, std::sync::atomic::Ordering::Relaxed);
        let limit = frame_limit.clamp(MIN_FRAME_LIMIT, MAX_FRAME);
        let r = self.save_inner(client, opts, limit, w);
        c.saving.store(false, std::sync::atomic::Ordering::Relaxed);
        let touched = c.save_log.lock().take().unwrap_or_default();
        let mut rep = r?;
        rep.touched = touched.into_iter().collect();
        Ok(rep)
    }

    fn save_inner<W: Write>(
        &self,
        client: ClientId,
        opts: SaveOptions,
        limit: usize,
        w: &mut W,
    ) -> Result<SaveReport> {
        let pools: Vec<_> = self
            .pool_infos_of(client)
            .into_iter()
            .filter(|p| matches!(p.spec.sharing, Sharing::Private))
            .filter(|p| opts.include_ephemeral || p.spec.persistence == Persistence::Persistent)
            .collect();
        let start = opts.resume.unwrap_or_default();
        let mut flags = 0u16;
        if opts.include_ephemeral {
            flags |= FLAG_EPHEMERAL;
        }
        if opts.resume.is_some() {
            flags |= FLAG_CONTINUATION;
        }
        if start.after.is_some() {
            flags |= FLAG_RESUME_AFTER;
        }
        let werr = |cursor: SaveCursor| {
            move |e: std::io::Error| {
                Error::Stream(StreamError::WriteAt {
                    cursor,
                    message: e.to_string(),
                })
            }
        };
        let mut hdr = Vec::with_capacity(HEADER_LEN);
        hdr.extend_from_slice(MAGIC);
        hdr.extend_from_slice(&VERSION.to_le_bytes());
        hdr.extend_from_slice(&flags.to_le_bytes());
        hdr.extend_from_slice(&client.0.to_le_bytes());
        hdr.extend_from_slice(&start.pool.to_le_bytes());
        hdr.extend_from_slice(&start.shard.to_le_bytes());
        hdr.extend_from_slice(&start.frames.to_le_bytes());
        let (after_oid, after_idx) = start.after.unwrap_or((ObjectId::default(), PageIndex(0)));
        for w in after_oid.0 {
            hdr.extend_from_slice(&w.to_le_bytes());
        }
        hdr.extend_from_slice(&after_idx.0.to_le_bytes());
        let hcrc = crc32fast::hash(&hdr);
        hdr.extend_from_slice(&hcrc.to_le_bytes());
        w.write_all(&hdr).map_err(werr(start))?;
        let mut fw = FrameWriter {
            w,
            bytes: hdr.len() as u64,
            frames: start.frames,
            crcs: crc32fast::Hasher::new(),
        };
        let mut rep = SaveReport::default();
        let mut b = Vec::new();
        for (i, p) in pools.iter().enumerate().skip(start.pool as usize) {
            let pool = i as u32;
            let resumed = pool == start.pool;
            let first_shard = if resumed { start.shard } else { 0 };
            let at = SaveCursor {
                pool,
                shard: first_shard,
                after: if resumed { start.after } else { None },
                frames: fw.frames,
            };
            fw.frame(T_POOL, &pool_frame(pool, &p.spec))
                .map_err(werr(at))?;
            rep.pools += 1;
            for s in first_shard..self.shard_count() as u32 {
                let resume_after = if resumed && s == start.shard {
                    start.after
                } else {
                    None
                };
                let mut pages = self.snapshot_shard(s as usize, p.id);
                pages.sort_unstable_by_key(|(oid, idx, _)| (*oid, *idx));
                let from = resume_after.map_or(0, |(o, x)| {
                    pages.partition_point(|(oid, idx, _)| (*oid, *idx) <= (o, x.0))
                });
                // Cut the shard's pages into frames of at most `limit` payload bytes.
                let mut pages = pages.into_iter().skip(from).peekable();
                let mut after = resume_after;
                while pages.peek().is_some() {
                    b.clear();
                    b.extend_from_slice(&pool.to_le_bytes());
                    let mut n = 0u64;
                    let mut last = after;
                    while let Some((_, _, st)) = pages.peek() {
                        if n > 0 && b.len() + record_len(st) > limit {
                            break;
                        }
                        let Some((oid, idx, st)) = pages.next() else {
                            break;
                        };
                        put_record(&mut b, oid, idx, &st);
                        n += 1;
                        last = Some((oid, PageIndex(idx)));
                    }
                    let cursor = SaveCursor {
                        pool,
                        shard: s,
                        after,
                        frames: fw.frames,
                    };
                    fw.frame(T_PAGES, &b).map_err(werr(cursor))?;
                    rep.pages += n;
                    after = last;
                }
            }
        }
        let mut end = Vec::with_capacity(16);
        end.extend_from_slice(&rep.pools.to_le_bytes());
        end.extend_from_slice(&rep.pages.to_le_bytes());
        end.extend_from_slice(&fw.crcs.clone().finalize().to_le_bytes());
        let done = SaveCursor {
            pool: pools.len() as u32,
            shard: 0,
            after: None,
            frames: fw.frames,
        };
        fw.frame(T_END, &end).map_err(werr(done))?;
        fw.w.flush().map_err(werr(done))?;
        rep.bytes = fw.bytes;
        Ok(rep)
    }

    /// Restores a save stream into `client` (which must exist; it may differ from the
    /// client that was saved). Creates new pools; returns them with their labels.
    pub fn restore<R: Read>(&self, client: ClientId, r: &mut R) -> Result<RestoreReport> {
        self.restore_parts(client, &mut [r])
    }

    /// Restores a first stream followed by its continuation streams, all or nothing.
    pub fn restore_parts<R: Read>(
        &self,
        client: ClientId,
        parts: &mut [&mut R],
    ) -> Result<RestoreReport> {
        self.client_info(client)?;
        let mut st = RestoreState {
            map: Vec::new(),
            report: RestoreReport::default(),
            frame: 0,
            data_frames: 0,
            created: Vec::new(),
        };
        let n_parts = parts.len();
        if n_parts == 0 {
            return Err(StreamError::Truncated.into());
        }
        for (n, r) in parts.iter_mut().enumerate() {
            if let Err(e) = self.restore_one(client, *r, n == 0, n + 1 == n_parts, &mut st) {
                self.rollback_pools(client, &st.created);
                return Err(e);
            }
        }
        Ok(st.report)
    }

    fn restore_one<R: Read>(
        &self,
        client: ClientId,
        r: &mut R,
        first: bool,
        last: bool,
        st: &mut RestoreState,
    ) -> Result<()> {
        let mut hdr = [0u8; HEADER_LEN];
        let got = read_full(r, &mut hdr[..10]).map_err(io)?;
        if got < 8 || &hdr[..8] != MAGIC {
            return Err(StreamError::BadMagic.into());
        }
        if got < 10 {
            return Err(StreamError::Truncated.into());
        }
        let version = u16::from_le_bytes([hdr[8], hdr[9]]);
        let (hlen, max_frame, known_flags) = match version {
            VERSION => (
                HEADER_LEN,
                MAX_FRAME,
                FLAG_EPHEMERAL | FLAG_CONTINUATION | FLAG_RESUME_AFTER,
            ),
            VERSION_1 => (
                HEADER_LEN_V1,
                MAX_FRAME_V1,
                FLAG_EPHEMERAL | FLAG_CONTINUATION,
            ),
            v => return Err(StreamError::BadVersion(v).into()),
        };
        let hdr = &mut hdr[..hlen];
        if read_full(r, &mut hdr[10..]).map_err(io)? < hlen - 10 {
            return Err(StreamError::Truncated.into());
        }
        if crc32fast::hash(&hdr[..hlen - 4]).to_le_bytes() != hdr[hlen - 4..] {
            return Err(StreamError::BadChecksum(0).into());
        }
        let flags = u16::from_le_bytes([hdr[10], hdr[11]]);
        if flags & !known_flags != 0 {
            return Err(StreamError::Malformed {
                frame: 0,
                what: "unknown header flags",
            }
            .into());
        }
        if (flags & FLAG_CONTINUATION != 0) == first {
            return Err(StreamError::OutOfOrder.into());
        }
        if flags & FLAG_RESUME_AFTER != 0 && flags & FLAG_CONTINUATION == 0 {
            return Err(StreamError::Malformed {
                frame: 0,
                what: "resume position in a first stream",
            }
            .into());
        }
        let mut fb = [0u8; 8];
        fb.copy_from_slice(&hdr[24..32]);
        if u64::from_le_bytes(fb) != st.data_frames {
            // A continuation must follow exactly the frames its save had written.
            return Err(StreamError::OutOfOrder.into());
        }
        let mut crcs = crc32fast::Hasher::new();
        let mut pools_in_part = 0u32;
        let mut pages_in_part = 0u64;
        let mut payload = Vec::new();
        loop {
            st.frame += 1;
            let frame = st.frame;
            let mut th = [0u8; 5];
            let got = read_full(r, &mut th).map_err(io)?;
            if got == 0 && !last {
                // A part that is continued elsewhere ends at a frame boundary.
                return Ok(());
            }
            if got < th.len() {
                return Err(StreamError::Truncated.into());
            }
            let t = th[0];
            let len = u32::from_le_bytes([th[1], th[2], th[3], th[4]]) as usize;
            if len > max_frame {
                return Err(StreamError::Malformed {
                    frame,
                    what: "frame too large",
                }
                .into());
            }
            payload.clear();
            payload.resize(len, 0);
            r.read_exact(&mut payload).map_err(io)?;
            let mut crcb = [0u8; 4];
            r.read_exact(&mut crcb).map_err(io)?;
            let mut h = crc32fast::Hasher::new();
            h.update(&th);
            h.update(&payload);
            if h.finalize() != u32::from_le_bytes(crcb) {
                return Err(StreamError::BadChecksum(frame).into());
            }
            let mut p = Parser { b: &payload, frame };
            match t {
                T_POOL => {
                    let local = p.u32()?;
                    let persistent = p.u8()? != 0;
                    let exclusive = p.u8()? != 0;
                    let dedup = match p.u8()? {
                        0 => DedupScope::Off,
                        1 => DedupScope::Pool,
                        2 => DedupScope::Client,
                        3 => DedupScope::Global,
                        _ => return Err(p.bad("unknown dedup scope")),
                    };
                    let codec = match (p.u8()?, p.u8()? as i8) {
                        (0, _) => Codec::None,
                        (1, _) => Codec::Lz4,
                        (2, l) if (1..=19).contains(&l) => Codec::Zstd(l),
                        _ => return Err(p.bad("unknown codec")),
                    };
                    let ll = p.u8()? as usize;
                    let label = String::from_utf8(p.take(ll)?.to_vec())
                        .map_err(|_| p.bad("label is not UTF-8"))?;
                    p.end()?;
                    if st.map.iter().any(|(l, _)| *l == local) {
                        // A continuation repeats the pool it resumes in; it maps to the same pool.
                        pools_in_part += 1;
                    } else {
                        let spec = PoolSpec {
                            persistence: if persistent {
                                Persistence::Persistent
                            } else {
                                Persistence::Ephemeral
                            },
                            sharing: Sharing::Private,
                            exclusive_gets: exclusive,
                            dedup,
                            codec,
                            label: label.clone(),
                        };
                        let id = self.create_pool(client, spec)?;
                        st.created.push(id);
                        st.map.push((local, id));
                        st.report.pools.push((id, label));
                        pools_in_part += 1;
                    }
                }
                T_PAGES => {
                    let local = p.u32()?;
                    let Some(&(_, pool)) = st.map.iter().find(|(l, _)| *l == local) else {
                        return Err(p.bad("pages of an undeclared pool"));
                    };
                    let mut page = [0u8; PAGE_SIZE];
                    while !p.b.is_empty() {
                        let oid = ObjectId([p.u64()?, p.u64()?, p.u64()?]);
                        let idx = p.u32()?;
                        match p.u8()? {
                            0 => crate::codec::fill_same(&mut page, p.u64()?),
                            1 => {
                                let tag = p.u8()?;
                                let n = u16::from_le_bytes([p.u8()?, p.u8()?]) as usize;
                                let bytes = p.take(n)?;
                                if !crate::codec::decompress(tag, bytes, &mut page) {
                                    return Err(p.bad("page data does not decode"));
                                }
                            }
                            _ => return Err(p.bad("unknown page kind")),
                        }
                        self.put(client, PageKey::new(pool, oid, idx), &page)?;
                        pages_in_part += 1;
                        st.report.pages += 1;
                    }
                }
                T_END => {
                    let pools = p.u32()?;
                    let pages = p.u64()?;
                    let crc = p.u32()?;
                    p.end()?;
                    if crc != crcs.clone().finalize() {
                        return Err(StreamError::BadChecksum(frame).into());
                    }
                    if pools != pools_in_part || pages != pages_in_part {
                        return Err(p.bad("counts do not match the frames"));
                    }
                    if !last {
                        return Err(StreamError::OutOfOrder.into());
                    }
                    return Ok(());
                }
                _ => return Err(p.bad("unknown frame type")),
            }
            crcs.update(&crcb);
            st.data_frames += 1;
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct RestoreState {
    map: Vec<(u32, PoolId)>,
    report: RestoreReport,
    frame: u64,
    data_frames: u64,
    created: Vec<PoolId>,
}

struct Parser<'a> {
    b: &'a [u8],
    frame: u64,
}

impl<'a> Parser<'a> {
    fn bad(&self, what: &'static str) -> Error {
        StreamError::Malformed {
            frame: self.frame,
            what,
        }
        .into()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(self.bad("record runs past the frame"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn end(&self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes in frame"))
        }
    }
}
