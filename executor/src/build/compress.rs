//! Layer compression on every core, with output bytes that depend only on
//! the input and the level, never on the thread count or on timing (so
//! `--reproducible` and cache keys keep their meaning on any machine).
//!
//! - gzip ([`ParallelGzip`]): the input is cut into fixed [`GZIP_BLOCK`]-byte
//!   blocks; each is deflated independently (primed with the previous
//!   block's last 32 KiB as dictionary, which depends only on the input)
//!   and ended with a sync flush, so the pieces join at byte boundaries into
//!   ONE ordinary gzip member: one header, the deflate data, one CRC-32 and
//!   size trailer (the layout pigz writes). Any gzip reader accepts it,
//!   single-member ones included. A pool of worker threads compresses the
//!   blocks; the caller's thread keeps the order, the CRC and the output.
//!   Memory is bounded: at most `2 × threads` blocks are in flight.
//! - zstd ([`zstd_encoder`]): libzstd's own multithreaded mode, always with
//!   at least one worker. libzstd's multithreaded output is the same for any
//!   worker count ≥ 1 (it differs from the single-threaded mode, which is
//!   therefore never used), so the bytes do not depend on the machine.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// Input bytes per independently compressed gzip block. Part of the output
/// format: changing it changes every gzip layer digest.
pub const GZIP_BLOCK: usize = 256 * 1024;
/// deflate's window: the dictionary carried from one block to the next.
const DICT: usize = 32 * 1024;

/// Worker threads to use when the caller asks for 0 ("all cores").
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        default_threads()
    } else {
        threads
    }
}

/// A zstd encoder in libzstd's multithreaded mode with `threads` workers
/// (0: all cores; never fewer than one, see the module docs).
pub fn zstd_encoder<W: Write>(
    out: W,
    level: i32,
    threads: usize,
) -> io::Result<zstd::Encoder<'static, W>> {
    let mut enc = zstd::Encoder::new(out, level)?;
    let workers = u32::try_from(resolve_threads(threads).max(1)).unwrap_or(u32::MAX);
    enc.multithread(workers)?;
    Ok(enc)
}

struct Job {
    dict: Vec<u8>,
    data: Vec<u8>,
    last: bool,
    reply: SyncSender<io::Result<Vec<u8>>>,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize, level: u32) -> io::Result<Pool> {
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let handle = std::thread::Builder::new()
                .name(format!("gzip-{i}"))
                .spawn(move || worker(&rx, level))?;
            workers.push(handle);
        }
        Ok(Pool {
            jobs: Some(tx),
            workers,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends every worker's loop.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, level: u32) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let out = deflate_block(level, &job.dict, &job.data, job.last);
        // The receiver is gone only when the encoder was dropped mid-stream.
        let _ = job.reply.send(out);
    }
}

/// Raw deflate of one block: non-final blocks end with a sync flush (byte
/// aligned, not final), the last one finishes the deflate stream.
fn deflate_block(level: u32, dict: &[u8], data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity());
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let done_input = c.total_in() as usize == data.len();
        match status {
            Status::StreamEnd => break,
            // A flush is complete once it left output space unused.
            Status::Ok | Status::BufError if !last && done_input && out.len() < out.capacity() => {
                break;
            }
            Status::Ok | Status::BufError => {}
        }
    }
    Ok(out)
}

/// A gzip writer compressing on several threads; see the module docs.
/// Call [`ParallelGzip::finish`] to write the end of the stream.
pub struct ParallelGzip<W: Write> {
    out: W,
    level: u32,
    block: Vec<u8>,
    dict: Vec<u8>,
    crc: flate2::Crc,
    pool: Option<Pool>,
    pending: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_pending: usize,
}

