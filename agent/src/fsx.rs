//! Crash-safe file primitives: write a temporary file, optionally fsync it, rename it over the
//! target, fsync the directory. A reader sees the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name beside `path` (same directory, so `rename` is atomic). Names start with
/// `.tmp-` so directory scans skip and clean them.
pub fn temp_beside(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".tmp-{}-{n}-{name}", std::process::id()))
}

/// Replaces `path` with `bytes` atomically. With `durable`, the data and the directory entry are
/// on stable storage when this returns (survives a power cut); without it, only a process crash.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = temp_beside(path);
    let r = write_then_rename(&tmp, path, bytes, durable);
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    write_new(tmp, bytes, durable)?;
    fs::rename(tmp, path)?;
    if durable {
        sync_parent(path)?;
    }
    Ok(())
}

/// Creates `path` (which must not exist) with `bytes`, fsynced when `durable`.
///
/// # Errors
/// Any I/O error, including `AlreadyExists`.
pub fn write_new(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    Ok(())
}

/// fsyncs a directory, making renames and creations inside it durable.
///
/// # Errors
/// Any I/O error.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs the directory holding `path`.
///
/// # Errors
/// Any I/O error.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Reads a file of at most `max` bytes.
///
/// # Errors
/// Any I/O error; `InvalidData` when the file is larger than `max`.
pub fn read_limited(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, above the limit of {max}",
                path.display()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// sha256 of a file, streamed.
///
/// # Errors
/// Any I/O error.
pub fn sha256_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut f = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// Removes leftover temporary files (`.tmp-*`) in `dir`.
pub fn remove_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

/// Creates `dir` (and parents); with `private`, mode 0700.
///
/// # Errors
/// Any I/O error.
pub fn create_dir(dir: &Path, private: bool) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    }
    #[cfg(not(unix))]
    let _ = private;
    b.create(dir)
}

#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    #[derive(Debug)]
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> Self {
            let n = super::TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("fedge-agent-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("test dir");
            Self(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::TestDir;
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = TestDir::new("fsx");
        let p = d.path().join("f");
        write_atomic(&p, b"one", true).expect("write");
        write_atomic(&p, b"two", false).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(d.path()).expect("dir").count(), 1);
        assert!(read_limited(&p, 2).is_err());
        assert_eq!(
            sha256_file(&p).expect("sha"),
            fedge_proto::chunk::sha256(b"two")
        );
        fs::write(temp_beside(&p), b"x").expect("temp");
        remove_temps(d.path());
        assert_eq!(fs::read_dir(d.path()).expect("dir").count(), 1);
    }
}
