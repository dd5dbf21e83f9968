//! The proxy's route file (`PILLION_CONFIG`) for a test pod.
//!
//! The file lives in its own temporary directory, readable by the proxy's UID (the proxy does
//! not run as root). Rewrites go through a temporary file and a rename, the way a ConfigMap
//! volume or an editor replaces a file, so the proxy never reads a half-written file and any
//! rejection is about the content the test wrote.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A route file, deleted with its directory on drop.
#[derive(Debug)]
pub struct RouteFile {
    dir: PathBuf,
    path: PathBuf,
}

impl RouteFile {
    pub fn new(yaml: &str) -> RouteFile {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pillion-e2e-routes-{}-{id}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let file = RouteFile {
            path: dir.join("routes.yaml"),
            dir,
        };
        file.replace(yaml);
        file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string, for `PILLION_CONFIG`.
    pub fn env_value(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }

    /// Replaces the file's content atomically (write a sibling, then rename over it).
    pub fn replace(&self, yaml: &str) {
        let staged = self.dir.join(".routes.yaml.new");
        fs::write(&staged, yaml).unwrap_or_else(|e| panic!("writing {}: {e}", staged.display()));
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", staged.display()));
        fs::rename(&staged, &self.path).unwrap_or_else(|e| panic!("renaming onto {}: {e}", self.path.display()));
    }
}

impl Drop for RouteFile {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