impl<W: Write> ParallelGzip<W> {
    /// `level` 0–9 (higher values are clamped to 9); `threads` 0 means all
    /// cores. With one thread the blocks are compressed inline, to the same
    /// bytes.
    pub fn new(mut out: W, level: u32, threads: usize) -> io::Result<Self> {
        let level = level.min(9);
        let threads = resolve_threads(threads);
        let xfl = match level {
            9 => 2,
            0 | 1 => 4,
            _ => 0,
        };
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=unknown.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
        let pool = if threads > 1 {
            Some(Pool::new(threads, level)?)
        } else {
            None
        };
        Ok(ParallelGzip {
            out,
            level,
            block: Vec::with_capacity(GZIP_BLOCK),
            dict: Vec::new(),
            crc: flate2::Crc::new(),
            pool,
            pending: VecDeque::new(),
            max_pending: threads * 2,
        })
    }

    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.block,
            if last {
                Vec::new()
            } else {
                Vec::with_capacity(GZIP_BLOCK)
            },
        );
        self.crc.update(&data);
        let next_dict = data[data.len().saturating_sub(DICT)..].to_vec();
        let dict = std::mem::replace(&mut self.dict, next_dict);
        match &self.pool {
            None => {
                let bytes = deflate_block(self.level, &dict, &data, last)?;
                self.out.write_all(&bytes)?;
            }
            Some(pool) => {
                let (reply, rx) = sync_channel(1);
                let job = Job {
                    dict,
                    data,
                    last,
                    reply,
                };
                let sent = pool.jobs.as_ref().map(|tx| tx.send(job));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(io::Error::other("gzip worker threads stopped"));
                }
                self.pending.push_back(rx);
                while self.pending.len() >= self.max_pending {
                    self.write_oldest()?;
                }
            }
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let bytes = rx
                .recv()
                .map_err(|_| io::Error::other("a gzip worker thread died"))??;
            self.out.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Compresses what is left, writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        let crc = self.crc.sum();
        let size = self.crc.amount();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&size.to_le_bytes())?;
        drop(self.pool.take());
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (GZIP_BLOCK - self.block.len()).min(data.len());
        self.block.extend_from_slice(&data[..n]);
        if self.block.len() == GZIP_BLOCK {
            self.dispatch(false)?;
        }
        Ok(n)
    }

    /// Blocks are cut by size only (so the bytes do not depend on flush
    /// calls): this flushes nothing.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Mixed input: runs of text (compressible) and xorshift noise.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                v.extend_from_slice(b"the quick brown fox jumps over the lazy dog ");
            } else {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        v.truncate(len);
        v
    }

    fn gzip(data: &[u8], level: u32, threads: usize, write_size: usize) -> Vec<u8> {
        let mut enc = ParallelGzip::new(Vec::new(), level, threads).unwrap();
        for piece in data.chunks(write_size.max(1)) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap()
    }

    fn gunzip_flate2(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        // The single-member decoder: the stream must be ONE gzip member.
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn gunzip_cli(gz: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, gz).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("gzip CLI");
        assert!(
            out.status.success(),
            "gzip -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn gzip_stream_decompresses_to_the_input_with_flate2_and_gzip_cli() {
        for len in [
            0,
            1,
            1000,
            GZIP_BLOCK - 1,
            GZIP_BLOCK,
            GZIP_BLOCK + 1,
            5 * GZIP_BLOCK + 12345,
        ] {
            let data = sample(len);
            let gz = gzip(&data, 6, 3, 100_000);
            assert_eq!(gunzip_flate2(&gz), data, "flate2, {len} bytes");
            assert_eq!(gunzip_cli(&gz), data, "gzip -d, {len} bytes");
        }
    }

    #[test]
    fn gzip_bytes_depend_only_on_input_and_level_not_threads_or_write_sizes() {
        let data = sample(7 * GZIP_BLOCK + 777);
        for level in [0, 1, 6, 9] {
            let one = gzip(&data, level, 1, GZIP_BLOCK);
            for (threads, write_size) in [(2, 4096), (4, 1), (8, 3 * GZIP_BLOCK)] {
                if write_size == 1 && level != 6 {
                    continue;
                }
                assert_eq!(
                    gzip(&data, level, threads, write_size),
                    one,
                    "level {level}, {threads} threads, writes of {write_size}"
                );
            }
            assert_eq!(gunzip_flate2(&one), data);
        }
    }

    #[test]
    fn gzip_empty_input_is_a_valid_empty_stream() {
        let gz = gzip(&[], 6, 4, 1);
        assert_eq!(gz, gzip(&[], 6, 1, 1));
        assert!(gunzip_flate2(&gz).is_empty());
        assert!(gunzip_cli(&gz).is_empty());
    }

    #[test]
    fn gzip_compresses_compressible_input() {
        let data = b"abcdefgh".repeat(GZIP_BLOCK / 2);
        let gz = gzip(&data, 6, 2, 65536);
        assert!(gz.len() < data.len() / 50, "{} bytes", gz.len());
    }

    #[test]
    fn gzip_write_error_is_reported() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 < b.len() {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "full"));
                }
                self.0 -= b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = sample(4 * GZIP_BLOCK);
        let mut enc = ParallelGzip::new(Full(1000), 6, 2).unwrap();
        let err = enc.write_all(&data).and_then(|()| enc.finish().map(drop));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::StorageFull);
    }

    fn zstd_bytes(data: &[u8], threads: usize) -> Vec<u8> {
        let mut enc = zstd_encoder(Vec::new(), 3, threads).unwrap();
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn zstd_multithreaded_bytes_do_not_depend_on_the_worker_count() {
        // Larger than several libzstd jobs (8 MiB at level 3), so the
        // workers really split it.
        let data = sample(40 << 20);
        let one = zstd_bytes(&data, 1);
        assert_eq!(zstd_bytes(&data, 2), one);
        assert_eq!(zstd_bytes(&data, 5), one);
        let mut back = Vec::new();
        zstd::Decoder::new(&one[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
