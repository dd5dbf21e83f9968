//! Test support: a file whose read blocks, to prove a reader is off the runtime thread.
//!
//! `path` becomes a FIFO nobody writes yet, so opening it for reading blocks. The test's own
//! loop (which needs the runtime to run) waits for a reader to appear and then hands it
//! `contents`. On a single-threaded runtime, a watcher that opened the file on the runtime thread
//! would stop everything, and the hand-over would never happen.

use std::{fs::OpenOptions, io::Write, os::unix::fs::OpenOptionsExt, path::Path, time::Duration};

/// Makes `path` a FIFO and hands `contents` to its first reader; whether that happened within
/// 10 s (`false`: the runtime was stalled).
pub async fn hand_over(path: &Path, contents: &[u8]) -> bool {
    let _ = std::fs::remove_file(path);
    let Some(fifo) = path.to_str().and_then(|p| std::ffi::CString::new(p).ok()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
        return false;
    }
    // If the runtime were blocked, this rescue (after the deadline below) unblocks the reader.
    let rescue = path.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(15));
        let _ = OpenOptions::new().write(true).open(rescue);
    });
    let handed_over = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Opening a FIFO for writing without blocking fails (ENXIO) until a reader has it open.
            let writer = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path);
            if let Ok(mut writer) = writer {
                let _ = writer.write_all(contents);
                return;
            }
        }
    });
    handed_over.await.is_ok()
}
